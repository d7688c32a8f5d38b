"""The worker's result backend (worker.results) on a real Redis: one round trip per stored outcome, a stored
outcome never overwritten, the waiting client told on the same round trip; and the broker transport that
reuses one Redis client per channel (producer.transport)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest
import redis
from celery import states

from devtools.devstack import RedisServer
from producer.transport import Channel
from worker.app import create_app
from worker.results import ResultBackend
from worker.service import Service
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(quiet_server: RedisServer) -> ResultBackend:
    settings = WorkerSettings(broker_url=quiet_server.url(0), result_backend=quiet_server.url(1))
    app = create_app(settings, Service(settings))
    assert isinstance(app.backend, ResultBackend)
    return app.backend


def test_an_outcome_is_stored_and_published_in_one_round_trip(
    backend: ResultBackend, quiet_server: RedisServer
) -> None:
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id).decode()
    listener = redis.Redis.from_url(quiet_server.url(1)).pubsub()
    listener.subscribe(key)
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    stored = redis.Redis.from_url(quiet_server.url(1))
    before = _calls(stored, "get", "setex", "publish", "evalsha", "eval")
    backend.store_result(task_id, {"text": "a cat"}, states.SUCCESS)
    after = _calls(stored, "get", "setex", "publish", "evalsha", "eval")
    # One script ran the read, the write and the publish inside Redis (Celery's own backend sends a GET,
    # then a SETEX + PUBLISH pipeline, and runs no script).
    grown = [a - b for a, b in zip(after, before, strict=True)]
    assert grown[:3] == [1, 1, 1] and grown[3] + grown[4] >= 1  # EVALSHA (twice on the script's first run)
    published = listener.get_message(timeout=5)
    assert published is not None and json.loads(published["data"])["result"] == {"text": "a cat"}
    assert 0 < stored.ttl(key) <= backend.expires
    assert backend.get_task_meta(task_id)["status"] == states.SUCCESS
    listener.close()


def _calls(client: redis.Redis, *commands: str) -> list[int]:
    """How many times Redis ran each of ``commands`` (scripts' own calls included)."""
    stats = client.info("commandstats")
    return [int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in commands]


def test_a_stored_success_is_never_overwritten(backend: ResultBackend) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"text": "first"}, states.SUCCESS)
    backend.store_result(task_id, ValueError("a second run failed"), states.FAILURE)
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"text": "first"})


def test_a_redelivered_message_keeps_a_stored_failure_a_new_send_replaces_it(backend: ResultBackend) -> None:
    """A run of a message Redis delivered again (its acknowledgement lost in a failover) must not give the
    producer a second outcome; a new send under the same id (a resend while the first was queued) may."""
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, ValueError("first run"), states.FAILURE)
    again = SimpleNamespace(delivery_info={"redelivered": True})
    backend.store_result(task_id, {"text": "redelivered"}, states.SUCCESS, request=again)
    assert backend.get_task_meta(task_id)["status"] == states.FAILURE
    backend.store_result(task_id, {"text": "resent"}, states.SUCCESS)
    assert backend.get_task_meta(task_id)["result"] == {"text": "resent"}


def test_the_broker_channel_reuses_one_client(quiet_server: RedisServer) -> None:
    settings = WorkerSettings(broker_url=quiet_server.url(0), result_backend=quiet_server.url(1))
    app = create_app(settings, Service(settings))
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()


def test_an_arrival_counts_once_however_often_it_is_sent(quiet_server: RedisServer) -> None:
    """A job's arrival is retried while Redis does not answer; a try that timed out may still run when a
    hung Redis wakes: one arrival is one delivery toward the backstop, whichever tries run."""
    from worker.delivery import DeliveryLedger

    settings = WorkerSettings(broker_url=quiet_server.url(0), result_backend=quiet_server.url(1))
    ledger = DeliveryLedger(create_app(settings, Service(settings)), settings)
    job_id = str(uuid.uuid4())
    assert ledger.delivered(job_id, "arrival-1").deliveries == 1
    assert ledger.delivered(job_id, "arrival-1").deliveries == 1  # the same arrival's late try
    later = ledger.delivered(job_id, "arrival-2")
    assert (later.deliveries, later.attempts, later.succeeded, later.failed) == (2, 0, None, None)
