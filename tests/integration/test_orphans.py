"""A job that a consumer popped and whose unacknowledged copy Redis refused (the primary died or failed over
between kombu's two steps, or it is full) exists only in that consumer: it goes back on its queue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Queue

from devtools.devstack import RedisServer
from producer.transport import ORPHANS, TRANSPORT


@pytest.fixture
def server(quiet_server: RedisServer) -> Iterator[RedisServer]:
    admin = redis.Redis(port=quiet_server.port)
    admin.flushall()
    yield quiet_server
    admin.config_set("maxmemory", 0)


def test_a_popped_job_whose_unacked_copy_is_refused_goes_back_on_its_queue(server: RedisServer) -> None:
    admin = redis.Redis(port=server.port)
    queue = Queue("orphans", routing_key="orphans")
    with Connection(server.url(0), transport=TRANSPORT) as connection:
        connection.SimpleQueue(queue).put({"job": 1})
        received: list[object] = []
        with connection.Consumer(queue, callbacks=[lambda body, message: received.append(body)]):
            # Full: the pop is allowed (it frees memory), the unacknowledged copy (HSET) is refused.
            admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 1)
            with pytest.raises(redis.ConnectionError, match="unacknowledged copy"):
                connection.drain_events(timeout=5)  # BRPOP pops it, the HSET is refused
        assert not received
        assert admin.llen("orphans") == 0  # popped: only the consumer holds it
        with pytest.raises(redis.ConnectionError, match="not back on their queue"):
            connection.channel().basic_consume("orphans", False, lambda message: None, "t1")
        admin.config_set("maxmemory", 0)
        channel = connection.channel()
        channel.basic_consume("orphans", False, lambda message: None, "t2")  # puts it back first
        assert admin.llen("orphans") == 1
        again = connection.SimpleQueue(queue).get(timeout=5)
        assert again.payload == {"job": 1} and again.delivery_info.get("redelivered") is not False
        again.ack()
    assert not ORPHANS._held


def test_a_lasting_refusal_puts_the_job_back_and_is_raised_as_it_is(server: RedisServer) -> None:
    """A user whose ACL forbids the unacknowledged copy (HSET): no reconnecting forever; the popped job goes
    back on its queue and the error stops the consumer (the worker exits non-zero)."""
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "nohset", "on", ">pw", "~*", "&*", "+@all", "-hset")
    queue = Queue("lasting", routing_key="lasting")
    url = f"redis://nohset:pw@127.0.0.1:{server.port}/0"
    with Connection(url, transport=TRANSPORT) as connection:
        connection.SimpleQueue(queue).put({"job": 2})
        consumer = connection.Consumer(queue, callbacks=[lambda body, message: None])
        with consumer, pytest.raises(redis.exceptions.NoPermissionError):
            connection.drain_events(timeout=5)
    assert admin.llen("lasting") == 1 and not ORPHANS._held
    admin.execute_command("ACL", "DELUSER", "nohset")
