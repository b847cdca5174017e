"""The reconciler: re-drives work whose broker message was lost.

A job record lives in Redis apart from its broker message, so a broker that loses messages (a
Redis broker restarted without persistence, a flushed queue) leaves records that nothing will
ever run. Once a period, the one reconciler of the fleet (a Redis lock; it runs in each
`dreamq dispatcher` and `dreamq reconcile`) compares the records with what the broker holds:

- a queued job, or a processing job whose lease nobody holds, that has no message in its queue
  nor among the broker's unacknowledged messages at two passes in a row is published again (its
  record untouched for a period, so a job just accepted and not yet published is left alone);
  after `max_redrives` such losses it is failed with a reason instead;
- a finished job whose webhook delivery is pending, overdue and without a message is handed to
  the dispatcher again for its next attempt.

Re-driving is safe when the message was not lost after all: a duplicate delivery of a job finds
it leased or finished and exits (storage/jobs.py), and each webhook attempt is claimed once.

Only a Redis broker can be inspected. With RabbitMQ (durable queues, unacknowledged messages
returned as soon as a consumer's connection drops) nothing queued is lost on a restart: there the
reconciler re-drives only what has waited longer than the visibility timeout without a lease.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from celery import Celery

from dreamq import lanes
from dreamq.queue import GENERATE_TASK, WEBHOOK_TASK, CeleryPublisher, Publisher
from dreamq.settings import Settings
from storage import keys
from storage.jobs import JobStatus, JobStore

log = logging.getLogger("dreamq.reconciler")

UNACKED_KEY = "unacked"
"""kombu's Redis transport: hash of delivery tag -> [message, exchange, routing key] of every
message a consumer holds (its `unacked_key` transport option, left at its default)."""


SCAN_BATCH = 1000


def lost_message_reason(times: int) -> str:
    return f"The job's queue message was lost {times} times (broker restarts); it was stopped."


@dataclass(frozen=True)
class BrokerContents:
    jobs: set[int]
    """Job ids with a generation message in the broker (queued or held by a consumer)."""
    webhooks: set[int]
    """Job ids with a webhook message in the broker."""


class BrokerView(Protocol):
    def contents(self) -> BrokerContents | None:
        """What the broker holds now; None when it cannot be inspected."""
        ...


def _message_job_id(message: dict[str, Any]) -> tuple[str, int] | None:
    """(task name, job id) of a Celery protocol-2 message in kombu's JSON envelope."""
    headers = message.get("headers") or {}
    task = headers.get("task")
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(task), int(args[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class RedisBrokerView:
    """Reads a Redis broker's queue lists and its unacknowledged messages."""

    def __init__(self, client: redis.Redis, generate_queue: str, webhook_queue: str) -> None:
        self._r = client
        self._queues = (generate_queue, webhook_queue)

    def contents(self) -> BrokerContents:
        found = BrokerContents(set(), set())
        for queue in self._queues:
            # One list per priority level (dreamq/lanes.py).
            for name in (lanes.list_name(queue, level) for level in range(lanes.LEVELS)):
                self._scan_list(name, found)
        # Bounded by the consumers' prefetch: one message per pool process, plus held retries.
        for raw in self._r.hvals(UNACKED_KEY):
            try:
                message = json.loads(raw)[0]
            except (ValueError, IndexError, TypeError):
                continue
            self._note(message, found)
        return found

    def _scan_list(self, name: str, found: BrokerContents) -> None:
        start = 0
        while True:
            chunk = self._r.lrange(name, start, start + SCAN_BATCH - 1)
            for raw in chunk:
                try:
                    self._note(json.loads(raw), found)
                except ValueError:
                    continue
            if len(chunk) < SCAN_BATCH:
                return
            start += SCAN_BATCH

    @staticmethod
    def _note(message: Any, found: BrokerContents) -> None:
        if not isinstance(message, dict):
            return
        named = _message_job_id(message)
        if named is None:
            return
        task, job_id = named
        if task == GENERATE_TASK:
            found.jobs.add(job_id)
        elif task == WEBHOOK_TASK:
            found.webhooks.add(job_id)


class OpaqueBroker:
    """A broker that cannot be inspected (RabbitMQ)."""

    def contents(self) -> None:
        return None


@dataclass
class Report:
    jobs: list[int] = field(default_factory=list)
    """Jobs published again."""
    failed: list[int] = field(default_factory=list)
    """Jobs failed after losing their message `max_redrives` times."""
    webhooks: list[int] = field(default_factory=list)
    """Webhook deliveries handed to the dispatcher again."""

    def __bool__(self) -> bool:
        return bool(self.jobs or self.failed or self.webhooks)


WebhookSchedule = Callable[[int, int, float], None]
"""schedule(job_id, attempt, due_at): publish that webhook attempt."""


class Reconciler:
    def __init__(
        self,
        *,
        jobs: JobStore,
        publisher: Publisher,
        schedule_webhook: WebhookSchedule,
        broker: BrokerView,
        grace_seconds: float,
        opaque_after_seconds: float,
        max_redrives: int,
        queue: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs
        self._publisher = publisher
        self._schedule_webhook = schedule_webhook
        self._broker = broker
        self._grace = grace_seconds
        self._opaque_after = opaque_after_seconds
        self._max_redrives = max_redrives
        self._queue = queue
        """The generation queue this reconciler answers for: jobs of other queues (another
        deployment sharing the Redis) are not its to re-drive."""
        self._clock = clock
        self._suspect_jobs: set[int] = set()
        self._suspect_webhooks: set[int] = set()

    def run_once(self) -> Report:
        """One pass. Work missing from the broker is re-driven when the previous pass found it
        missing too: a message moving between a queue and a consumer is briefly in neither."""
        contents = self._broker.contents()
        report = Report()
        self._jobs_pass(contents, report)
        self._webhooks_pass(contents, report)
        return report

    def _jobs_pass(self, contents: BrokerContents | None, report: Report) -> None:
        idle_for = self._grace if contents is not None else self._opaque_after
        missing: set[int] = set()
        statuses: dict[int, JobStatus] = {}
        for job in self._jobs.unleased_active(idle_for=idle_for, queue=self._queue):
            if contents is None:
                # Nothing to compare with: only a processing job orphaned this long is lost.
                if job.status is JobStatus.PROCESSING:
                    missing.add(job.id)
            elif job.id not in contents.jobs:
                missing.add(job.id)
            statuses[job.id] = job.status
        confirmed = missing if contents is None else missing & self._suspect_jobs
        self._suspect_jobs = missing - confirmed
        for job_id in sorted(confirmed):
            self._redrive(job_id, statuses[job_id], report)

    def _redrive(self, job_id: int, status: JobStatus, report: Report) -> None:
        times = self._jobs.count_redrive(job_id, status)
        if times == 0:
            return  # a worker took it meanwhile
        if times > self._max_redrives:
            if self._jobs.fail(job_id, lost_message_reason(times - 1)):
                log.warning("job %s: failed: its message was lost %s times", job_id, times - 1)
                report.failed.append(job_id)
                job = self._jobs.get(job_id)
                if job is not None and job.webhook:
                    self._publisher.publish_webhook(job_id)
            return
        job = self._jobs.get(job_id)
        self._publisher.publish_job(job_id, job.level if job is not None else 0)
        log.warning("job %s: its broker message was lost; published again (%s)", job_id, status)
        report.jobs.append(job_id)

    def _webhooks_pass(self, contents: BrokerContents | None, report: Report) -> None:
        idle_for = self._grace if contents is not None else self._opaque_after
        due = self._jobs.webhooks_due(before=self._clock() - idle_for)
        missing = {job_id for job_id in due if contents is None or job_id not in contents.webhooks}
        confirmed = missing if contents is None else missing & self._suspect_webhooks
        self._suspect_webhooks = missing - confirmed
        for job_id in sorted(confirmed):
            job = self._jobs.get(job_id)
            if job is None:
                self._jobs.forget_webhook(job_id)  # the record expired
                continue
            if self._queue is not None and job.queue and job.queue != self._queue:
                continue  # another deployment's
            attempt = self._jobs.webhook_attempt_count(job_id) + 1
            self._schedule_webhook(job_id, attempt, self._clock())
            log.warning("job %s: webhook attempt %s had no message; handed off", job_id, attempt)
            report.webhooks.append(job_id)


class FleetLock:
    """One reconciler at a time across the fleet: a Redis key with a token and an expiry, taken
    or renewed at every pass, released on stop."""

    _RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
    _RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

    def __init__(self, client: redis.Redis, ttl_seconds: float) -> None:
        self._token = secrets.token_hex(8)
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._renew = client.register_script(self._RENEW)
        self._release = client.register_script(self._RELEASE)

    def hold(self) -> bool:
        return bool(self._renew(keys=[keys.RECONCILER_LOCK], args=[self._token, self._ttl_ms]))

    def release(self) -> None:
        self._release(keys=[keys.RECONCILER_LOCK], args=[self._token])


class ReconcilerThread:
    """Runs passes every `period` seconds in a daemon thread while it holds the fleet lock."""

    def __init__(self, reconciler: Reconciler, lock: FleetLock, period: float) -> None:
        self._reconciler = reconciler
        self._lock = lock
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dreamq-reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._period + 5)
        with contextlib.suppress(redis.RedisError):
            self._lock.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._lock.hold():
                    self._reconciler.run_once()
            except Exception:  # Redis or the broker down: try again next period
                log.warning("reconciler pass failed", exc_info=True)
            self._stop.wait(self._period)


def describe(report: Report) -> Iterable[str]:
    yield f"jobs published again: {report.jobs or 'none'}"
    yield f"jobs failed (message lost too often): {report.failed or 'none'}"
    yield f"webhooks handed off again: {report.webhooks or 'none'}"


def broker_view(settings: Settings) -> BrokerView:
    url = settings.effective_broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        client = redis.Redis.from_url(url)
        return RedisBrokerView(client, settings.generate_queue, settings.webhook_queue)
    return OpaqueBroker()


def from_settings(settings: Settings, app: Celery) -> Reconciler:
    """The reconciler of a deployment: job records in DREAMQ_REDIS_URL, messages in the broker."""
    from workers.webhooks import celery_schedule

    client = redis.Redis.from_url(settings.redis_url)
    return Reconciler(
        jobs=JobStore(client, ttl_seconds=settings.job_ttl_seconds),
        publisher=CeleryPublisher(app, settings),
        schedule_webhook=celery_schedule(app, WEBHOOK_TASK, settings.webhook_queue, time.time),
        broker=broker_view(settings),
        grace_seconds=settings.reconcile_seconds,
        opaque_after_seconds=settings.visibility_timeout,
        max_redrives=settings.max_attempts,
        queue=settings.generate_queue,
    )


def fleet_lock(settings: Settings) -> FleetLock:
    # Outlives two missed passes, so a reconciler that died hands over within three periods.
    return FleetLock(redis.Redis.from_url(settings.redis_url), 3 * settings.reconcile_seconds)
