"""dreamq/broker.py against a real redis-server: a channel detached from its transport (what
Celery's consumer leaves after it collected a connection that lost its broker) still reaches the
broker, where kombu's own channel raises AttributeError, which ended the worker ("Unrecoverable
error"). The whole sequence, a broker restart under a real worker and dispatcher, is R5 in
tests/integration/test_reconciler_stack.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kombu import Connection
from kombu.transport import redis as kombu_redis

from dreamq.broker import Transport, transport_for
from tests.support.processes import RedisServer


def held_message_then_detach(url: str, transport: type) -> Any:
    """A message held unacked on a channel whose pools were dropped and whose transport lost
    its connection object, as after Connection.collect() / close() in a consumer restart."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    connection = Connection(url, transport=transport)
    connection.SimpleQueue(queue).put({"job": 1})
    channel = connection.default_channel
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None
    channel._disconnect_pools()
    connection.transport.client = None  # Connection._do_close_transport
    return message


def test_a_late_ack_on_a_detached_channel_reaches_the_broker(redis_proc: RedisServer) -> None:
    client = redis_proc.client()
    before = client.hlen("unacked")
    message = held_message_then_detach(redis_proc.url, Transport)
    assert client.hlen("unacked") == before + 1
    message.ack()
    assert client.hlen("unacked") == before


def test_kombus_own_channel_still_has_the_defect(redis_proc: RedisServer) -> None:
    """When this fails, kombu fixed it: dreamq/broker.py can go."""
    message = held_message_then_detach(redis_proc.url, kombu_redis.Transport)
    with pytest.raises(AttributeError):
        message.ack()
    message.channel.qos._delivered.clear()  # nothing to restore when it is collected


def test_only_redis_urls_get_the_patched_transport() -> None:
    assert transport_for("redis://h:6379/0") is Transport
    assert transport_for("rediss://h:6380/0") is Transport
    assert transport_for("amqp://guest@h//") is None
