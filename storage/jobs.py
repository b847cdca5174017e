"""The job record and its state machine, kept in Redis.

Every status write goes through one Lua compare-and-set script here: a transition names the states
it may leave from, and Redis refuses it atomically when the record is elsewhere. Terminal states
absorb. No other module writes a status.

    queued ──> processing ──> success
       │          │  ↺ (a redelivered message claims the job again)
       └──────────┴──────> failed
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis

from storage import keys


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCESS, JobStatus.FAILED)


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING, JobStatus.FAILED}),
    # processing -> processing: the broker redelivered the message (worker lost); the job is claimed
    # again and its attempt counter grows.
    JobStatus.PROCESSING: frozenset(
        {JobStatus.PROCESSING, JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCESS: frozenset(),
    JobStatus.FAILED: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """The states from which `target` may be entered."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


class WebhookStatus(StrEnum):
    """Delivery state of a job's webhook, shown as `webhook_status` in fetch."""

    NONE = ""
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class NewJob:
    """What the API hands to the store when it accepts a request."""

    owner: str
    model_id: str
    kind: str
    params: dict[str, Any]
    meta: dict[str, Any]
    file_prefix: str
    future_links: list[str]
    predicted_seconds: float
    eta_seconds: float
    webhook: str | None = None
    track_id: Any = None


@dataclass(frozen=True)
class JobRecord:
    id: int
    status: JobStatus
    owner: str
    model_id: str
    kind: str
    params: dict[str, Any]
    meta: dict[str, Any]
    file_prefix: str
    future_links: list[str]
    created_at: float
    updated_at: float
    eta_at: float
    predicted_seconds: float
    webhook: str | None = None
    track_id: Any = None
    started_at: float | None = None
    finished_at: float | None = None
    output: list[str] = field(default_factory=list)
    generation_time: float | None = None
    error: str | None = None
    attempts: int = 0
    webhook_status: WebhookStatus = WebhookStatus.NONE

    def remaining_seconds(self, now: float) -> float:
        """Seconds until the output is expected: from the submission estimate while queued,
        from the start and the predicted run time once a worker runs it."""
        finish = self.eta_at
        if self.status is JobStatus.PROCESSING and self.started_at is not None:
            finish = self.started_at + self.predicted_seconds
        return max(0.0, round(finish - now, 2))


_JSON_FIELDS = ("params", "meta", "future_links", "output", "track_id")
_FLOAT_FIELDS = ("created_at", "updated_at", "eta_at", "predicted_seconds")
_OPTIONAL_FLOAT_FIELDS = ("started_at", "finished_at", "generation_time")


def _encode(values: dict[str, Any]) -> list[str]:
    """Flatten fields into HSET arguments; JSON for structured values, '' for None."""
    flat: list[str] = []
    for name, value in values.items():
        if name in _JSON_FIELDS:
            text = json.dumps(value, separators=(",", ":"))
        elif value is None:
            text = ""
        else:
            text = str(value)
        flat += [name, text]
    return flat


def decode(raw: dict[str, str]) -> JobRecord:
    """Build a JobRecord from HGETALL output (decoded strings)."""

    def opt_float(name: str) -> float | None:
        return float(raw[name]) if raw.get(name) else None

    return JobRecord(
        id=int(raw["id"]),
        status=JobStatus(raw["status"]),
        owner=raw["owner"],
        model_id=raw["model_id"],
        kind=raw["kind"],
        params=json.loads(raw["params"]),
        meta=json.loads(raw["meta"]),
        file_prefix=raw["file_prefix"],
        future_links=json.loads(raw["future_links"]),
        created_at=float(raw["created_at"]),
        updated_at=float(raw["updated_at"]),
        eta_at=float(raw["eta_at"]),
        predicted_seconds=float(raw["predicted_seconds"]),
        webhook=raw.get("webhook") or None,
        track_id=json.loads(raw["track_id"]) if raw.get("track_id") else None,
        started_at=opt_float("started_at"),
        finished_at=opt_float("finished_at"),
        output=json.loads(raw["output"]) if raw.get("output") else [],
        generation_time=opt_float("generation_time"),
        error=raw.get("error") or None,
        attempts=int(raw.get("attempts") or 0),
        webhook_status=WebhookStatus(raw.get("webhook_status", "")),
    )


# KEYS: seq, active set. ARGV: job key prefix, then field/value pairs. Returns the new id.
_CREATE = """
local id = redis.call('INCR', KEYS[1])
local key = ARGV[1] .. id
redis.call('HSET', key, 'id', id, 'status', 'queued', unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], id, id)
return id
"""

# KEYS: job key, active set. ARGV: new status, allowed sources (space separated), terminal flag,
# ttl seconds, events channel, attempts increment, then field/value pairs.
# Returns {1, previous} when applied, {0, current} when refused, {0, ''} when the job is unknown.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if not string.find(' ' .. ARGV[2] .. ' ', ' ' .. cur .. ' ', 1, true) then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 7))
if ARGV[6] ~= '0' then redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[6]) end
if ARGV[3] == '1' then
  local id = redis.call('HGET', KEYS[1], 'id')
  redis.call('ZREM', KEYS[2], id)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('PUBLISH', ARGV[5], id .. ' ' .. ARGV[1])
end
return {1, cur}
"""

# KEYS: job key. ARGV: status, events channel. Sets the webhook status of a job that exists and
# announces it as '<id> webhook_<status>'.
_SET_WEBHOOK_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'webhook_status', ARGV[1])
redis.call('PUBLISH', ARGV[2], redis.call('HGET', KEYS[1], 'id') .. ' webhook_' .. ARGV[1])
return 1
"""

# KEYS: job key. ARGV: attempt number n, now, lease seconds. Claims webhook attempt n once: only
# when n - 1 attempts are recorded and no live claim on n exists (a claim older than the lease was
# left by a dispatcher that died mid-attempt). Stops duplicate messages from sending twice.
_CLAIM_WEBHOOK_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'webhook_attempt_count') or '0') ~= n - 1 then return 0 end
local claim = redis.call('HGET', KEYS[1], 'webhook_claim')
if claim then
  local cn, cat = string.match(claim, '^(%d+) (.+)$')
  if tonumber(cn) == n and tonumber(ARGV[2]) - tonumber(cat) < tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], 'webhook_claim', ARGV[1] .. ' ' .. ARGV[2])
return 1
"""

# KEYS: job key. ARGV: attempt (a JSON object), its number, webhook status, events channel.
# Appends the attempt to the JSON array `webhook_attempts` (string surgery: no cjson needed), sets
# the webhook status and announces it as '<id> webhook_<status>'.
_RECORD_WEBHOOK_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local list = redis.call('HGET', KEYS[1], 'webhook_attempts')
if not list or list == '' then
  list = '[' .. ARGV[1] .. ']'
else
  list = string.sub(list, 1, -2) .. ',' .. ARGV[1] .. ']'
end
local count = tonumber(redis.call('HGET', KEYS[1], 'webhook_attempt_count') or '0')
if tonumber(ARGV[2]) > count then count = tonumber(ARGV[2]) end
redis.call('HSET', KEYS[1], 'webhook_attempts', list, 'webhook_attempt_count', count,
  'webhook_status', ARGV[3])
redis.call('HDEL', KEYS[1], 'webhook_claim')
redis.call('PUBLISH', ARGV[4], redis.call('HGET', KEYS[1], 'id') .. ' webhook_' .. ARGV[3])
return 1
"""


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    previous: JobStatus | None
    """The status before a transition that was applied, or the current one of a refused one."""


def _transition_args(
    target: JobStatus, ttl: int, attempts: int, fields: dict[str, Any], now: float
) -> list[Any]:
    sources = " ".join(sorted(sources_of(target)))
    flat = _encode({"updated_at": now, **fields})
    return [
        target.value,
        sources,
        "1" if target.is_terminal() else "0",
        ttl,
        keys.JOB_EVENTS,
        attempts,
        *flat,
    ]


def _result(reply: list[Any]) -> TransitionResult:
    applied, status = int(reply[0]), _text(reply[1])
    return TransitionResult(bool(applied), JobStatus(status) if status else None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _new_job_fields(job: NewJob, now: float) -> dict[str, Any]:
    return {
        "owner": job.owner,
        "model_id": job.model_id,
        "kind": job.kind,
        "params": job.params,
        "meta": job.meta,
        "file_prefix": job.file_prefix,
        "future_links": job.future_links,
        "webhook": job.webhook,
        "track_id": job.track_id,
        "created_at": now,
        "updated_at": now,
        "eta_at": now + job.eta_seconds,
        "predicted_seconds": job.predicted_seconds,
        "attempts": 0,
        "webhook_status": WebhookStatus.PENDING if job.webhook else WebhookStatus.NONE,
    }


class JobStore:
    """Synchronous job store: workers, the dispatcher and the CLI."""

    def __init__(
        self, client: redis.Redis, *, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._r = client
        self._ttl = ttl_seconds
        self._clock = clock
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._set_webhook = client.register_script(_SET_WEBHOOK_STATUS)
        self._claim_webhook = client.register_script(_CLAIM_WEBHOOK_ATTEMPT)
        self._record_webhook = client.register_script(_RECORD_WEBHOOK_ATTEMPT)

    def create(self, job: NewJob) -> int:
        args = [keys.job(0)[:-1], *_encode(_new_job_fields(job, self._clock()))]
        return int(self._create(keys=[keys.JOB_SEQ, keys.ACTIVE_JOBS], args=args))

    def get(self, job_id: int) -> JobRecord | None:
        raw = self._r.hgetall(keys.job(job_id))
        return decode(_decode_hash(raw)) if raw else None

    def transition(
        self, job_id: int, target: JobStatus, *, attempts: int = 0, **fields: Any
    ) -> TransitionResult:
        args = _transition_args(target, self._ttl, attempts, fields, self._clock())
        return _result(self._transition(keys=[keys.job(job_id), keys.ACTIVE_JOBS], args=args))

    def claim(self, job_id: int) -> JobRecord | None:
        """Move a delivered job to processing. None when it is terminal or unknown."""
        result = self.transition(job_id, JobStatus.PROCESSING, attempts=1, started_at=self._clock())
        return self.get(job_id) if result.applied else None

    def succeed(
        self,
        job_id: int,
        *,
        output: list[str],
        generation_time: float,
        meta: dict[str, Any] | None = None,
    ) -> bool:
        """Finish a job; ``meta`` replaces the echo when the run learnt more (the size taken
        from an init image, a translated prompt)."""
        now = self._clock()
        fields: dict[str, Any] = {} if meta is None else {"meta": meta}
        return self.transition(
            job_id,
            JobStatus.SUCCESS,
            output=output,
            generation_time=round(generation_time, 3),
            finished_at=now,
            eta_at=now,
            **fields,
        ).applied

    def fail(self, job_id: int, message: str) -> bool:
        now = self._clock()
        return self.transition(
            job_id, JobStatus.FAILED, error=message, finished_at=now, eta_at=now
        ).applied

    def set_webhook_status(self, job_id: int, status: WebhookStatus) -> bool:
        args = [status.value, keys.JOB_EVENTS]
        return bool(self._set_webhook(keys=[keys.job(job_id)], args=args))

    def webhook_attempt_count(self, job_id: int) -> int:
        return int(self._r.hget(keys.job(job_id), "webhook_attempt_count") or 0)

    def claim_webhook_attempt(self, job_id: int, attempt: int, *, lease_seconds: float) -> bool:
        """True once per attempt number (again after `lease_seconds`, when its claimer died)."""
        args = [attempt, self._clock(), lease_seconds]
        return bool(self._claim_webhook(keys=[keys.job(job_id)], args=args))

    def record_webhook_attempt(
        self, job_id: int, attempt: dict[str, Any], status: WebhookStatus
    ) -> bool:
        """Append one attempt (its number under "attempt") and set the delivery's status."""
        text = json.dumps(attempt, separators=(",", ":"))
        args = [text, attempt["attempt"], status.value, keys.JOB_EVENTS]
        return bool(self._record_webhook(keys=[keys.job(job_id)], args=args))

    def webhook_attempts(self, job_id: int) -> list[dict[str, Any]]:
        raw = self._r.hget(keys.job(job_id), "webhook_attempts")
        attempts: list[dict[str, Any]] = json.loads(raw) if raw else []
        return attempts

    def active_ids(self) -> list[int]:
        """Ids of jobs not yet terminal, oldest first (the reconciler's and operators' view)."""
        return [int(_text(i)) for i in self._r.zrange(keys.ACTIVE_JOBS, 0, -1)]


class AsyncJobStore:
    """The API's asyncio view: create, read, and fail what it could not queue."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r = client
        self._ttl = ttl_seconds
        self._clock = clock
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)

    async def create(self, job: NewJob) -> int:
        args = [keys.job(0)[:-1], *_encode(_new_job_fields(job, self._clock()))]
        return int(await self._create(keys=[keys.JOB_SEQ, keys.ACTIVE_JOBS], args=args))

    async def get(self, job_id: int) -> JobRecord | None:
        raw = await self._r.hgetall(keys.job(job_id))
        return decode(_decode_hash(raw)) if raw else None

    async def fail(self, job_id: int, message: str) -> bool:
        now = self._clock()
        args = _transition_args(
            JobStatus.FAILED,
            self._ttl,
            0,
            {"error": message, "finished_at": now, "eta_at": now},
            now,
        )
        reply = await self._transition(keys=[keys.job(job_id), keys.ACTIVE_JOBS], args=args)
        return _result(reply).applied
