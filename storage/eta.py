"""Honest ETAs from measured run times.

Workers report how long each job took; the store keeps, per model, an exponentially weighted mean
of seconds per unit of work (samples x steps x megapixels-ish), and fleet-wide a mean job time.
At submission:

    eta = jobs ahead x mean job time / live workers + this job's predicted run time

Before any history the run time is the configured default. Later work (cold loads, routing,
batching) refines `estimate`; the inputs are read in one Redis round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from storage import keys

ALPHA = 0.3
"""Weight of the newest observation: recent enough to follow load changes, smooth enough."""

HEARTBEAT_TTL = 30.0
"""A worker whose last heartbeat is older than this is not counted as serving."""

REFERENCE_PIXELS = 512 * 512

# KEYS: hash. ARGV: field, observation, alpha.
_EWMA = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local x = tonumber(ARGV[2])
local a = tonumber(ARGV[3])
local new = x
if old then new = a * x + (1 - a) * tonumber(old) end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', new))
redis.call('HINCRBY', KEYS[1], 'n', 1)
return tostring(new)
"""


def work_units(width: int, height: int, steps: int, samples: int) -> float:
    return samples * steps * (width * height) / REFERENCE_PIXELS


@dataclass(frozen=True)
class EtaInputs:
    ahead: int
    """Jobs not yet finished that were accepted before this one."""
    workers: int
    """Workers with a fresh heartbeat (at least 1: a job waits for one to start)."""
    unit_seconds: float | None
    """This model's mean seconds per work unit; None before any history."""
    job_seconds: float | None
    """Fleet-wide mean seconds per job; None before any history."""


def predicted_run_seconds(inputs: EtaInputs, units: float, default: float) -> float:
    if inputs.unit_seconds is None:
        return default
    return max(0.01, inputs.unit_seconds * units)


def estimate(inputs: EtaInputs, run_seconds: float, default: float) -> float:
    per_job = inputs.job_seconds if inputs.job_seconds is not None else default
    wait = inputs.ahead * per_job / max(1, inputs.workers)
    return round(wait + run_seconds, 2)


async def read_inputs(client: aioredis.Redis, model_id: str, now: float) -> EtaInputs:
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.ACTIVE_JOBS)
    pipe.zcount(keys.WORKERS, now - HEARTBEAT_TTL, "+inf")
    pipe.hget(keys.model_stats(model_id), "unit_seconds")
    pipe.hget(keys.STATS_ALL, "job_seconds")
    ahead, workers, unit, job = await pipe.execute()
    return EtaInputs(
        ahead=int(ahead),
        workers=max(1, int(workers)),
        unit_seconds=float(unit) if unit else None,
        job_seconds=float(job) if job else None,
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

    def record(self, model_id: str, units: float, run_seconds: float, job_seconds: float) -> None:
        if units > 0:
            per_unit = run_seconds / units
            self._ewma(keys=[keys.model_stats(model_id)], args=["unit_seconds", per_unit, ALPHA])
        self._ewma(keys=[keys.STATS_ALL], args=["job_seconds", job_seconds, ALPHA])

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
