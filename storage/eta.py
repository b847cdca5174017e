"""Honest ETAs, learnt from measured run times.

Workers report how long each job held them, by **shape**: (model, kind, width x height, steps,
samples x frames). The store keeps, per model:

- per shape, an exponentially weighted mean of the job's seconds (what a repeat of that shape will
  take; most traffic repeats a few shapes);
- per kind, decayed least-squares sums of seconds against work units (samples x steps x pixels
  over 512²): a line ``a + b x units`` for shapes never seen, whose intercept is the fixed cost of
  a job (text encoding, VAE decode, encoding, upload) that a pure per-unit rate gets wrong;
- the last measured load time of its weights.

At submission the estimate is

    eta = when a worker process is first free for it
          + a cold load, when no live worker process holds the model
          + this job's predicted run time

where a process is free once its running job is expected to end (its claim time plus its
prediction), the first jobs queued ahead are handed, in order, to whichever process frees first,
and the rest of the queue (the sum of the queued jobs' own predictions, kept by the job store's
scripts) is spread evenly over the processes. A queued job's fetch recomputes the same sum over only
the jobs ahead of it, with its queue position. Every input is read in one Redis round trip.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis

from dreamq.jobparams import JobParams
from storage import keys
from storage.wire import Script, Wire, wire_of

ALPHA = 0.3
"""Weight of the newest observation: recent enough to follow load changes, smooth enough."""

DECAY = 0.95
"""Weight kept by the older observations of a line fit at each new one (about 20 jobs' memory)."""

HEARTBEAT_TTL = 30.0
"""A worker whose last heartbeat is older than this is not counted as serving."""

REFERENCE_PIXELS = 512 * 512

QUEUE_SCAN_LIMIT = 32
"""A queued job's fetch sums the predictions of at most this many jobs ahead of it in its own
level and extrapolates beyond them (the more urgent levels' work is kept as a sum): its cost
stays bounded with a long queue. Redis's CPU, which every API process and worker shares, is
what it costs: 1,000 took about 480 µs of it per fetch; 100 (beside a second read of the
simulated head) about 185 µs on a slower host; 32, read once for both, about 95 µs there."""

SIMULATED_AHEAD = 32
"""The first jobs ahead are scheduled one by one onto the processes as they free up (what
decides a short queue's wait: the first process to free, not the average); the rest of the queue
is spread evenly over them."""

MIN_SECONDS = 0.01

# KEYS: hash. ARGV: field, observation, alpha, '1' to count the observation in the hash's `n`.
# The field's new weighted mean.
_EWMA = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local x = tonumber(ARGV[2])
local a = tonumber(ARGV[3])
local new = x
if old then new = a * x + (1 - a) * tonumber(old) end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', new))
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'n', 1) end
return tostring(new)
"""

# KEYS: hash. ARGV: field prefix, x, y, decay. Decayed sums n, x, xx, y, xy of a line fit.
_FIT = """
local p, x, y, d = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function add(name, value)
  local old = tonumber(redis.call('HGET', KEYS[1], p .. name) or '0') or 0
  redis.call('HSET', KEYS[1], p .. name, string.format('%.9g', d * old + value))
end
add('n', 1)
add('x', x)
add('xx', x * x)
add('y', y)
add('xy', x * y)
return 1
"""

# The scripts below read everything an estimate needs in one call: a pipeline of the same reads
# cost the API's event loop about twice the CPU (redis-py packs and parses each command).
# `fleet` reads the running set (with the scores: when each running job should end), the live
# pool processes' names, their model lists and the count of live nodes.
_FLEET = """
local function fleet(running, expiry, models, workers, now, floor)
  return {
    redis.call('ZRANGE', running, 0, -1, 'WITHSCORES'),
    redis.call('ZRANGEBYSCORE', expiry, now, '+inf'),
    redis.call('HGETALL', models),
    redis.call('ZCOUNT', workers, floor, '+inf'),
  }
end
"""

# KEYS: the fleet's four (running set, model-list expiry, model lists, workers), the model's
# statistics, the queued work by level, the owner's unfinished set, the queued set. ARGV: now, the
# heartbeat floor, the job key prefix, how many head jobs, then the statistics' fields.
# {fleet, the statistics' values, queued work by level (flat), the head of the queue in the order
# workers take it (flat: score, predicted seconds, batch key, samples), the owner's unfinished
# jobs}.
_SUBMISSION = (
    _FLEET
    + """
local head = redis.call('ZRANGE', KEYS[8], 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
local out, n = {}, 0
for i = 1, #head, 2 do
  local f = redis.call('HMGET', ARGV[3] .. head[i], 'predicted_seconds', 'batch_key', 'samples')
  out[n + 1] = head[i + 1]
  out[n + 2] = f[1] or '0'
  out[n + 3] = f[2] or ''
  out[n + 4] = f[3] or '1'
  n = n + 4
end
return {
  fleet(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2]),
  redis.call('HMGET', KEYS[5], unpack(ARGV, 5)),
  redis.call('HGETALL', KEYS[6]),
  out,
  redis.call('ZCARD', KEYS[7]),
}
"""
)

# KEYS: the fleet's four, the model's statistics, the queued set, the queued work by level. ARGV:
# now, the heartbeat floor, job id, job key prefix, scan limit, how many to list. {fleet, the
# model's load seconds, jobs queued ahead, their predicted seconds, the first `list` of those one
# by one (flat: predicted seconds, batch key, samples, level)}. The work of the more urgent levels
# is their queued work (kept exactly by the job store); the jobs ahead in the job's own level are
# summed over the first `limit` of them (or more, as far as the listed head reaches into the
# level) and extrapolated at their mean beyond, so a fetch costs Redis the same with a queue of a
# thousand jobs as of a million.
_AHEAD = (
    _FLEET
    + """
local state = fleet(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2])
local load = redis.call('HGET', KEYS[5], 'load_seconds')
local score = redis.call('ZSCORE', KEYS[6], ARGV[3])
if not score then return {state, load, 0, '0', {}} end
local before = '(' .. score
local level = math.floor(tonumber(score) / $SPAN)
local level_start = level * $SPAN
local ahead = redis.call('ZCOUNT', KEYS[6], '-inf', before)
local work = 0
local sums = redis.call('HGETALL', KEYS[7])
for i = 1, #sums, 2 do
  if tonumber(sums[i]) < level then work = work + (tonumber(sums[i + 1]) or 0) end
end
local in_level = redis.call('ZCOUNT', KEYS[6], level_start, before)
local first, n, simulated = {}, 0, tonumber(ARGV[6])
local function head_job(id)
  local f = redis.call('HMGET', ARGV[4] .. id, 'predicted_seconds', 'batch_key', 'samples', 'level')
  first[n + 1] = f[1] or '0'
  first[n + 2] = f[2] or ''
  first[n + 3] = f[3] or '1'
  first[n + 4] = f[4] or '0'
  n = n + 4
  return tonumber(f[1]) or 0
end
-- The head in the order workers take it: the more urgent levels' first jobs, then its own
-- level's, whose scan reads the head's fields of the jobs it shares with the head (one read
-- a job, not two).
if ahead > in_level then
  local urgent = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', '(' .. level_start, 'LIMIT', 0,
    simulated)
  for _, id in ipairs(urgent) do head_job(id) end
end
local scan = math.max(tonumber(ARGV[5]), simulated - n / 4)
local ids = redis.call('ZRANGEBYSCORE', KEYS[6], level_start, before, 'LIMIT', 0, scan)
local level_work = 0
for _, id in ipairs(ids) do
  if n < simulated * 4 then
    level_work = level_work + head_job(id)
  else
    local predicted = redis.call('HGET', ARGV[4] .. id, 'predicted_seconds')
    level_work = level_work + (tonumber(predicted) or 0)
  end
end
if #ids > 0 and in_level > #ids then level_work = level_work * in_level / #ids end
return {state, load, ahead, tostring(work + level_work), first}
"""
).replace("$SPAN", str(keys.LEVEL_SPAN))
_SUBMISSION_SCRIPT = Script(_SUBMISSION)
_AHEAD_SCRIPT = Script(_AHEAD)


def work_units(width: int, height: int, steps: int, samples: int) -> float:
    return samples * steps * (width * height) / REFERENCE_PIXELS


@dataclass(frozen=True, slots=True)
class Shape:
    """What a job's run time depends on, as the statistics key it."""

    kind: str
    width: int
    height: int
    steps: int
    samples: int
    """Images generated: samples, times frames for a video."""

    @classmethod
    def of(cls, params: JobParams, width: int, height: int) -> Shape:
        """A job's shape at the size it runs at (the API may not know it yet: see job_shape)."""
        frames = params.num_frames or 1
        return cls(params.kind, width, height, params.steps, params.samples * frames)

    @property
    def field(self) -> str:
        return f"shape:{self.kind}:{self.width}x{self.height}:{self.steps}:{self.samples}"

    @property
    def units(self) -> float:
        return work_units(self.width, self.height, self.steps, self.samples)


_FIT_PARTS = ("n", "x", "xx", "y", "xy")


def _fit_prefix(kind: str) -> str:
    return f"fit:{kind}:"


def _stat_fields(shape: Shape) -> list[str]:
    prefix = _fit_prefix(shape.kind)
    return [shape.field, *(prefix + part for part in _FIT_PARTS), "unit_seconds", "load_seconds"]


def _number(value: Any) -> float | None:
    if value is None or value == b"" or value == "":
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class RunStats:
    """One model's statistics as they bear on one shape."""

    shape_seconds: float | None = None
    """The weighted mean of this exact shape's jobs; None before one ran."""
    fit: tuple[float, float, float, float, float] | None = None
    """Decayed sums n, x, xx, y, xy of this kind's seconds against work units."""
    unit_seconds: float | None = None
    """The model's mean seconds per work unit over every kind (the oldest fallback)."""
    load_seconds: float | None = None

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> RunStats:
        shape, n, x, xx, y, xy, unit, load = (_number(v) for v in values)
        fit = None
        if n is not None and x is not None and xx is not None and y is not None and xy is not None:
            fit = (n, x, xx, y, xy)
        return cls(shape, fit, unit, load)


def predict_run_seconds(stats: RunStats, shape: Shape, default: float) -> float:
    """This shape's run time: its own mean when it ran before; else the kind's fitted line (or,
    with one size seen, the kind's seconds per unit); else the model's seconds per unit; else the
    configured default."""
    if stats.shape_seconds is not None:
        return max(MIN_SECONDS, stats.shape_seconds)
    units = shape.units
    if stats.fit is not None and stats.fit[0] > 0:
        n, sx, sxx, sy, sxy = stats.fit
        mean_x, mean_y = sx / n, sy / n
        spread = sxx / n - mean_x * mean_x
        if n >= 1.5 and spread > 1e-9 * max(1.0, mean_x * mean_x):
            slope = (sxy / n - mean_x * mean_y) / spread
            if slope >= 0:
                intercept = max(0.0, mean_y - slope * mean_x)
                return max(MIN_SECONDS, intercept + slope * units)
        if mean_x > 0:
            return max(MIN_SECONDS, mean_y / mean_x * units)
    if stats.unit_seconds is not None:
        return max(MIN_SECONDS, stats.unit_seconds * units)
    return default


@dataclass(frozen=True, slots=True)
class Fleet:
    """The generation workers as they bear on a waiting job."""

    processes: int
    """Live worker processes (each runs one job at a time); at least 1, since a job waits for
    one to start."""
    running: tuple[float, ...]
    """Seconds each running job is still expected to take."""
    warm: bool
    """Whether a live worker process holds the job's model in memory."""


class Batching(NamedTuple):
    """How a queued job may share a pipeline call (workers/routing.py): jobs of one level and
    one non-empty batch key, while their images fit the batch size. (A named tuple: the API
    builds 32 of them per submission, at a third of a dataclass's cost.)"""

    key: str = ""
    samples: int = 1
    level: int = 0


@dataclass(frozen=True, slots=True)
class EtaInputs:
    stats: RunStats
    fleet: Fleet
    queued_seconds: float
    """Predicted seconds of the queued jobs ahead."""
    first: tuple[float, ...] = ()
    """The predictions of the first of them, in the order workers take them (part of
    `queued_seconds`)."""
    ahead: int = 0
    """Queued jobs ahead (fetch only)."""
    first_batching: tuple[Batching, ...] = ()
    """What each of `first` may share a call with (empty: nothing batches)."""
    batch_images: int = 1
    """The workers' batch size (DREAMQ_BATCH_SIZE): 1, no batching."""


def _schedule(
    inputs: EtaInputs, own: Batching | None = None, run_seconds: float = 0.0
) -> tuple[list[float], float | None]:
    """The processes' free times once the first jobs ahead are handed out (in order, each to
    the process that frees first, a batch's members with their leader, for the sum of their
    times); and when the job `own` would finish if it joined one of those batches."""
    fleet = inputs.fleet
    processes = max(fleet.processes, len(fleet.running))  # a running job has a process
    free = sorted(fleet.running) + [0.0] * (processes - len(fleet.running))
    heapq.heapify(free)
    marks = inputs.first_batching or tuple(Batching() for _ in inputs.first)
    jobs = list(zip(inputs.first, marks, strict=True))
    taken = [False] * len(jobs)
    # The job itself can join a batch ahead only when it is among the jobs a worker looks at.
    joinable = (
        own is not None
        and own.key != ""
        and inputs.batch_images > 1
        and inputs.queued_seconds <= sum(inputs.first) + 1e-6
    )
    joined: float | None = None
    for index, (seconds, mark) in enumerate(jobs):
        if taken[index]:
            continue
        total, images = seconds, mark.samples
        if mark.key and images < inputs.batch_images:
            for later in range(index + 1, len(jobs)):
                if images == inputs.batch_images:
                    break
                other_seconds, other = jobs[later]
                same = other.key == mark.key and other.level == mark.level
                if not taken[later] and same and images + other.samples <= inputs.batch_images:
                    taken[later] = True
                    total += other_seconds
                    images += other.samples
        start = heapq.heappop(free)
        if (
            joinable
            and joined is None
            and own is not None
            and (own.key, own.level) == (mark.key, mark.level)
            and images + own.samples <= inputs.batch_images
        ):
            total += run_seconds
            joined = start + total
        heapq.heappush(free, start + total)
    return free, joined


def wait_seconds(inputs: EtaInputs) -> float:
    """When a process is first free for the job: each process is free once its running job
    ends; the first jobs ahead go, in order, to whichever frees first (batched as workers
    batch them); the rest of the queue is shared evenly."""
    free, _ = _schedule(inputs)
    return _first_free(inputs, free)


def _first_free(inputs: EtaInputs, free: list[float]) -> float:
    rest = max(0.0, inputs.queued_seconds - sum(inputs.first))
    if rest == 0.0:
        return free[0]
    return max(free[0], (sum(free) + rest) / len(free))


def estimate(inputs: EtaInputs, run_seconds: float, own: Batching | None = None) -> float:
    """Seconds until the job's output: the wait, a cold load, its own run; or, when it would
    join a batch of jobs ahead of it (`own`: how it batches), that batch's end."""
    fleet = inputs.fleet
    cold = 0.0 if fleet.warm else (inputs.stats.load_seconds or 0.0)
    free, joined = _schedule(inputs, own, run_seconds)
    if joined is not None:
        return round(joined + cold, 2)
    return round(_first_free(inputs, free) + cold + run_seconds, 2)


def _fleet_call(now: float) -> tuple[list[str], list[float]]:
    """The fleet's keys and arguments, first in both scripts."""
    fleet_keys = [keys.RUNNING_JOBS, keys.WORKER_MODELS_EXPIRY, keys.WORKER_MODELS, keys.WORKERS]
    return fleet_keys, [now, now - HEARTBEAT_TTL]


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fleet(model_id: str, now: float, reply: Sequence[Any]) -> Fleet:
    """The fleet from the scripts' `fleet` reply."""
    running, live, models, serving_nodes = reply
    names = {_text(name) for name in live}
    warm = False
    for name, listed in _pairs(models):
        if _text(name) in names and model_id in json.loads(listed):
            warm = True
            break
    # Every live pool process of a generation worker publishes its model list (even empty): the
    # count of them is the parallelism. Workers too old to publish are counted per node.
    processes = max(1, len(names) or int(serving_nodes))
    left = tuple(sorted(max(0.0, float(finish) - now) for _, finish in _pairs(running)))
    return Fleet(processes=processes, running=left, warm=warm)


@dataclass(frozen=True, slots=True)
class SubmissionView:
    """What a new job's estimate needs, before its priority level is known."""

    stats: RunStats
    fleet: Fleet
    queued_by_level: Mapping[int, float]
    """Predicted seconds of the queued jobs, by priority level."""
    head: Sequence[tuple[float, float]]
    """The first queued jobs in the order workers take them: (score, predicted seconds)."""
    unfinished: int
    """The submitting key's queued and running jobs (its fair-share level depends on it)."""
    head_batching: Sequence[Batching] = ()
    """How each of `head` may share a pipeline call (empty: nothing batches)."""

    def at_level(self, level: int, batch_images: int = 1) -> EtaInputs:
        """The inputs for a job of `level`: the work queued at its level and the ones before
        (a prefix of the queue's order, which is by level first), batched by up to
        `batch_images` images as workers batch them."""
        queued = sum(seconds for lane, seconds in self.queued_by_level.items() if lane <= level)
        end = (level + 1) * keys.LEVEL_SPAN
        count = sum(1 for score, _ in self.head if score < end)
        first = tuple(seconds for _, seconds in self.head[:count])
        return EtaInputs(
            self.stats,
            self.fleet,
            max(0.0, queued),
            first,
            first_batching=tuple(self.head_batching[:count]),
            batch_images=batch_images,
        )


async def read_submission(
    client: aioredis.Redis | Wire, model_id: str, shape: Shape, now: float, owner: str
) -> SubmissionView:
    """What a new job's estimate needs, in one round trip."""
    fleet_keys, fleet_args = _fleet_call(now)
    reply = await wire_of(client).script(
        _SUBMISSION_SCRIPT,
        [
            *fleet_keys,
            keys.model_stats(model_id),
            keys.QUEUED_WORK,
            keys.unfinished_jobs(owner),
            keys.QUEUED_JOBS,
        ],
        [*fleet_args, keys.job(0)[:-1], SIMULATED_AHEAD, *_stat_fields(shape)],
    )
    fleet, stats, work, head, unfinished = reply
    # Every submission parses these 32 jobs: comprehensions over the flat reply's columns (a
    # loop with index arithmetic cost about twice as much).
    scores = [float(score) for score in head[0::4]]
    pairs = list(zip(scores, map(float, head[1::4]), strict=True))
    span = keys.LEVEL_SPAN
    batching = [
        Batching(_text(key), int(samples or 1), int(score) // span)
        for score, key, samples in zip(scores, head[2::4], head[3::4], strict=True)
    ]
    return SubmissionView(
        stats=RunStats.from_values(stats),
        fleet=_fleet(model_id, now, fleet),
        queued_by_level={int(level): float(seconds) for level, seconds in _pairs(work)},
        head=pairs,
        unfinished=int(unfinished),
        head_batching=batching,
    )


async def read_inputs_ahead_of(
    client: aioredis.Redis | Wire, job_id: int, model_id: str, now: float, batch_images: int = 1
) -> EtaInputs:
    """What a queued job's fetch needs: the jobs queued ahead of it, not behind, and whether its
    model will need loading (its own run time is the prediction in its record). One round
    trip."""
    fleet_keys, fleet_args = _fleet_call(now)
    reply = await wire_of(client).script(
        _AHEAD_SCRIPT,
        [*fleet_keys, keys.model_stats(model_id), keys.QUEUED_JOBS, keys.QUEUED_WORK],
        [*fleet_args, job_id, keys.job(0)[:-1], QUEUE_SCAN_LIMIT, SIMULATED_AHEAD],
    )
    fleet, load, ahead, work, first = reply
    return EtaInputs(
        stats=RunStats(load_seconds=_number(load)),
        fleet=_fleet(model_id, now, fleet),
        queued_seconds=max(0.0, float(work)),
        first=tuple(float(first[i]) for i in range(0, len(first), 4)),
        ahead=int(ahead),
        first_batching=tuple(
            Batching(_text(first[i + 1]), int(first[i + 2] or 1), int(first[i + 3] or 0))
            for i in range(0, len(first), 4)
        ),
        batch_images=batch_images,
    )


async def read_load_seconds(client: aioredis.Redis, model_id: str) -> float | None:
    """The last measured time a worker took to load this model, if any."""
    value = await client.hget(keys.model_stats(model_id), "load_seconds")
    return float(value) if value else None


class DurationRecorder:
    """Worker side: feed each finished job's measured times into the statistics."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._ewma = client.register_script(_EWMA)
        self._fit = client.register_script(_FIT)

    def record(
        self,
        model_id: str,
        units: float,
        run_seconds: float,
        job_seconds: float,
        shape: Shape | None = None,
    ) -> None:
        """`run_seconds`: the work a warm worker repeats (pipeline and post-processing);
        `job_seconds`: how long the job held the worker, which is what the queue waits on and
        what the shape statistics learn."""
        stats = keys.model_stats(model_id)
        pipe = self._r.pipeline(transaction=False)  # one round trip for every statistic
        if units > 0:
            per_unit = run_seconds / units
            self._ewma(keys=[stats], args=["unit_seconds", per_unit, ALPHA, "1"], client=pipe)
        if shape is not None:
            self._ewma(keys=[stats], args=[shape.field, job_seconds, ALPHA, "0"], client=pipe)
            fit: list[str | float] = [_fit_prefix(shape.kind), shape.units, job_seconds, DECAY]
            self._fit(keys=[stats], args=fit, client=pipe)
        fleet: list[str | float] = ["job_seconds", job_seconds, ALPHA, "1"]
        self._ewma(keys=[keys.STATS_ALL], args=fleet, client=pipe)
        pipe.execute()

    def record_load(self, model_id: str, seconds: float) -> None:
        self._r.hset(keys.model_stats(model_id), "load_seconds", f"{seconds:.3f}")

    def unit_seconds(self, model_id: str) -> float | None:
        value = self._r.hget(keys.model_stats(model_id), "unit_seconds")
        return float(value) if value else None


def heartbeat(client: redis.Redis, worker: str, now: float | None = None) -> None:
    """Mark a worker as consuming; called between jobs and on a timer."""
    moment = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.WORKERS, {worker: moment})
    pipe.zremrangebyscore(keys.WORKERS, "-inf", moment - 24 * 3600)
    pipe.execute()
