"""The Celery side shared by the API (which publishes) and the workers (which consume).

Job state does not live in Celery: a message carries only a job id, results are ignored, and the
job record in Redis is the truth. Messages are acked late, after the job reached a terminal state,
so a worker that dies mid-job gives its message back to the broker.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import uuid
from typing import Any, Protocol

import anyio.to_thread
import redis.asyncio as aioredis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from dreamq import lanes
from dreamq.broker import transport_for
from dreamq.settings import Settings
from storage.jobs import BrokerMessage

log = logging.getLogger("dreamq.queue")

GENERATE_TASK = "dreamq.generate"
WEBHOOK_TASK = "dreamq.deliver_webhook"

BROKER_SOCKET_OPTIONS: dict[str, float] = {
    # Redis transport (AMQP ignores these). A broker gone without closing the connection
    # (failover, NAT or firewall drop) must fail a publish or an ack within 10 s instead
    # of blocking the API request or the worker's main loop for ever.
    "socket_timeout": 10.0,
    # Connecting to a vanished host fails in 10 s, not after the kernel's ~2 min of SYNs,
    # so the reconnect loop keeps its 30 s pace.
    "socket_connect_timeout": 10.0,
    # kombu drops a BRPOP connection whose answer is overdue (half-open) after
    # brpop_timeout (1 s) + 2 x this (21 s instead of 51 s with the default 25), and
    # redis-py pings a pooled connection idle this long before using it.
    "health_check_interval": 10,
}
"""The broker connections' timeouts: kombu's (workers, `CeleryPublisher`) and the API's direct
Redis publisher's alike."""


def make_celery(settings: Settings) -> Celery:
    app = Celery("dreamq", broker=settings.effective_broker_url, set_as_current=False)
    transport = transport_for(settings.effective_broker_url)
    if transport is not None:  # kombu's Redis transport with a crash on reconnect worked around
        app.conf.broker_transport = transport
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a GPU worker never sits on a job another could run.
        worker_prefetch_multiplier=1,
        task_routes={
            GENERATE_TASK: {"queue": settings.generate_queue},
            WEBHOOK_TASK: {"queue": settings.webhook_queue},
        },
        task_default_queue=settings.generate_queue,
        broker_connection_retry_on_startup=True,
        # A lost broker connection (R7) is re-established, not fatal. Celery retries after 2, 4,
        # 6 ... s, at most 30 s apart: a worker consumes again within 30 s of the broker's return.
        broker_connection_retry=True,
        # Retry for ever: the default gives up after 100 tries (about 50 min) and exits, dropping
        # the loaded models; a worker should outlast any broker outage.
        broker_connection_max_retries=None,
        # Keep running jobs through a connection loss (also Celery 6's default flips to True).
        # The job writes its outcome to the job record over its own Redis connection; its late
        # ack goes out after the reconnect, and if kombu put the message back meanwhile the copy
        # exits on the finished (or leased) record. Cancelling would throw away the GPU work and
        # cost an attempt, and on Redis the message would only return after the visibility timeout.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # The visibility timeout must agree everywhere kombu reads it (celery #5935).
        # Scan for expired messages on every 10 s tick, not every tenth: a lost worker's job comes
        # back within visibility_timeout + 10 s instead of + 100 s.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_throttle": 1,
            **BROKER_SOCKET_OPTIONS,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        visibility_timeout=settings.visibility_timeout,
        # Enforced by prefork only (celery #9203): `dreamq worker` runs prefork.
        task_time_limit=settings.job_time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        # A pool process imports torch and builds its clients before it reports up; the default
        # 4 s made every replacement of a crashed process be killed in turn on a busy host.
        worker_proc_alive_timeout=60.0,
    )
    return app


class Publisher(Protocol):
    """Hands work to the broker. The job record is always written before a publish.

    Synchronous: the workers, the dispatcher and the CLI publish from plain code."""

    def publish_job(self, job_id: int, level: int = 0) -> None:
        """Queue the job at its priority level (the record's `level`, dreamq/lanes.py)."""
        ...

    def publish_webhook(self, job_id: int) -> None: ...


class AsyncPublisher(Protocol):
    """The API's publisher: awaited on the event loop, once per accepted job."""

    def message_for_create(self, level: int) -> BrokerMessage | None:
        """The message for the job store to push with the record in the same step, when the
        broker is the job Redis; None: the API awaits `publish_job` once the record exists."""
        ...

    async def publish_job(self, job_id: int, level: int = 0) -> None: ...


class CeleryPublisher:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._generate_queue = settings.generate_queue
        self._webhook_queue = settings.webhook_queue

    def publish_job(self, job_id: int, level: int = 0) -> None:
        # Level 0 without a priority: on RabbitMQ (always level 0) the message is the same as
        # before lanes existed. kombu's Redis transport files it under the list of its priority.
        priority = {"priority": lanes.broker_priority(level)} if level else {}
        self._app.send_task(GENERATE_TASK, args=[job_id], queue=self._generate_queue, **priority)

    def publish_webhook(self, job_id: int) -> None:
        self._app.send_task(WEBHOOK_TASK, args=[job_id], queue=self._webhook_queue)


class ThreadedPublisher:
    """A synchronous publisher made awaitable: kombu blocks, so it runs in a worker thread.
    The API's publisher for a broker that is not Redis (RabbitMQ)."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    def message_for_create(self, level: int) -> None:
        return None

    async def publish_job(self, job_id: int, level: int = 0) -> None:
        await anyio.to_thread.run_sync(self._publisher.publish_job, job_id, level)


class RedisPublisher:
    """Publishes a job to a Redis broker by pushing the Celery message itself.

    `send_task` builds a protocol-2 message through several layers (routing, signals, kombu's
    producer and channel) and blocks, so the API ran it in a worker thread: a thread hop and
    about a third of an accept's CPU time. With kombu's Redis transport, publishing to the
    default exchange is one LPUSH of a JSON envelope onto the list named after the queue
    (`Channel._put`), which is all this does, on the API's own event loop. The message is the
    one `send_task` writes for the same task, arguments and queue (tests/unit/test_queue.py
    compares them field by field), so workers cannot tell the two apart. The queue's binding
    (what kombu's declaration writes the first time a connection publishes to it) is written
    with the first message.

    `job_redis`: the broker is the job Redis (`client` is the job store's), so the job store's
    create step pushes the message itself (`message_for_create`): one round trip for both.
    """

    def __init__(self, client: aioredis.Redis, queue: str, *, job_redis: bool = False) -> None:
        self._client = client
        self._queue = queue
        self._job_redis = job_redis
        self._origin = anon_nodename()
        """`gen<pid>@<host>`: who published, as Celery names a process that is no worker."""
        self._reply_to = str(uuid.uuid4())
        """Celery's per-publisher return address; results are ignored, nobody reads it."""
        self._declared = False

    def message_for_create(self, level: int) -> BrokerMessage | None:
        if not self._job_redis:
            return None
        parts = job_message_parts(
            self._queue,
            origin=self._origin,
            reply_to=self._reply_to,
            priority=lanes.broker_priority(level),
        )
        return BrokerMessage(
            list_name=lanes.list_name(self._queue, level),
            binding_sets=(
                f"_kombu.binding.{self._queue}",
                f"_kombu.binding_permanent.{self._queue}",
            ),
            binding_member=self._binding_member,
            parts=parts,
        )

    @property
    def _binding_member(self) -> str:
        # The binding kombu's queue declaration writes (`Channel._queue_bind`): `routing key,
        # pattern, queue` for the default exchange. Workers write it too; nothing consumes by it.
        return lanes.PRIORITY_SEPARATOR.join([self._queue, "", self._queue])

    async def publish_job(self, job_id: int, level: int = 0) -> None:
        message = task_message(
            GENERATE_TASK,
            [job_id],
            self._queue,
            origin=self._origin,
            reply_to=self._reply_to,
            priority=lanes.broker_priority(level),
        )
        # As kombu retries a publish (Celery's default task_publish_retry_policy): a connection
        # the broker dropped (a restart, a failover, a blip) fails the first try, a fresh one
        # succeeds. A timeout is not retried: the broker already had its 10 s.
        for pause in (*PUBLISH_RETRY_PAUSES, None):
            try:
                await self._push(message, lanes.list_name(self._queue, level))
                return
            except MaxConnectionsError:
                raise  # every connection busy: a full API, not a lost broker
            except RedisConnectionError:
                if pause is None:
                    raise
                log.warning("publishing to %s: connection lost, trying again", self._queue)
                await asyncio.sleep(pause)

    async def _push(self, message: bytes, name: str) -> None:
        if self._declared:
            await self._client.lpush(name, message)
            return
        member = self._binding_member
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(f"_kombu.binding.{self._queue}", member)
        pipe.sadd(f"_kombu.binding_permanent.{self._queue}", member)
        pipe.lpush(name, message)
        await pipe.execute()
        self._declared = True


PUBLISH_RETRY_PAUSES = (0.0, 0.2, 0.4)
"""Seconds before each retry of a publish whose connection was lost: Celery's default
task_publish_retry_policy (3 retries, 0 s then 0.2 s more each time)."""


def task_message(
    task: str, args: list[int], queue: str, *, origin: str, reply_to: str, priority: int = 0
) -> bytes:
    """The JSON envelope kombu's Redis transport stores for a Celery protocol-2 task message,
    as `send_task(task, args=args, queue=queue)` writes it with dreamq's Celery settings (JSON,
    results ignored, no ETA, expiry or time limits in the message: workers apply their own).

    Headers and embed: celery.app.amqp.AMQP.as_task_v2; properties: kombu's Producer.publish
    and virtual.Channel.basic_publish (base64 body, a delivery tag per message, the default
    exchange with the queue as routing key, priority 0 so the plain list)."""
    body = json.dumps([args, {}, _EMBED]).encode()
    envelope = _envelope(
        task,
        base64.b64encode(body).decode(),
        repr(args),
        queue,
        origin=origin,
        reply_to=reply_to,
        priority=priority,
        body_encoding="base64",
    )
    return json.dumps(envelope).encode()


def job_message_parts(
    queue: str, *, origin: str, reply_to: str, priority: int = 0
) -> tuple[str, str, str]:
    """`GENERATE_TASK`'s message for one job id, as text around the id (which appears twice:
    in the body's arguments and in their repr), for a Redis script that knows the id only once
    it created the record.

    The body is the JSON itself, not its base64: kombu's transport option `body_encoding`
    (None) writes messages that way, and every kombu consumer decodes a message by its own
    `body_encoding` property, so a worker runs it like a base64 one
    (tests/unit/test_queue.py compares it with kombu's own).

    Every submission makes one: the envelope's JSON is built once per queue, origin and
    priority, and each message only gets its own task id and delivery tag."""
    text = _job_template(queue, origin, reply_to, priority)
    text = text.replace(_TASK_MARK, str(uuid.uuid4())).replace(_TAG_MARK, str(uuid.uuid4()))
    before, between, after = text.split(_JOB_MARK)
    return before, between, after


# Stand-ins in the template: random hex, which nothing else in a message can hold and JSON
# writes as it is.
_JOB_MARK, _TASK_MARK, _TAG_MARK = (uuid.uuid4().hex for _ in range(3))


@functools.lru_cache(maxsize=64)
def _job_template(queue: str, origin: str, reply_to: str, priority: int) -> str:
    envelope = _envelope(
        GENERATE_TASK,
        f"[[{_JOB_MARK}], {{}}, {json.dumps(_EMBED)}]",
        f"[{_JOB_MARK}]",
        queue,
        origin=origin,
        reply_to=reply_to,
        priority=priority,
        body_encoding=None,
        task_id=_TASK_MARK,
        delivery_tag=_TAG_MARK,
    )
    return json.dumps(envelope)


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _envelope(
    task: str,
    body: str,
    argsrepr: str,
    queue: str,
    *,
    origin: str,
    reply_to: str,
    priority: int,
    body_encoding: str | None,
    task_id: str | None = None,
    delivery_tag: str | None = None,
) -> dict[str, Any]:
    task_id = task_id or str(uuid.uuid4())
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": body_encoding,
            "delivery_tag": delivery_tag or str(uuid.uuid4()),
        },
    }


class RecordingPublisher:
    """In-memory twin for unit tests: remembers what would have been published."""

    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.webhooks: list[int] = []
        self.fail_with: Exception | None = None

    def publish_job(self, job_id: int, level: int = 0) -> None:
        if self.fail_with:
            raise self.fail_with
        self.jobs.append(job_id)

    def publish_webhook(self, job_id: int) -> None:
        self.webhooks.append(job_id)


class AsyncRecordingPublisher:
    """The API's in-memory twin for unit tests: remembers the jobs it would have published."""

    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.fail_with: Exception | None = None

    def message_for_create(self, level: int) -> None:
        return None

    async def publish_job(self, job_id: int, level: int = 0) -> None:
        if self.fail_with:
            raise self.fail_with
        self.jobs.append(job_id)
