"""dreamq/queue.py's direct Redis publisher against a real redis-server: the message it pushes is
the one kombu's `send_task` pushes for the same task, arguments and queue (ids aside), and the
queue's binding it writes is kombu's. A real worker running such a message is
tests/integration/test_direct_publish_stack.py."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from dreamq import lanes
from dreamq.queue import (
    AsyncRecordingPublisher,
    CeleryPublisher,
    RecordingPublisher,
    RedisPublisher,
    ThreadedPublisher,
    job_message_parts,
    make_celery,
)
from dreamq.settings import Settings
from storage.jobs import AsyncJobStore, NewJob, UnfinishedCapReached
from tests.support.processes import RedisServer, free_port
from tests.support.tcpproxy import TcpProxy, tcp_proxy

ID_HEADERS = {"id", "root_id"}
"""Headers that hold the task id: a fresh uuid4 per message."""
ID_PROPERTIES = {"correlation_id", "reply_to", "delivery_tag"}
"""Properties that hold an id: the task id, the publisher's return address, the message's tag."""


def publish_directly(url: str, queue: str, job_id: int, level: int = 0) -> None:
    async def publish() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            await RedisPublisher(client, queue).publish_job(job_id, level)
        finally:
            await client.aclose()

    asyncio.run(publish())


def is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(value)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("level", range(lanes.LEVELS))
def test_the_direct_message_is_the_one_send_task_pushes(
    redis_proc: RedisServer, level: int
) -> None:
    queue = f"generate-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_proc.url, generate_queue=queue)
    CeleryPublisher(make_celery(settings), settings).publish_job(42, level)
    publish_directly(redis_proc.url, queue, 42, level)
    ours, theirs = _the_two_messages(redis_proc, queue, level)
    _assert_same_message(ours, theirs, 42)
    # The body is base64 of the same JSON [args, kwargs, embed], byte for byte.
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])


@pytest.mark.parametrize("level", range(lanes.LEVELS))
def test_the_message_created_with_the_record_is_kombus_with_a_plain_body(
    redis_proc: RedisServer, level: int
) -> None:
    """The job store's create step pushes the message it is given (a broker that is the job
    Redis): kombu's own with its `body_encoding` transport option off, the JSON body as is,
    which a worker decodes by the message's own property (a real worker runs such messages in
    tests/integration/test_direct_publish_stack.py)."""
    queue = f"generate-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_proc.url, generate_queue=queue)
    celery = make_celery(settings)
    celery.conf.broker_transport_options = {
        **celery.conf.broker_transport_options,
        "body_encoding": None,
    }
    CeleryPublisher(celery, settings).publish_job(42, level)

    async def create() -> int:
        client = aioredis.Redis.from_url(redis_proc.url)
        try:
            publisher = RedisPublisher(client, queue, job_redis=True)
            message = publisher.message_for_create(level)
            assert message is not None
            store = AsyncJobStore(client, ttl_seconds=60)
            return await store.create(new_job(level=level), message=message)
        finally:
            await client.aclose()

    job_id = asyncio.run(create())
    # The pushed message names the id the record got (not 42: the test asked kombu for 42).
    ours, theirs = _the_two_messages(redis_proc, queue, level)
    theirs["body"] = theirs["body"].replace("[[42]", f"[[{job_id}]")
    theirs["headers"]["argsrepr"] = f"[{job_id}]"
    _assert_same_message(ours, theirs, job_id)
    assert ours["body"] == theirs["body"]
    assert ours["properties"]["body_encoding"] is None


def test_a_publisher_of_another_broker_leaves_the_record_alone() -> None:
    """A broker of its own (or RabbitMQ): the API publishes once the record exists."""
    client = aioredis.Redis.from_url("redis://127.0.0.1:9/0")  # never connected
    assert RedisPublisher(client, "generate").message_for_create(0) is None
    assert ThreadedPublisher(RecordingPublisher()).message_for_create(0) is None


def test_a_create_refused_by_the_cap_pushes_no_message(redis_proc: RedisServer) -> None:
    queue = f"generate-{uuid.uuid4().hex[:8]}"

    async def create_twice() -> list[int | str]:
        client = aioredis.Redis.from_url(redis_proc.url)
        try:
            publisher = RedisPublisher(client, queue, job_redis=True)
            store = AsyncJobStore(client, ttl_seconds=60)
            owner = f"key-{uuid.uuid4().hex[:8]}"
            results: list[int | str] = []
            for _ in range(2):
                message = publisher.message_for_create(0)
                try:
                    created = await store.create(
                        new_job(owner=owner), max_unfinished=1, message=message
                    )
                    results.append(created)
                except UnfinishedCapReached:
                    results.append("capped")
            return results
        finally:
            await client.aclose()

    first, second = asyncio.run(create_twice())
    assert second == "capped"
    pushed = [json.loads(raw) for raw in redis_proc.client().lrange(queue, 0, -1)]
    assert [json.loads(m["body"])[0] for m in pushed] == [[first]]


def test_a_create_cut_by_a_blip_leaves_neither_record_nor_message(redis_proc: RedisServer) -> None:
    """The job Redis (the broker too) dropped every connection: the create on the dead pooled
    connection fails whole (the API answers 503; no record waits without its message, no message
    without its record), and the next one goes through on a fresh connection."""
    queue = f"generate-{uuid.uuid4().hex[:8]}"

    async def create_across_a_blip(proxy: TcpProxy) -> list[int]:
        client = aioredis.Redis.from_url(proxy.url())
        try:
            publisher = RedisPublisher(client, queue, job_redis=True)
            store = AsyncJobStore(client, ttl_seconds=60)
            ids = [await store.create(new_job(), message=publisher.message_for_create(0))]
            proxy.reset()  # the pooled connection is now dead
            with pytest.raises(redis.exceptions.ConnectionError):
                await store.create(new_job(), message=publisher.message_for_create(0))
            ids.append(await store.create(new_job(), message=publisher.message_for_create(0)))
            return ids
        finally:
            await client.aclose()

    with tcp_proxy(redis_proc.port) as proxy:
        first, second = asyncio.run(create_across_a_blip(proxy))
    assert second == first + 1  # the failed create took no id
    pushed = [json.loads(raw) for raw in redis_proc.client().lrange(queue, 0, -1)]
    assert sorted(json.loads(m["body"])[0][0] for m in pushed) == [first, second]


def new_job(level: int = 0, owner: str | None = None) -> NewJob:
    return NewJob(
        owner=owner or f"key-{uuid.uuid4().hex[:8]}",
        model_id="demo",
        kind="txt2img",
        params={},
        meta={},
        file_prefix="p",
        future_links=[],
        predicted_seconds=1.0,
        eta_seconds=1.0,
        level=level,
    )


def _the_two_messages(
    redis_proc: RedisServer, queue: str, level: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ours, kombu's): the two messages in the level's priority list (LPUSH: newest first),
    none anywhere else."""
    client = redis_proc.client()
    others = [lanes.list_name(queue, n) for n in range(lanes.LEVELS) if n != level]
    assert [client.llen(name) for name in others] == [0] * len(others)
    ours_raw, theirs_raw = client.lrange(lanes.list_name(queue, level), 0, -1)
    return json.loads(ours_raw), json.loads(theirs_raw)


def _assert_same_message(ours: dict[str, Any], theirs: dict[str, Any], job_id: int) -> None:
    """The same fields with the same values, ids aside; the ids where Celery puts them."""
    assert ours.keys() == theirs.keys()
    assert ours["headers"].keys() == theirs["headers"].keys()
    assert ours["properties"].keys() == theirs["properties"].keys()
    for field in ours.keys() - {"headers", "properties", "body"}:
        assert ours[field] == theirs[field], field
    for name in ours["headers"].keys() - ID_HEADERS:
        assert ours["headers"][name] == theirs["headers"][name], name
    for name in ours["properties"].keys() - ID_PROPERTIES:
        assert ours["properties"][name] == theirs["properties"][name], name
    body = ours["body"]
    if ours["properties"]["body_encoding"] == "base64":
        body = base64.b64decode(body)
    assert json.loads(body)[0] == [job_id]
    # The ids are where Celery puts them: one task id, fresh per message.
    task_id = ours["headers"]["id"]
    assert is_uuid(task_id) and task_id != theirs["headers"]["id"]
    assert ours["headers"]["root_id"] == ours["properties"]["correlation_id"] == task_id
    assert all(is_uuid(ours["properties"][name]) for name in ID_PROPERTIES)
    assert ours["properties"]["delivery_tag"] != theirs["properties"]["delivery_tag"]


def test_the_direct_publisher_declares_the_queue_as_kombu_does(redis_proc: RedisServer) -> None:
    client = redis_proc.client()
    ours, theirs = (f"generate-{uuid.uuid4().hex[:8]}" for _ in range(2))
    publish_directly(redis_proc.url, ours, 1)
    settings = Settings(redis_url=redis_proc.url, generate_queue=theirs)
    CeleryPublisher(make_celery(settings), settings).publish_job(1)

    def declared(queue: str) -> dict[str, set[str]]:
        """The queue's binding sets, its name replaced by Q (in the keys and the members)."""
        names = [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        return {
            name.replace(queue, "Q"): {_text(m).replace(queue, "Q") for m in client.smembers(name)}
            for name in names
        }

    assert declared(ours) == declared(theirs)
    assert declared(ours)["_kombu.binding.Q"]  # written, not two empty sets


def test_a_broker_that_refuses_fails_the_publish() -> None:
    """What the API answers 503 on: the error reaches the caller (api/service.py `_publish`)."""

    async def publish() -> None:
        # A port that was free a moment ago: nothing listens there.
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        try:
            await RedisPublisher(client, "generate").publish_job(1)
        finally:
            await client.aclose()

    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(publish())


def test_a_publish_after_a_broker_blip_goes_through(redis_proc: RedisServer) -> None:
    """The broker dropped every connection (a restart, a failover): the next publish succeeds on
    a fresh one, as kombu's publish retry made it (the r7 fault test does this mid-stack)."""
    queue = f"generate-{uuid.uuid4().hex[:8]}"

    async def publish_twice(proxy: TcpProxy) -> None:
        client = aioredis.Redis.from_url(proxy.url())
        try:
            publisher = RedisPublisher(client, queue)
            await publisher.publish_job(1)
            proxy.reset()  # the pooled connection is now dead
            await publisher.publish_job(2)
        finally:
            await client.aclose()

    with tcp_proxy(redis_proc.port) as proxy:
        asyncio.run(publish_twice(proxy))
    pushed = [json.loads(raw) for raw in redis_proc.client().lrange(queue, 0, -1)]
    assert sorted(json.loads(base64.b64decode(m["body"]))[0][0] for m in pushed) == [1, 2]


def test_the_threaded_publisher_runs_the_sync_one() -> None:
    recording = RecordingPublisher()
    asyncio.run(ThreadedPublisher(recording).publish_job(7))
    assert recording.jobs == [7]


def test_the_async_recording_publisher_records_and_fails_on_demand() -> None:
    publisher = AsyncRecordingPublisher()
    asyncio.run(publisher.publish_job(3))
    publisher.fail_with = OSError("broker down")
    with pytest.raises(OSError):
        asyncio.run(publisher.publish_job(4))
    assert publisher.jobs == [3]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_messages_for_create_share_a_template_but_never_an_id() -> None:
    """The envelope's JSON is built once: each message still gets its own task id (also its
    root and correlation id) and delivery tag, and the job id in both places."""
    messages = []
    for job_id in (7, 8):
        before, between, after = job_message_parts("q", origin="gen1@h", reply_to="r", priority=3)
        messages.append(json.loads(f"{before}{job_id}{between}{job_id}{after}"))
    for job_id, message in zip((7, 8), messages, strict=True):
        headers, properties = message["headers"], message["properties"]
        assert headers["id"] == headers["root_id"] == properties["correlation_id"]
        assert json.loads(message["body"])[0] == [job_id]
        assert headers["argsrepr"] == f"[{job_id}]"
        assert properties["priority"] == 3
    ids = {message["headers"]["id"] for message in messages}
    tags = {message["properties"]["delivery_tag"] for message in messages}
    assert len(ids) == 2 and len(tags) == 2 and not ids & tags
