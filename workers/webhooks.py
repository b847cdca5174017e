"""The webhook dispatcher: runs on CPU workers consuming the `webhooks` queue, never on GPU workers.

One delivery = the job's terminal event (its fetch body plus `track_id`), signed the Standard
Webhooks way with the owner key's secret(s), POSTed until the receiver answers 2xx or the retry
schedule runs out. Every attempt is recorded on the job.

A retry is a new broker message with a countdown, never a sleeping thread. A message carries
(job id, attempt number, due time); a countdown is cut into hops of at most `MAX_HOLD_SECONDS`
(a message held longer than the broker's visibility timeout would be handed out twice), and a hop
that arrives early is simply re-published for the rest. Each attempt number is claimed once in
Redis, so duplicate messages never send twice; a claim whose dispatcher died mid-attempt lapses
after a lease (`attempt_lease_seconds`) and the redelivered message (acks_late) tries again. A
message that finds the claim still live looks again once it has lapsed instead of being dropped:
the redelivery may come before the lapse (RabbitMQ requeues at once when the dispatcher's
connection drops).
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import redis

from dreamq import logs
from dreamq.contract import webhook_body
from dreamq.guarded_http import Deadline, pinned_transport
from dreamq.outbound import (
    BlockedUrl,
    Network,
    Resolver,
    early_refusal,
    parse_cidrs,
    system_resolve,
)
from dreamq.settings import Settings
from dreamq.signing import signature_header
from storage.jobs import JobRecord, JobStore, WebhookStatus

log = logging.getLogger("dreamq.webhooks")

JITTER = 0.2
"""Each scheduled wait is scaled by a uniform factor in [1 - JITTER, 1 + JITTER]: retries of
many deliveries that failed together (a receiver outage) spread out instead of arriving at once."""

MAX_HOLD_SECONDS = 900.0
"""The longest countdown one message carries: below Redis' default visibility timeout (1 h) and
RabbitMQ's default consumer timeout (30 min), which would otherwise redeliver a held message."""

EARLY_TOLERANCE_SECONDS = 0.05
LEASE_MARGIN_SECONDS = 10.0
"""Time an attempt spends outside its POST: signing, recording."""

MAX_ANSWER_BYTES = 64 * 1024
"""The most of a receiver's answer a sender reads: only its status and Retry-After matter."""


def attempt_lease_seconds(timeout_seconds: float) -> float:
    """How long a claimed attempt is left to its dispatcher before another may make it (the first
    one died mid-attempt). One deadline, the webhook timeout, bounds an attempt's POST from the
    DNS lookup to the answer (`HttpWebhookSender`); the lease allows three, so a dispatcher
    slowed down (a starved CPU, a long pause) is not overtaken while it still works. Should one
    be, the worst that follows is a second POST with the same webhook-id."""
    return 3 * timeout_seconds + LEASE_MARGIN_SECONDS


@dataclass(frozen=True)
class Delivery:
    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Response:
    status: int
    retry_after: str | None = None


class WebhookSender(Protocol):
    def send(self, delivery: Delivery) -> Response:
        """POST the delivery. Raises BlockedUrl when the host resolves to an address the
        outbound guard refuses, httpx.HTTPError on transport errors and timeouts."""
        ...


class HttpWebhookSender:
    """One HTTP client per dispatcher process (reliability R14, R16-R18).

    Connections go only to addresses the outbound guard allowed, looked up once at connect
    (`dreamq.guarded_http.pinned_transport`: no DNS rebinding window). Redirects are never
    followed. One deadline, the webhook timeout, covers the whole attempt from the lookup to the
    status line and headers, so a receiver that dribbles its answer is cut; the answer's body
    is read up to `MAX_ANSWER_BYTES` at most.
    """

    def __init__(
        self,
        timeout_seconds: float,
        allow: Iterable[Network] = (),
        *,
        resolve: Resolver = system_resolve,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._timeout = timeout_seconds
        self._client = httpx.Client(
            transport=transport or pinned_transport(allow, resolve=resolve),
            follow_redirects=False,
            trust_env=False,  # an environment proxy would connect to addresses never checked
            headers={"user-agent": "dreamq"},
        )

    def close(self) -> None:
        self._client.close()

    def send(self, delivery: Delivery) -> Response:
        with Deadline(self._timeout) as deadline:
            request = self._client.build_request(
                "POST",
                delivery.url,
                content=delivery.body,
                headers=delivery.headers,
                # Every timeout, the connect's included, which bounds the DNS lookup.
                timeout=deadline.remaining(),
                extensions={"trace": deadline.trace},
            )
            try:
                response = self._client.send(request, stream=True)
                try:
                    deadline.watch(response)
                    answer = Response(response.status_code, response.headers.get("retry-after"))
                    _drain(response, deadline)
                finally:
                    response.close()
            except httpx.TransportError as exc:
                # The deadline's timer cut the socket: whatever httpx saw, it was the timeout.
                if deadline.passed() and not isinstance(exc, httpx.TimeoutException):
                    raise httpx.ReadTimeout("the webhook timeout passed", request=request) from exc
                raise
        return answer


def _drain(response: httpx.Response, deadline: Deadline) -> None:
    """Read a small answer to its end, so the connection closes cleanly (closing a socket with
    unread data sends the receiver a reset); a large or slow answer is left unread."""
    received = 0
    try:
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > MAX_ANSWER_BYTES or deadline.passed():
                return
    except httpx.HTTPError:
        pass  # the status is known; the rest of the answer does not matter


def delivery_id(job_id: int, event: str) -> str:
    """Stable per event, so consumers can dedupe every attempt of one delivery."""
    return f"msg_{job_id}_{event}"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After in seconds or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...]
    """Waits before retries 1..n: a delivery makes at most len(delays) + 1 attempts."""
    jitter: float = JITTER
    uniform: Callable[[float, float], float] = random.uniform

    def next_delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds from failed attempt `attempt` to the next one; None when it was the last.

        A receiver's Retry-After (429/503) replaces the scheduled wait, without jitter, bounded
        by the schedule's longest wait so a receiver cannot park a delivery for days."""
        if attempt > len(self.delays):
            return None
        if retry_after is not None:
            return min(retry_after, max(self.delays))
        return self.delays[attempt - 1] * self.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class Outcome:
    attempt: int
    status: WebhookStatus
    """`pending` when another attempt is scheduled, else `sent` or `failed`."""
    retry_at: float | None = None
    record: dict[str, Any] | None = None
    again: bool = False
    """True when `retry_at` is when to look at this same attempt again (another dispatcher's
    claim on it was live), not when the next attempt is due."""


Schedule = Callable[[int, int, float], None]
"""schedule(job_id, attempt, due_at): have the dispatcher run that attempt at `due_at`."""


WEBHOOK_OUTCOMES = ("delivered", "retry", "failed", "refused", "timeout")


def webhook_outcome(code: int | None, error: str | None, will_retry: bool) -> str:
    """The outcome label of one webhook attempt: `delivered` (2xx), `refused` (the outbound
    guard or an invalid URL), `timeout`, else `retry` when another attempt is scheduled and
    `failed` when none is (the schedule is spent, 410 Gone, a replay)."""
    if code is not None and 200 <= code < 300:
        return "delivered"
    if error is not None and error.startswith("refused"):
        return "refused"
    if error == "timeout":
        return "timeout"
    return "retry" if will_retry else "failed"


def no_secrets(owner: str, now: float) -> list[str]:
    return []


class WebhookDispatcher:
    def __init__(
        self,
        *,
        jobs: JobStore,
        sender: WebhookSender,
        policy: RetryPolicy = RetryPolicy(()),
        secrets: Callable[[str, float], Sequence[str]] = no_secrets,
        schedule: Schedule | None = None,
        allow: Iterable[Network] = (),
        lease_seconds: float = 70.0,
        present: Callable[[str], str] = str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_attempt: Callable[[str], None] | None = None,
    ) -> None:
        """`present`: `ObjectStore.present`, so a private bucket's links are presigned at each
        attempt and a late retry still carries links valid for their whole lifetime.
        `on_attempt(outcome)` hears of every attempt made (`workers.metrics.webhook_outcome`)."""
        self._on_attempt = on_attempt
        self._jobs = jobs
        self._present = present
        self._sender = sender
        self._policy = policy
        self._secrets = secrets
        self._schedule = schedule
        self._allow = list(allow)
        self._lease = lease_seconds
        self._clock = clock
        self._monotonic = monotonic

    def handle(self, job_id: int, attempt: int = 1, due_at: float | None = None) -> Outcome | None:
        """One broker message: wait more (re-publish), or make the attempt and schedule the next."""
        with logs.bound(job_id=job_id):
            return self._handle(job_id, attempt, due_at)

    def _handle(self, job_id: int, attempt: int, due_at: float | None) -> Outcome | None:
        if due_at is not None and due_at - self._clock() > EARLY_TOLERANCE_SECONDS:
            self._reschedule(job_id, attempt, due_at)
            return None
        outcome = self.deliver(job_id, attempt)
        if outcome is not None and outcome.retry_at is not None:
            following = outcome.attempt if outcome.again else outcome.attempt + 1
            self._reschedule(job_id, following, outcome.retry_at)
        return outcome

    def deliver(self, job_id: int, attempt: int = 1) -> Outcome | None:
        """Make attempt `attempt` of the job's delivery, once; None when there is nothing to do."""
        job = self._deliverable(job_id)
        if job is None:
            return None
        with logs.bound(job_id=job_id, model_id=job.model_id, key_name=job.owner_name):
            if not self._jobs.claim_webhook_attempt(job_id, attempt, lease_seconds=self._lease):
                return self._overdue(job, attempt)
            return self._attempt(job, attempt, retries=True)

    def replay(self, job_id: int) -> Outcome | None:
        """The operator's re-send of the job's last event: one attempt, the same webhook-id, a
        new timestamp and signature. It ends any retries still waiting for that delivery."""
        job = self._deliverable(job_id)
        if job is None:
            return None
        attempt = self._jobs.webhook_attempt_count(job_id) + 1
        with logs.bound(job_id=job_id, model_id=job.model_id, key_name=job.owner_name):
            if not self._jobs.claim_webhook_attempt(job_id, attempt, lease_seconds=self._lease):
                return None
            return self._attempt(job, attempt, retries=False)

    def _deliverable(self, job_id: int) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None or not job.webhook or not job.status.is_terminal():
            log.info("job %s: no webhook to deliver", job_id)
            return None
        return job

    def _overdue(self, job: JobRecord, attempt: int) -> Outcome | None:
        """A message whose attempt is already done or in flight: a duplicate, dropped. Unless it
        is the redelivery of an attempt whose successor was due long ago and never ran (the
        dispatcher died between recording it and publishing the next): then schedule that now.
        And a message whose attempt is claimed but not recorded looks again later."""
        if job.webhook_status is not WebhookStatus.PENDING:
            return None
        count = self._jobs.webhook_attempt_count(job.id)
        if count == attempt - 1:
            # In flight in another dispatcher, or its dispatcher died mid-attempt and this is its
            # message back (RabbitMQ requeues it at once; Redis after the visibility timeout,
            # which can be shorter than the claim). Dropping it would lose the delivery in the
            # second case: look again once the claim has lapsed, when the attempt is recorded
            # (this copy is then dropped) or free to claim.
            wait = self._lease + 1
            log.info(
                "job %s: webhook attempt %s is claimed by another dispatcher; looking again in "
                "%.0f s",
                job.id,
                attempt,
                wait,
            )
            return Outcome(
                attempt, WebhookStatus.PENDING, retry_at=self._clock() + wait, again=True
            )
        if count != attempt:
            return None
        last = self._jobs.webhook_attempts(job.id)[-1]
        next_at = last.get("next_at")
        if next_at is None or self._clock() < next_at + self._lease:
            return None
        log.warning("job %s: webhook attempt %s was lost; scheduling it", job.id, attempt + 1)
        return Outcome(attempt, WebhookStatus.PENDING, retry_at=self._clock())

    def _attempt(self, job: JobRecord, attempt: int, *, retries: bool) -> Outcome:
        now = self._clock()
        message_id = delivery_id(job.id, job.status.value)
        body = json.dumps(webhook_body(job, now, self._present), separators=(",", ":")).encode()
        timestamp = int(now)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
        }
        signing = list(self._secrets(job.owner, now))
        if signing:
            headers["webhook-signature"] = signature_header(signing, message_id, timestamp, body)
        else:
            log.warning("job %s: its key has no webhook secret; sending unsigned", job.id)

        started = self._monotonic()
        code, error, retry_after = self._send(job.id, Delivery(job.webhook or "", body, headers))
        record: dict[str, Any] = {
            "attempt": attempt,
            "at": round(now, 3),
            "webhook_id": message_id,
            "status_code": code,
            "error": error,
            "duration": round(self._monotonic() - started, 3),
        }
        if not retries:
            record["replay"] = True

        retry_in = None
        if code is not None and 200 <= code < 300:
            status = WebhookStatus.SENT
        elif code == 410 or not retries:
            status = WebhookStatus.FAILED  # 410 Gone: the receiver asks for no more attempts
        else:
            honoured = retry_after if code in (429, 503) else None
            retry_in = self._policy.next_delay(attempt, honoured)
            status = WebhookStatus.FAILED if retry_in is None else WebhookStatus.PENDING
        retry_at = None if retry_in is None else self._clock() + retry_in
        if retry_at is not None:
            record["next_at"] = round(retry_at, 3)
        self._jobs.record_webhook_attempt(job.id, record, status)
        if self._on_attempt is not None:
            outcome = webhook_outcome(code, error, will_retry=retry_at is not None)
            try:
                self._on_attempt(outcome)
            except Exception:  # a metric: never worth the delivery's bookkeeping
                log.warning("webhook attempt metric failed", exc_info=True)
        log.info(
            "job %s: webhook attempt %s: %s -> %s", job.id, attempt, code or error, status.value
        )
        return Outcome(attempt, status, retry_at, record)

    def _send(self, job_id: int, delivery: Delivery) -> tuple[int | None, str | None, float | None]:
        """(status code, error, Retry-After seconds) of one POST."""
        # Refused on its face without a DNS lookup; the sender checks what the name resolves to
        # when it connects.
        refusal = early_refusal(delivery.url, self._allow)
        if refusal is not None:
            return None, f"refused: {refusal}", None
        try:
            response = self._sender.send(delivery)
        except BlockedUrl as exc:
            return None, f"refused: {exc}", None
        except httpx.InvalidURL:  # not an HTTPError: raised while building the request
            return None, "refused: the URL is not valid", None
        except httpx.TimeoutException:
            return None, "timeout", None
        except httpx.HTTPError as exc:
            return None, type(exc).__name__, None
        if 300 <= response.status < 400:
            log.warning("job %s: webhook answered a redirect, which is not followed", job_id)
        return response.status, None, parse_retry_after(response.retry_after, self._clock())

    def _reschedule(self, job_id: int, attempt: int, due_at: float) -> None:
        if self._schedule is None:
            raise RuntimeError("this dispatcher cannot schedule retries")
        self._schedule(job_id, attempt, due_at)


def celery_schedule(app: Any, task_name: str, queue: str, clock: Callable[[], float]) -> Schedule:
    """Publish (job id, attempt, due time) with a countdown of at most `MAX_HOLD_SECONDS`."""

    def schedule(job_id: int, attempt: int, due_at: float) -> None:
        countdown = min(max(0.0, due_at - clock()), MAX_HOLD_SECONDS)
        app.send_task(task_name, args=[job_id, attempt, due_at], countdown=countdown, queue=queue)

    return schedule


def dispatcher_from_settings(
    settings: Settings,
    client: redis.Redis,
    jobs: JobStore,
    schedule: Schedule | None = None,
    on_attempt: Callable[[str], None] | None = None,
) -> WebhookDispatcher:
    """The dispatcher of a deployment: signing secrets from the API keys, its timeout, retry
    schedule, claim lease and outbound allowlist. Without `schedule` it makes single attempts
    (an operator's replay)."""
    from storage.apikeys import ApiKeyStore
    from storage.objects import open_object_store

    api_keys = ApiKeyStore(client)
    allow = parse_cidrs(settings.outbound_allow_cidrs)

    def signing_secrets(owner: str, now: float) -> list[str]:
        found = api_keys.webhook_secrets(owner)
        return found.signing(now) if found else []

    return WebhookDispatcher(
        jobs=jobs,
        sender=HttpWebhookSender(settings.webhook_timeout_seconds, allow),
        policy=RetryPolicy(settings.webhook_retry_delays),
        secrets=signing_secrets,
        schedule=schedule,
        allow=allow,
        lease_seconds=attempt_lease_seconds(settings.webhook_timeout_seconds),
        # Only a private bucket changes links; a public one needs no store in this process.
        present=(
            open_object_store(settings).present if settings.output_links == "presigned" else str
        ),
        on_attempt=on_attempt,
    )
