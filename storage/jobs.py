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
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import redis
import redis.asyncio as aioredis

from storage import keys
from storage.wire import Command, RedisPyWire, Script, Wire, pairs


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
    queue: str = ""
    """The broker queue its message goes to: the reconciler of that queue's deployment
    re-drives it, no other."""
    owner_name: str = ""
    """The owner key's name (never the key): workers log it on the job's lines."""
    level: int = 0
    """Its priority level (dreamq/lanes.py): 0 is served first."""
    batch_key: str = ""
    """Jobs with the same non-empty key (model included) can share one pipeline call
    (`JobParams.batch_key`)."""
    samples: int = 1
    """Images it asks for: what it adds to a shared call's batch."""


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
    pipeline_time: float | None = None
    """Of `generation_time`, the seconds inside the pipeline calls alone (worker-side figures;
    never on the wire)."""
    error: str | None = None
    attempts: int = 0
    webhook_status: WebhookStatus = WebhookStatus.NONE
    queue: str = ""
    owner_name: str = ""
    level: int = 0
    batch_key: str = ""
    samples: int = 1

    def remaining_seconds(self, now: float) -> float:
        """Seconds until the output is expected: from the submission estimate while queued,
        from the start and the predicted run time once a worker runs it."""
        finish = self.eta_at
        if self.status is JobStatus.PROCESSING and self.started_at is not None:
            finish = self.started_at + self.predicted_seconds
        return max(0.0, round(finish - now, 2))


_JSON_FIELDS = ("params", "meta", "future_links", "output", "track_id")
_FLOAT_FIELDS = ("created_at", "updated_at", "eta_at", "predicted_seconds")
_OPTIONAL_FLOAT_FIELDS = ("started_at", "finished_at", "generation_time", "pipeline_time")


_COMPACT = json.JSONEncoder(separators=(",", ":"))
"""`json.dumps(value, separators=...)` builds an encoder on every call: one, built once."""


def _encode(values: dict[str, Any]) -> list[str]:
    """Flatten fields into HSET arguments; JSON for structured values, '' for None."""
    flat: list[str] = []
    for name, value in values.items():
        if name in _JSON_FIELDS:
            text = _COMPACT.encode(value)
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
        pipeline_time=opt_float("pipeline_time"),
        error=raw.get("error") or None,
        attempts=int(raw.get("attempts") or 0),
        webhook_status=WebhookStatus(raw.get("webhook_status", "")),
        queue=raw.get("queue", ""),
        owner_name=raw.get("owner_name", ""),
        level=int(raw.get("level") or 0),
        batch_key=raw.get("batch_key", ""),
        samples=int(raw.get("samples") or 1),
    )


# KEYS: seq, active set, the owner's unfinished set, then, to publish in the same step, the
# broker list and the queue's two binding sets. ARGV: job key prefix, cap on the owner's
# unfinished jobs ('' for none), now, job ttl, predicted run seconds, priority level, the binding
# member and the message's three parts around its job id (all '' when not publishing), then
# field/value pairs.
# Returns the new id, or -1 when the owner already has `cap` unfinished jobs: the check and the
# insert are one step, so the cap holds across API processes. An entry older than the ttl is
# dropped first: a record lost without its terminal transition (a Redis restart that kept only
# part of it) must not hold a slot for ever. An id whose record exists (the sequence was lost
# while records survived) is skipped, never overwritten. The job joins the queued set and its
# predicted seconds its level's queued work (the ETA's work ahead) in the same step, and, when
# the broker is this Redis, its message joins the broker's list: a record never waits without
# its message, and the API makes one round trip instead of two.
_CREATE = (
    """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (tonumber(ARGV[3]) - tonumber(ARGV[4])))
if ARGV[2] ~= '' and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[2]) then return -1 end
local id = redis.call('INCR', KEYS[1])
local key = ARGV[1] .. id
while redis.call('EXISTS', key) == 1 do
  id = redis.call('INCR', KEYS[1])
  key = ARGV[1] .. id
end
redis.call('HSET', key, 'id', id, 'status', 'queued', unpack(ARGV, 11))
redis.call('ZADD', KEYS[2], id, id)
redis.call('ZADD', KEYS[3], ARGV[3], id)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('ZADD', '$QUEUED', tonumber(ARGV[6]) * $SPAN + id, id)
redis.call('HINCRBYFLOAT', '$WORK', ARGV[6], ARGV[5])
if #KEYS > 3 then
  redis.call('SADD', KEYS[5], ARGV[7])
  redis.call('SADD', KEYS[6], ARGV[7])
  redis.call('LPUSH', KEYS[4], ARGV[8] .. id .. ARGV[9] .. id .. ARGV[10])
end
return id
""".replace("$QUEUED", keys.QUEUED_JOBS)
    .replace("$WORK", keys.QUEUED_WORK)
    .replace("$SPAN", str(keys.LEVEL_SPAN))
)
_CREATE_SCRIPT = Script(_CREATE)

# KEYS: job key, active set, lease key, pending webhooks. ARGV: new status, allowed sources (space
# separated), terminal flag, ttl seconds, events channel, attempts increment, lease op, lease token
# (or owner prefix), lease seconds, attempts cap ('' for none), now, then field/value pairs.
# Lease ops: 'take' refuses a job whose lease someone holds and (with a token) takes it; 'hold'
# applies only for the holder; 'owner' for a holder whose token starts with the prefix (or no
# holder); 'free' only when nobody holds it. A terminal state deletes the lease and, when the job
# has a webhook to deliver, indexes the delivery as pending (due now) for the reconciler.
# Returns {1, previous} when applied, {0, current} when refused, {0, ''} when the job is unknown,
# {-1, current} when the lease refuses it, {-2, current} when the attempts are used up. A terminal
# state also frees the job's slot in its owner's unfinished set, whose name is built here from the
# record's owner (the caller knows only the id). Leaving `queued` takes the job out of the queued
# set and its predicted seconds out of the queued work (entering it puts them back); entering
# `processing` indexes the job as running, due to end at now + its predicted seconds; any other
# state takes it out of the running set.
_TRANSITION = (
    """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if not string.find(' ' .. ARGV[2] .. ' ', ' ' .. cur .. ' ', 1, true) then return {0, cur} end
local op, token, holder = ARGV[7], ARGV[8], redis.call('GET', KEYS[3])
if op == 'hold' then
  if holder ~= token then return {-1, cur} end
elseif op == 'owner' then
  if holder and string.sub(holder, 1, #token) ~= token then return {-1, cur} end
elseif holder then
  return {-1, cur}
end
local done = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[10] ~= '' and done >= tonumber(ARGV[10]) then
  return {-2, cur}
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 12))
if ARGV[6] ~= '0' then redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[6]) end
if op == 'take' and token ~= '' then redis.call('SET', KEYS[3], token, 'EX', ARGV[9]) end
local id = redis.call('HGET', KEYS[1], 'id')
local predicted = tonumber(redis.call('HGET', KEYS[1], 'predicted_seconds') or '0') or 0
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0') or 0
if cur == 'queued' and ARGV[1] ~= 'queued' then
  if redis.call('ZREM', '$QUEUED', id) == 1 then
    local left = tonumber(redis.call('HINCRBYFLOAT', '$WORK', level, -predicted))
    local first = level * $SPAN
    if left < 0 or redis.call('ZCOUNT', '$QUEUED', first, first + $SPAN - 1) == 0 then
      redis.call('HSET', '$WORK', level, '0')
    end
  end
elseif ARGV[1] == 'queued' and cur ~= 'queued' then
  if redis.call('ZADD', '$QUEUED', level * $SPAN + id, id) == 1 then
    redis.call('HINCRBYFLOAT', '$WORK', level, predicted)
  end
end
if ARGV[1] == 'processing' then
  redis.call('ZADD', '$RUNNING', tonumber(ARGV[11]) + predicted, id)
else
  redis.call('ZREM', '$RUNNING', id)
end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[2], id)
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner then redis.call('ZREM', '$UNFINISHED' .. owner, id) end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  if redis.call('HGET', KEYS[1], 'webhook_status') == 'pending' then
    redis.call('ZADD', KEYS[4], ARGV[11], id)
  end
  redis.call('PUBLISH', ARGV[5], id .. ' ' .. ARGV[1])
end
return {1, cur}
""".replace("$UNFINISHED", keys.UNFINISHED_JOBS_PREFIX)
    .replace("$QUEUED", keys.QUEUED_JOBS)
    .replace("$WORK", keys.QUEUED_WORK)
    .replace("$RUNNING", keys.RUNNING_JOBS)
    .replace("$SPAN", str(keys.LEVEL_SPAN))
)

# KEYS: lease key. ARGV: owner prefix. Deletes the lease when its token starts with the prefix:
# the worker's main process frees the lease of a pool process that died.
_RELEASE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: job key, pending webhooks. ARGV: status, events channel. Sets the webhook status of a job
# that exists and announces it as '<id> webhook_<status>'; a delivery that ended leaves the index.
_SET_WEBHOOK_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'webhook_status', ARGV[1])
if ARGV[1] ~= 'pending' then redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'id')) end
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

# KEYS: job key, pending webhooks. ARGV: attempt (a JSON object), its number, webhook status,
# events channel, when the next attempt is due ('' for none). Appends the attempt to the JSON array
# `webhook_attempts` (string surgery: no cjson needed), sets the webhook status, keeps the pending
# index (due time, or out when the delivery ended) and announces it as '<id> webhook_<status>'.
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
local id = redis.call('HGET', KEYS[1], 'id')
if ARGV[3] == 'pending' and ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], id)
elseif ARGV[3] ~= 'pending' then
  redis.call('ZREM', KEYS[2], id)
end
redis.call('PUBLISH', ARGV[4], id .. ' webhook_' .. ARGV[3])
return 1
"""


# KEYS: active set. ARGV: job key prefix. Counts the active jobs by status: {queued, processing}.
# One pass over the non-terminal jobs, inside Redis (the metrics scrape asks it).
_COUNT_ACTIVE = """
local queued, processing = 0, 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local status = redis.call('HGET', ARGV[1] .. id, 'status')
  if status == 'queued' then queued = queued + 1
  elseif status == 'processing' then processing = processing + 1 end
end
return {queued, processing}
"""

# KEYS: job key, lease key. ARGV: expected status. Counts a re-drive of a job whose broker message
# was lost, only while the job is still in that status and nobody holds its lease. Returns the
# new count, or 0 when the job moved on (a late message reached a worker after all).
_COUNT_REDRIVE = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'redrives', 1)
"""


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    previous: JobStatus | None
    """The status before a transition that was applied, or the current one of a refused one."""
    leased: bool = False
    """Refused because another worker process holds the job's lease."""
    exhausted: bool = False
    """Refused because the job used up its attempts."""


@dataclass(frozen=True)
class Lease:
    """How a transition treats the job's lease (see the _TRANSITION script)."""

    op: Literal["take", "hold", "owner", "free"] = "free"
    token: str = ""
    seconds: int = 0
    max_attempts: int | None = None


FREE = Lease()


def lease_owner(pid: int, host: str | None = None) -> str:
    """The prefix of every lease token taken by process `pid` of this host: the worker's main
    process knows it for the pool process it lost."""
    return f"{host or socket.gethostname()}:{pid}:"


def new_lease_token() -> str:
    return lease_owner(os.getpid()) + secrets.token_hex(8)


def _transition_args(
    target: JobStatus,
    ttl: int,
    attempts: int,
    fields: dict[str, Any],
    now: float,
    lease: Lease = FREE,
) -> list[Any]:
    sources = " ".join(sorted(sources_of(target)))
    flat = _encode({"updated_at": now, **fields})
    cap = "" if lease.max_attempts is None else str(lease.max_attempts)
    return [
        target.value,
        sources,
        "1" if target.is_terminal() else "0",
        ttl,
        keys.JOB_EVENTS,
        attempts,
        lease.op,
        lease.token,
        lease.seconds,
        cap,
        now,
        *flat,
    ]


def _transition_keys(job_id: int) -> list[str]:
    return [keys.job(job_id), keys.ACTIVE_JOBS, keys.job_lease(job_id), keys.WEBHOOKS_PENDING]


def _result(reply: list[Any]) -> TransitionResult:
    code, status = int(reply[0]), _text(reply[1])
    return TransitionResult(
        code == 1, JobStatus(status) if status else None, leased=code == -1, exhausted=code == -2
    )


@dataclass(frozen=True)
class ActiveJob:
    id: int
    status: JobStatus


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    LEASED = "leased"
    """Another worker process runs the job: this delivery is a duplicate and exits."""
    EXHAUSTED = "exhausted"
    """This delivery found the attempts used up and failed the job."""
    GONE = "gone"
    """Unknown or already terminal."""


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: JobRecord | None = None
    """The record after the claim (CLAIMED, EXHAUSTED)."""
    lease_left: float = 0.0
    """LEASED: seconds until the holder's lease expires, when the delivery should look again
    (its holder may have died without anyone freeing it)."""


def attempts_exhausted_message(attempts: int) -> str:
    return f"The job failed {attempts} times; it was stopped."


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_of(raw: dict[Any, Any] | list[Any]) -> JobRecord | None:
    """The record a job hash's HGETALL reply holds (None: no such job)."""
    return decode(_decode_hash(pairs(raw))) if raw else None


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
        "queue": job.queue,
        "owner_name": job.owner_name,
        "level": job.level,
        "batch_key": job.batch_key,
        "samples": job.samples,
    }


class UnfinishedCapReached(Exception):
    """The owner already has `cap` queued or processing jobs; nothing was created."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"{cap} unfinished jobs")
        self.cap = cap


@dataclass(frozen=True, slots=True)
class BrokerMessage:
    """A job's broker message, for the create step to push with the record (a Redis broker
    that is the job Redis): the list it goes to, the queue's binding, and the message's text
    around the job id, which appears in it twice (the task's arguments and their repr)."""

    list_name: str
    binding_sets: tuple[str, str]
    binding_member: str
    parts: tuple[str, str, str]
    """Before, between and after the id: the create script writes `before id between id after`."""


def _create_call(
    job: NewJob,
    now: float,
    ttl: int,
    max_unfinished: int | None,
    message: BrokerMessage | None = None,
) -> tuple[list[str], list[Any]]:
    keys_ = [keys.JOB_SEQ, keys.ACTIVE_JOBS, keys.unfinished_jobs(job.owner)]
    cap = "" if max_unfinished is None else str(max_unfinished)
    fields = _encode(_new_job_fields(job, now))
    publish: list[str] = ["", "", "", ""]
    if message is not None:
        keys_ += [message.list_name, *message.binding_sets]
        publish = [message.binding_member, *message.parts]
    args = [keys.job(0)[:-1], cap, now, ttl, job.predicted_seconds, job.level, *publish, *fields]
    return keys_, args


def _created(reply: Any, max_unfinished: int | None) -> int:
    job_id = int(reply)
    if job_id < 0:
        assert max_unfinished is not None
        raise UnfinishedCapReached(max_unfinished)
    return job_id


def _held(token: str | None) -> Lease:
    return FREE if token is None else Lease("hold", token)


class JobStore:
    """Synchronous job store: workers, the dispatcher and the CLI."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int,
        lease_seconds: int = 900,
        max_attempts: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r = client
        self._ttl = ttl_seconds
        self._lease_seconds = lease_seconds
        self._max_attempts = max_attempts
        self._clock = clock
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._set_webhook = client.register_script(_SET_WEBHOOK_STATUS)
        self._release = client.register_script(_RELEASE_LEASE)
        self._claim_webhook = client.register_script(_CLAIM_WEBHOOK_ATTEMPT)
        self._record_webhook = client.register_script(_RECORD_WEBHOOK_ATTEMPT)
        self._count_redrive = client.register_script(_COUNT_REDRIVE)

    def create(self, job: NewJob, *, max_unfinished: int | None = None) -> int:
        """Persist a queued job. With `max_unfinished`, raises UnfinishedCapReached instead when
        its owner already has that many queued or processing jobs."""
        keys_, args = _create_call(job, self._clock(), self._ttl, max_unfinished)
        return _created(self._create(keys=keys_, args=args), max_unfinished)

    def get(self, job_id: int) -> JobRecord | None:
        return record_of(self._r.hgetall(keys.job(job_id)))

    def unfinished(self, owner: str) -> list[int]:
        """Ids of the owner's queued and processing jobs (what its cap counts), oldest first."""
        return [int(_text(i)) for i in self._r.zrange(keys.unfinished_jobs(owner), 0, -1)]

    def transition(
        self,
        job_id: int,
        target: JobStatus,
        *,
        attempts: int = 0,
        lease: Lease = FREE,
        **fields: Any,
    ) -> TransitionResult:
        args = _transition_args(target, self._ttl, attempts, fields, self._clock(), lease)
        return _result(self._transition(keys=_transition_keys(job_id), args=args))

    def claim(self, job_id: int) -> JobRecord | None:
        """Move a delivered job to processing without a lease. None when it is not claimed."""
        claim = self.acquire(job_id, "")
        return claim.job if claim.outcome is ClaimOutcome.CLAIMED else None

    def acquire(self, job_id: int, token: str) -> Claim:
        """Claim a delivered job for the process holding `token` (a lease of `lease_seconds`,
        taken atomically with the move to processing, the attempt counted). A job whose lease
        another process holds is left alone; a job out of attempts is failed here, once."""
        now = self._clock()
        reply = self._transition(keys=_transition_keys(job_id), args=self._take(token, now))
        result = _result(reply)
        if result.applied:
            return Claim(ClaimOutcome.CLAIMED, self.get(job_id))
        if result.leased:
            left = int(self._r.pttl(keys.job_lease(job_id)))
            return Claim(ClaimOutcome.LEASED, lease_left=max(left, 0) / 1000)
        if result.exhausted:
            return self.fail_exhausted(job_id)
        return Claim(ClaimOutcome.GONE)

    def _take(self, token: str, now: float) -> list[Any]:
        lease = Lease("take", token, self._lease_seconds, self._max_attempts)
        fields = {"started_at": now}
        return _transition_args(JobStatus.PROCESSING, self._ttl, 1, fields, now, lease)

    def queue_acquire(self, pipe: Any, job_id: int, token: str, now: float) -> None:
        """`acquire`'s transition, queued on `pipe` (storage/claims.py claims several in one
        round trip); its reply is the transition script's."""
        self._transition(keys=_transition_keys(job_id), args=self._take(token, now), client=pipe)

    def fail_exhausted(self, job_id: int) -> Claim:
        """Fail a job whose claim found its attempts used up (once: the claim that applies
        the failure gets EXHAUSTED, any other GONE)."""
        job = self.get(job_id)
        done = job is not None and self.fail(job_id, attempts_exhausted_message(job.attempts))
        return Claim(ClaimOutcome.EXHAUSTED, self.get(job_id)) if done else Claim(ClaimOutcome.GONE)

    def leased_by(self, owner: str) -> dict[int, str]:
        """The running jobs whose lease a token of `owner` (a `lease_owner` prefix) holds, with
        that token: what a pool process that died leaves behind (the jobs it claimed for its
        message, a job whose tail was still storing)."""
        running = [int(_text(i)) for i in self._r.zrange(keys.RUNNING_JOBS, 0, -1)]
        if not running:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for job_id in running:
            pipe.get(keys.job_lease(job_id))
        holders = pipe.execute()
        return {
            job_id: _text(holder)
            for job_id, holder in zip(running, holders, strict=True)
            if holder is not None and _text(holder).startswith(owner)
        }

    def release_lease(self, job_id: int, owner: str) -> bool:
        """Free the job's lease if a token of `owner` (a `lease_owner` prefix) holds it."""
        return bool(self._release(keys=[keys.job_lease(job_id)], args=[owner]))

    def succeed(
        self,
        job_id: int,
        *,
        output: list[str],
        generation_time: float,
        pipeline_time: float | None = None,
        meta: dict[str, Any] | None = None,
        lease: str | None = None,
    ) -> bool:
        """Finish a job; ``meta`` replaces the echo when the run learnt more (the size taken
        from an init image, a translated prompt). With ``lease``, only while that token holds
        the job's lease; without, only while nobody holds it. ``pipeline_time``: the part of
        ``generation_time`` spent inside the pipeline calls (kept in the record only)."""
        now = self._clock()
        fields: dict[str, Any] = {} if meta is None else {"meta": meta}
        if pipeline_time is not None:
            fields["pipeline_time"] = round(pipeline_time, 3)
        return self.transition(
            job_id,
            JobStatus.SUCCESS,
            output=output,
            generation_time=round(generation_time, 3),
            finished_at=now,
            eta_at=now,
            lease=_held(lease),
            **fields,
        ).applied

    def fail(
        self, job_id: int, message: str, *, lease: str | None = None, owner: str | None = None
    ) -> bool:
        """Fail a job: as the holder of ``lease``, as the main process of ``owner`` (a
        `lease_owner` prefix, for a pool process it killed), or while nobody holds the lease."""
        now = self._clock()
        held = Lease("owner", owner) if owner is not None else _held(lease)
        return self.transition(
            job_id, JobStatus.FAILED, lease=held, error=message, finished_at=now, eta_at=now
        ).applied

    def set_webhook_status(self, job_id: int, status: WebhookStatus) -> bool:
        args = [status.value, keys.JOB_EVENTS]
        return bool(self._set_webhook(keys=[keys.job(job_id), keys.WEBHOOKS_PENDING], args=args))

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
        due = attempt.get("next_at")
        args = [text, attempt["attempt"], status.value, keys.JOB_EVENTS, "" if due is None else due]
        return bool(self._record_webhook(keys=[keys.job(job_id), keys.WEBHOOKS_PENDING], args=args))

    def webhook_attempts(self, job_id: int) -> list[dict[str, Any]]:
        raw = self._r.hget(keys.job(job_id), "webhook_attempts")
        attempts: list[dict[str, Any]] = json.loads(raw) if raw else []
        return attempts

    def active_ids(self) -> list[int]:
        """Ids of jobs not yet terminal, oldest first (the reconciler's and operators' view)."""
        return [int(_text(i)) for i in self._r.zrange(keys.ACTIVE_JOBS, 0, -1)]

    def unleased_active(
        self, *, idle_for: float, queue: str | None = None, batch: int = 500
    ) -> list[ActiveJob]:
        """Non-terminal jobs nobody holds a lease on, untouched for `idle_for` seconds (a job
        just accepted may not be published yet), of broker queue `queue` (a record from before
        queues were recorded counts as any): the reconciler's candidates."""
        before = self._clock() - idle_for
        found: list[ActiveJob] = []
        ids = self.active_ids()
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            pipe = self._r.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(keys.job(job_id), "status", "updated_at", "queue")
                pipe.exists(keys.job_lease(job_id))
            replies = pipe.execute()
            for job_id, (status, updated, its_queue), held in zip(
                chunk, replies[::2], replies[1::2], strict=True
            ):
                if status is None or held or float(_text(updated or 0)) > before:
                    continue
                if queue is not None and its_queue and _text(its_queue) != queue:
                    continue
                found.append(ActiveJob(job_id, JobStatus(_text(status))))
        return found

    def count_redrive(self, job_id: int, status: JobStatus) -> int:
        """Count one re-drive of a job still in `status` with no lease; 0 when it moved on."""
        keys_ = [keys.job(job_id), keys.job_lease(job_id)]
        return int(self._count_redrive(keys=keys_, args=[status.value]))

    def webhooks_due(self, *, before: float, limit: int = 10_000) -> list[int]:
        """Jobs whose pending webhook attempt was due before `before`, most overdue first."""
        raw = self._r.zrangebyscore(keys.WEBHOOKS_PENDING, "-inf", before, start=0, num=limit)
        return [int(_text(i)) for i in raw]

    def forget_webhook(self, job_id: int) -> None:
        """Drop a job from the pending-webhook index (its record expired)."""
        self._r.zrem(keys.WEBHOOKS_PENDING, job_id)


class AsyncJobStore:
    """The API's asyncio view: create, read, and fail what it could not queue."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        wire: Wire | None = None,
    ) -> None:
        self._r = client
        self._wire = wire or RedisPyWire(client)
        """The hot path's connection: the create step (api/app.py gives the multiplexed one)."""
        self._ttl = ttl_seconds
        self._clock = clock
        self._transition = client.register_script(_TRANSITION)
        self._count_active = client.register_script(_COUNT_ACTIVE)

    async def active_counts(self) -> dict[JobStatus, int]:
        """Exact counts of the queued and processing jobs (one script over the active set)."""
        queued, processing = await self._count_active(
            keys=[keys.ACTIVE_JOBS], args=[keys.job(0)[:-1]]
        )
        return {JobStatus.QUEUED: int(queued), JobStatus.PROCESSING: int(processing)}

    async def create(
        self,
        job: NewJob,
        *,
        max_unfinished: int | None = None,
        message: BrokerMessage | None = None,
    ) -> int:
        """As `JobStore.create`; with `message`, its broker message is pushed in the same
        step (the broker must be this Redis)."""
        keys_, args = _create_call(job, self._clock(), self._ttl, max_unfinished, message)
        return _created(await self._wire.script(_CREATE_SCRIPT, keys_, args), max_unfinished)

    async def get(self, job_id: int) -> JobRecord | None:
        return record_of(await self._r.hgetall(keys.job(job_id)))

    @staticmethod
    def get_command(job_id: int) -> Command:
        """`get`'s read, for a round trip with other commands; `record_of` decodes its reply."""
        return ("HGETALL", keys.job(job_id))

    async def fail(self, job_id: int, message: str, *, webhook: bool = True) -> bool:
        """`webhook=False`: no delivery for this end (the client was told at once, with no id)."""
        now = self._clock()
        fields: dict[str, Any] = {"error": message, "finished_at": now, "eta_at": now}
        if not webhook:
            fields["webhook_status"] = WebhookStatus.NONE.value
        args = _transition_args(JobStatus.FAILED, self._ttl, 0, fields, now)
        reply = await self._transition(keys=_transition_keys(job_id), args=args)
        return _result(reply).applied
