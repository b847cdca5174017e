"""ETA arithmetic, its Redis inputs and the worker-side duration statistics (storage/eta.py)."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
import redis

from storage import keys
from storage.eta import (
    ALPHA,
    HEARTBEAT_TTL,
    DurationRecorder,
    EtaInputs,
    estimate,
    heartbeat,
    predicted_run_seconds,
    read_inputs,
    work_units,
)

NOW = 50_000.0


def read(server: fakeredis.FakeServer, model_id: str = "demo", now: float = NOW) -> EtaInputs:
    async def scenario() -> EtaInputs:
        return await read_inputs(fakeredis.aioredis.FakeRedis(server=server), model_id, now)

    return asyncio.run(scenario())


def inputs(
    ahead: int = 0,
    workers: int = 1,
    unit_seconds: float | None = None,
    job_seconds: float | None = None,
) -> EtaInputs:
    return EtaInputs(ahead, workers, unit_seconds, job_seconds)


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("width", "height", "steps", "samples", "units"),
    [
        (512, 512, 30, 1, 30.0),
        (512, 512, 30, 4, 120.0),
        (1024, 1024, 30, 2, 240.0),
        (256, 256, 10, 1, 2.5),
        (768, 512, 20, 1, 30.0),
    ],
)
def test_work_units_scale_with_samples_steps_and_pixels(
    width: int, height: int, steps: int, samples: int, units: float
) -> None:
    assert work_units(width, height, steps, samples) == pytest.approx(units)


def test_estimate_is_the_wait_ahead_plus_this_jobs_run() -> None:
    # 3 jobs ahead x 10 s each, shared by 2 workers, then 4 s for this job.
    assert estimate(inputs(ahead=3, workers=2, job_seconds=10.0), 4.0, default=99.0) == 19.0


def test_estimate_uses_the_default_job_time_before_any_history() -> None:
    assert estimate(inputs(ahead=2, workers=1), 5.0, default=8.0) == 21.0


def test_estimate_with_nothing_ahead_is_the_run_time() -> None:
    assert estimate(inputs(ahead=0, workers=3, job_seconds=10.0), 6.5, default=8.0) == 6.5


def test_estimate_never_divides_by_zero_workers() -> None:
    assert estimate(inputs(ahead=2, workers=0, job_seconds=3.0), 1.0, default=8.0) == 7.0


def test_estimate_is_rounded_to_hundredths() -> None:
    assert estimate(inputs(ahead=1, workers=3, job_seconds=1.0), 0.0, default=8.0) == 0.33


def test_predicted_run_is_the_default_before_history() -> None:
    assert predicted_run_seconds(inputs(), units=30.0, default=7.0) == 7.0


def test_predicted_run_scales_the_models_unit_time() -> None:
    assert predicted_run_seconds(inputs(unit_seconds=0.1), 30.0, 7.0) == pytest.approx(3.0)
    assert predicted_run_seconds(inputs(unit_seconds=0.1), 120.0, 7.0) == pytest.approx(12.0)


def test_predicted_run_is_never_zero() -> None:
    assert predicted_run_seconds(inputs(unit_seconds=0.0), 30.0, 7.0) == 0.01


# ---------------------------------------------------------------- read_inputs


def test_read_inputs_on_an_empty_store(server: fakeredis.FakeServer) -> None:
    assert read(server) == EtaInputs(ahead=0, workers=1, unit_seconds=None, job_seconds=None)


def test_read_inputs_counts_active_jobs_and_fresh_workers_only(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    client.zadd(keys.ACTIVE_JOBS, {"1": 1, "2": 2, "5": 5})
    client.zadd(
        keys.WORKERS,
        {
            "fresh": NOW - 1,
            "edge": NOW - HEARTBEAT_TTL,
            "stale": NOW - HEARTBEAT_TTL - 1,
            "gone": NOW - 3600,
        },
    )
    got = read(server)
    assert got.ahead == 3
    assert got.workers == 2


def test_read_inputs_with_only_stale_workers_still_counts_one(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    client.zadd(keys.WORKERS, {"stale": NOW - 120})
    assert read(server).workers == 1


def test_read_inputs_reads_this_models_and_the_fleets_statistics(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    client.hset(keys.model_stats("demo"), mapping={"unit_seconds": "0.25", "n": 3})
    client.hset(keys.model_stats("other"), mapping={"unit_seconds": "9.5", "n": 1})
    client.hset(keys.STATS_ALL, mapping={"job_seconds": "12.5", "n": 4})
    assert read(server, "demo") == EtaInputs(0, 1, 0.25, 12.5)
    assert read(server, "other").unit_seconds == 9.5
    assert read(server, "unseen").unit_seconds is None


def test_heartbeats_make_workers_count_and_age_out(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    heartbeat(client, "w1", now=NOW - 5)
    heartbeat(client, "w2", now=NOW - 2)
    assert read(server).workers == 2
    assert read(server, now=NOW + HEARTBEAT_TTL).workers == 1  # w1 is now stale
    # A heartbeat prunes entries older than a day.
    heartbeat(client, "w3", now=NOW + 2 * 24 * 3600)
    assert client.zrange(keys.WORKERS, 0, -1) == [b"w3"]


# ---------------------------------------------------------------- DurationRecorder


def test_first_observation_is_taken_as_is(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("demo", units=10.0, run_seconds=5.0, job_seconds=8.0)
    assert recorder.unit_seconds("demo") == pytest.approx(0.5)
    assert float(client.hget(keys.STATS_ALL, "job_seconds")) == pytest.approx(8.0)
    assert client.hget(keys.model_stats("demo"), "n") == b"1"
    assert client.hget(keys.STATS_ALL, "n") == b"1"


def test_later_observations_are_alpha_weighted(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("demo", units=10.0, run_seconds=5.0, job_seconds=8.0)
    recorder.record("demo", units=10.0, run_seconds=10.0, job_seconds=18.0)
    unit = ALPHA * 1.0 + (1 - ALPHA) * 0.5
    assert recorder.unit_seconds("demo") == pytest.approx(unit, abs=1e-6)
    job = ALPHA * 18.0 + (1 - ALPHA) * 8.0
    assert float(client.hget(keys.STATS_ALL, "job_seconds")) == pytest.approx(job, abs=1e-6)

    recorder.record("demo", units=20.0, run_seconds=2.0, job_seconds=3.0)
    unit = ALPHA * 0.1 + (1 - ALPHA) * unit
    assert recorder.unit_seconds("demo") == pytest.approx(unit, abs=1e-6)
    assert client.hget(keys.model_stats("demo"), "n") == b"3"


def test_alpha_is_a_weight() -> None:
    assert 0 < ALPHA < 1


def test_models_keep_separate_unit_times_but_share_the_job_time(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("fast", units=10.0, run_seconds=1.0, job_seconds=2.0)
    recorder.record("slow", units=10.0, run_seconds=20.0, job_seconds=22.0)
    assert recorder.unit_seconds("fast") == pytest.approx(0.1)
    assert recorder.unit_seconds("slow") == pytest.approx(2.0)
    assert recorder.unit_seconds("never") is None
    shared = ALPHA * 22.0 + (1 - ALPHA) * 2.0
    assert float(client.hget(keys.STATS_ALL, "job_seconds")) == pytest.approx(shared, abs=1e-6)


def test_zero_work_units_leave_the_unit_time_alone(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("demo", units=0.0, run_seconds=5.0, job_seconds=6.0)
    assert recorder.unit_seconds("demo") is None
    assert float(client.hget(keys.STATS_ALL, "job_seconds")) == pytest.approx(6.0)


def test_recorded_statistics_feed_the_next_estimate(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    DurationRecorder(client).record("demo", units=30.0, run_seconds=6.0, job_seconds=7.0)
    got = read(server)
    assert got.unit_seconds == pytest.approx(0.2)
    assert got.job_seconds == pytest.approx(7.0)
    assert predicted_run_seconds(got, work_units(512, 512, 30, 2), 99.0) == pytest.approx(12.0)
