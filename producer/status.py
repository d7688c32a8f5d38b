"""Cluster status over the broker: workers online (with their ``llava_health``) and queue depths."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.app import outcome_differences, worker_health
from producer.contract import HEALTH_COMMAND, QUEUE_PREFIX, is_redis_url

__all__ = [
    "HEALTH_COMMAND",
    "cluster_status",
    "fleet_warnings",
    "known_queues",
    "queue_depths",
    "worker_health",
]

PRIORITY_SEP = "\x06\x16"  # kombu's Redis separator between a queue's name and its priority level


def queue_depths(app: Celery, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue (unacknowledged, in-flight jobs are not counted)."""
    depths: dict[str, int] = {}
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except Exception:  # the queue does not exist yet: nothing was ever sent to it
                depths[queue] = 0
    return depths


def known_queues(app: Celery) -> set[str]:
    """Queues holding llava jobs, found on a Redis broker (each queue and priority level is a Redis list)."""
    if not is_redis_url(app.conf.broker_url):
        return set()
    found = set()
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        for key in client.scan_iter(match=f"{QUEUE_PREFIX}*", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            base, _, level = name.rpartition(PRIORITY_SEP)  # queue<sep>3: one of its priority lists
            found.add(base if level.isdigit() else name)
    return found


def cluster_status(app: Celery, queues: list[str], timeout: float = 2.0) -> dict[str, Any]:
    """Workers, what each serves, and the depth of ``queues``, of every queue a worker consumes and of every
    ``llava.*`` queue holding jobs (so a queue for a model nobody serves shows up)."""
    workers = worker_health(app, timeout)
    served = sorted({q for info in workers.values() for q in info.get("queues", [])})
    names = sorted(set(queues) | set(served) | known_queues(app))
    return {
        "workers": workers,
        "served_queues": served,
        "queues": queue_depths(app, names),
        "warnings": fleet_warnings(workers),
    }


def fleet_warnings(workers: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong across workers: visibility timeouts that differ on one broker (Redis would hand one
    worker's running jobs to another), and outcome-changing settings that differ among the workers of a
    queue (a job's result would depend on which worker takes it)."""
    warnings = []
    timeouts = {info.get("visibility_timeout") for info in workers.values()} - {None}
    if len(timeouts) > 1:
        shown = ", ".join(f"{node}={workers[node].get('visibility_timeout')}" for node in sorted(workers))
        warnings.append(f"workers disagree on the visibility timeout ({shown}): give them all the same one")
    for queue, settings in outcome_differences(workers).items():
        for name, values in settings.items():
            shown = ", ".join(f"{node}={value}" for node, value in sorted(values.items()))
            warnings.append(
                f"workers of queue {queue} disagree on LLAVA_{name.upper()} ({shown}): the same job's "
                "outcome depends on which worker takes it"
            )
    return warnings
