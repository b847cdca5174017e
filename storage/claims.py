"""What a worker process reads before it claims work, and the claim of several jobs at once.

A generation message wakes a pool process; which queued job it runs is the process's choice
(workers/routing.py), made from one read of the head of the queue (`read_view`): the first
`window` queued jobs in the order workers take them, with their model, batch key and samples;
the state of the message's own job; which live processes hold which models warm, when each is
expected to be free and the Celery node it belongs to; and each head model's load time. One
round trip.

`claim` then takes the chosen jobs (a batch leader and its members) in one pipeline of the job
store's own transition script, each under the same lease token, and in the same round trip
notes the process as busy until their predicted end (`WORKER_BUSY`), which other processes read
to judge whether a job is better left for this one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from storage import keys
from storage.jobs import Claim, ClaimOutcome, JobStatus, JobStore, decode

CLAIM_WINDOW = 64
"""Queued jobs a claim looks at: the head of the queue, in the order workers take them."""

# ARGV: job key prefix, window, the message's job id, model stats key prefix. Returns
# {own status or '', own lease's PTTL (-2: none), flat head entries [id, score, model, batch key,
# samples, predicted seconds]..., flat [model, load seconds or '']...} for the head's models.
_HEAD = """
local prefix = ARGV[1]
local own = redis.call('HGET', prefix .. ARGV[3], 'status') or ''
local leased = redis.call('PTTL', prefix .. ARGV[3] .. ':lease')
local head = redis.call('ZRANGE', '$QUEUED', 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local entries, loads, seen = {}, {}, {}
for i = 1, #head, 2 do
  local f = redis.call('HMGET', prefix .. head[i], 'model_id', 'batch_key', 'samples',
    'predicted_seconds')
  local model = f[1] or ''
  table.insert(entries, head[i])
  table.insert(entries, head[i + 1])
  table.insert(entries, model)
  table.insert(entries, f[2] or '')
  table.insert(entries, f[3] or '1')
  table.insert(entries, f[4] or '0')
  if model ~= '' and not seen[model] then
    seen[model] = true
    table.insert(loads, model)
    table.insert(loads, redis.call('HGET', ARGV[4] .. model, 'load_seconds') or '')
  end
end
return {own, leased, entries, loads}
""".replace("$QUEUED", keys.QUEUED_JOBS)


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: int
    level: int
    model_id: str
    batch_key: str
    """'' for a job that never shares a pipeline call."""
    samples: int
    predicted_seconds: float


@dataclass(frozen=True, slots=True)
class ProcessView:
    """A live pool process of some generation worker, as a claim sees it."""

    name: str
    """'<host>:<pid>' (storage/workers.py `process_name`)."""
    models: frozenset[str]
    node: str | None
    """Its Celery node name, known once it claimed a job (the route to hand it a message)."""
    busy_until: float
    """When its claimed work is expected to end (0: never claimed)."""


@dataclass(frozen=True, slots=True)
class WorkView:
    now: float
    own_status: JobStatus | None
    """The message's own job: None when unknown."""
    own_leased: bool
    own_lease_left: float
    """Seconds until the own job's lease expires (0 when it has none)."""
    head: tuple[QueuedJob, ...]
    processes: tuple[ProcessView, ...]
    load_seconds: Mapping[str, float]
    """The last measured load time of each head model that has one."""

    def own_held_elsewhere(self) -> bool:
        """The message's own job runs under another claim (or its holder died unseen)."""
        return self.own_status is JobStatus.PROCESSING and self.own_leased

    def own_recoverable(self) -> bool:
        """The message's own job was claimed once and lost its holder (a process that died, a
        lease that expired): the message re-drives it, and it runs before anything queued."""
        return self.own_status is JobStatus.PROCESSING and not self.own_leased


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(_text(value))
    except ValueError:
        return default


class ClaimStore:
    """The claim side of the job store for one worker process (sync client)."""

    def __init__(self, client: redis.Redis, jobs: JobStore) -> None:
        self._r = client
        self._jobs = jobs
        self._head = client.register_script(_HEAD)

    def read_view(self, own_job: int, now: float, window: int = CLAIM_WINDOW) -> WorkView:
        pipe = self._r.pipeline(transaction=False)
        args: list[str | int] = [keys.job(0)[:-1], window, own_job, keys.model_stats("")]
        self._head(keys=[], args=args, client=pipe)
        pipe.zrangebyscore(keys.WORKER_MODELS_EXPIRY, now, "+inf")
        pipe.hgetall(keys.WORKER_MODELS)
        pipe.hgetall(keys.WORKER_BUSY)
        (own, leased, flat, loads), live, models, busy = pipe.execute()
        head = tuple(
            QueuedJob(
                id=int(_text(flat[i])),
                level=int(_number(flat[i + 1])) // keys.LEVEL_SPAN,
                model_id=_text(flat[i + 2]),
                batch_key=_text(flat[i + 3]),
                samples=max(1, int(_number(flat[i + 4], 1))),
                predicted_seconds=_number(flat[i + 5]),
            )
            for i in range(0, len(flat), 6)
        )
        load_seconds = {
            _text(loads[i]): _number(loads[i + 1])
            for i in range(0, len(loads), 2)
            if _text(loads[i + 1])
        }
        return WorkView(
            now=now,
            own_status=JobStatus(_text(own)) if _text(own) else None,
            own_leased=int(leased) != -2,
            own_lease_left=max(int(leased), 0) / 1000,
            head=head,
            processes=_processes(live, models, busy),
            load_seconds=load_seconds,
        )

    def claim(
        self,
        job_ids: Sequence[int],
        token: str,
        *,
        process: str,
        node: str,
        now: float,
        until: float,
    ) -> list[Claim]:
        """Claim `job_ids` under `token` in one round trip (each as `JobStore.acquire` would,
        without its follow-up reads), noting `process` busy until `until` (their predicted end)
        in the same trip. One `Claim` per id, in order: CLAIMED with the record, or GONE for a
        job another process took first (or that ended meanwhile)."""
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            self._jobs.queue_acquire(pipe, job_id, token, now)
            pipe.hgetall(keys.job(job_id))
        self._note(pipe, process, node, until)
        replies = pipe.execute()
        claims: list[Claim] = []
        for index, job_id in enumerate(job_ids):
            code, raw = int(replies[2 * index][0]), replies[2 * index + 1]
            if code == -2:  # out of attempts (a job put back in the queue too often)
                claims.append(self._jobs.fail_exhausted(job_id))
                continue
            if code != 1 or not raw:
                claims.append(Claim(ClaimOutcome.GONE))
                continue
            record = decode({_text(k): _text(v) for k, v in raw.items()})
            claims.append(Claim(ClaimOutcome.CLAIMED, record))
        return claims

    def note_busy(self, process: str, node: str, until: float) -> None:
        self._note(self._r, process, node, until)

    @staticmethod
    def _note(client: Any, process: str, node: str, until: float) -> None:
        client.hset(keys.WORKER_BUSY, process, json.dumps({"node": node, "until": until}))


def _processes(
    live: Sequence[Any], models: Mapping[Any, Any], busy: Mapping[Any, Any]
) -> tuple[ProcessView, ...]:
    names = {_text(name) for name in live}
    notes = {_text(name): json.loads(value) for name, value in busy.items()}
    views = []
    for raw_name, listed in models.items():
        name = _text(raw_name)
        if name not in names:
            continue
        note = notes.get(name) or {}
        views.append(
            ProcessView(
                name=name,
                models=frozenset(json.loads(listed)),
                node=note.get("node"),
                busy_until=float(note.get("until") or 0.0),
            )
        )
    return tuple(sorted(views, key=lambda view: view.name))
