"""``worker_health`` addressed to no node asks nobody (a broadcast to all would wait its whole timeout)."""

from __future__ import annotations

from producer.app import QueueSettings, create_celery_app, worker_health


def test_no_nodes_is_an_empty_answer_without_the_broker() -> None:
    dead = "redis://127.0.0.1:1/0"  # nothing listens: a broadcast would fail with BrokerUnavailable
    app = create_celery_app(QueueSettings(broker_url=dead, result_backend=dead), role="producer")
    assert worker_health(app, timeout=5, nodes=[]) == {}
