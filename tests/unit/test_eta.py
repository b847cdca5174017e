"""The learning ETA (storage/eta.py): predictions from measured shapes, the queue's work ahead as
the job store's scripts keep it, and the fleet's processes and warm models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import fakeredis
import pytest
import redis

from storage import eta, keys
from storage.eta import (
    ALPHA,
    HEARTBEAT_TTL,
    Batching,
    DurationRecorder,
    EtaInputs,
    Fleet,
    RunStats,
    Shape,
    SubmissionView,
    estimate,
    heartbeat,
    predict_run_seconds,
    read_inputs_ahead_of,
    read_submission,
    wait_seconds,
    work_units,
)
from storage.jobs import JobStatus, JobStore, lease_owner, new_lease_token
from tests.support.jobs import new_job

NOW = 50_000.0
SMALL = Shape("txt2img", 64, 64, 2, 1)
LARGE = Shape("txt2img", 128, 128, 2, 1)
DEFAULT = 7.0


def read_view(
    server: fakeredis.FakeServer, model_id: str = "demo", shape: Shape = SMALL
) -> SubmissionView:
    async def scenario() -> SubmissionView:
        client = fakeredis.aioredis.FakeRedis(server=server)
        return await read_submission(client, model_id, shape, NOW, "key-1")

    return asyncio.run(scenario())


def read(
    server: fakeredis.FakeServer, model_id: str = "demo", shape: Shape = SMALL, level: int = 0
) -> EtaInputs:
    return read_view(server, model_id, shape).at_level(level)


def read_ahead(server: fakeredis.FakeServer, job_id: int, model_id: str = "demo") -> EtaInputs:
    async def scenario() -> EtaInputs:
        client = fakeredis.aioredis.FakeRedis(server=server)
        return await read_inputs_ahead_of(client, job_id, model_id, NOW)

    return asyncio.run(scenario())


def inputs(
    queued: float = 0.0,
    processes: int = 1,
    running: tuple[float, ...] = (),
    warm: bool = True,
    load: float | None = None,
    first: tuple[float, ...] = (),
) -> EtaInputs:
    fleet = Fleet(processes, running, warm)
    return EtaInputs(RunStats(load_seconds=load), fleet, queued, first)


def live_process(client: redis.Redis, name: str, models: list[str], until: float) -> None:
    client.hset(keys.WORKER_MODELS, name, json.dumps(models))
    client.zadd(keys.WORKER_MODELS_EXPIRY, {name: until})


# ---------------------------------------------------------------- shapes and predictions


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
    assert Shape("txt2img", width, height, steps, samples).units == pytest.approx(units)


def test_a_shape_names_every_dimension_the_run_time_depends_on() -> None:
    assert Shape("img2img", 768, 512, 20, 2).field == "shape:img2img:768x512:20:2"


def test_the_default_before_any_history() -> None:
    assert predict_run_seconds(RunStats(), SMALL, DEFAULT) == DEFAULT


def test_a_shape_seen_before_predicts_its_own_mean() -> None:
    stats = RunStats(shape_seconds=0.42, fit=(5, 1, 1, 9, 9), unit_seconds=99.0)
    assert predict_run_seconds(stats, SMALL, DEFAULT) == 0.42


def test_an_unseen_shape_follows_the_kinds_line_with_its_fixed_cost() -> None:
    # Two sizes observed: 0.2 s at 1 unit and 0.6 s at 5 units: 0.1 s fixed + 0.1 s a unit.
    fit = (2.0, 1.0 + 5.0, 1.0 + 25.0, 0.2 + 0.6, 0.2 * 1 + 0.6 * 5)
    stats = RunStats(fit=fit)
    shape = Shape("txt2img", 512, 512, 3, 1)  # 3 units
    assert predict_run_seconds(stats, shape, DEFAULT) == pytest.approx(0.1 + 0.3)


def test_one_size_seen_scales_its_seconds_per_unit() -> None:
    stats = RunStats(fit=(3.0, 6.0, 12.0, 3.0, 6.0))  # three jobs of 2 units, 1 s each
    assert predict_run_seconds(stats, Shape("txt2img", 512, 512, 4, 1), DEFAULT) == 2.0


def test_a_falling_line_is_not_extrapolated() -> None:
    # Bigger jobs measured faster (noise): the slope is not believed, the mean rate is.
    stats = RunStats(fit=(2.0, 1.0 + 3.0, 1.0 + 9.0, 2.0 + 1.0, 2.0 + 3.0))
    assert predict_run_seconds(stats, Shape("txt2img", 512, 512, 2, 1), DEFAULT) == 1.5


def test_the_models_unit_time_serves_a_kind_never_seen() -> None:
    stats = RunStats(unit_seconds=0.1)
    assert predict_run_seconds(stats, Shape("inpaint", 512, 512, 30, 1), DEFAULT) == 3.0


def test_a_prediction_is_never_zero() -> None:
    assert predict_run_seconds(RunStats(unit_seconds=0.0), SMALL, DEFAULT) == eta.MIN_SECONDS


# ---------------------------------------------------------------- the estimate


def test_estimate_with_nothing_ahead_and_a_free_process_is_the_run_time() -> None:
    assert estimate(inputs(processes=3, running=(4.0, 9.0)), 6.5) == 6.5


def test_the_next_job_goes_to_the_process_that_frees_first() -> None:
    # Two processes, free in 0.2 s and 1 s; one 0.5 s job ahead takes the first: this job starts
    # when the second frees (1 s), not at the average.
    got = inputs(processes=2, running=(1.0, 0.2), queued=0.5, first=(0.5,))
    assert wait_seconds(got) == pytest.approx(0.7)
    assert estimate(got, 0.3) == 1.0


def test_jobs_ahead_are_handed_out_in_order() -> None:
    got = inputs(processes=2, queued=3.0 + 1.0 + 1.0, first=(3.0, 1.0, 1.0))
    # P1 takes 3 s, P2 takes 1 s then 1 s: P2 frees at 2 s.
    assert wait_seconds(got) == pytest.approx(2.0)


def test_the_rest_of_a_long_queue_is_shared_evenly() -> None:
    # The first two of 10 s of queued work simulated (1 s each), 8 s left over two processes.
    got = inputs(processes=2, queued=10.0, first=(1.0, 1.0))
    assert wait_seconds(got) == pytest.approx(5.0)


def batched(
    first: tuple[float, ...], marks: tuple[Batching, ...], processes: int = 2, images: int = 4
) -> EtaInputs:
    fleet = Fleet(processes, (), True)
    return EtaInputs(
        RunStats(), fleet, sum(first), first, first_batching=marks, batch_images=images
    )


def test_jobs_ahead_that_batch_hold_one_process_for_their_sum() -> None:
    a, b = Batching("m\na"), Batching("m\nb")
    # The two "a" jobs run as one call on P1 (4 s), "b" alone on P2: P2 is free at 1 s. Apart,
    # the second "a" would go to P2 after "b" (3 s) and P1 would free first, at 2 s.
    assert wait_seconds(batched((2.0, 1.0, 2.0), (a, b, a))) == pytest.approx(1.0)
    apart = (a, b, Batching("m\na", level=1))  # a batch never mixes levels
    assert wait_seconds(batched((2.0, 1.0, 2.0), apart)) == pytest.approx(2.0)
    # Nor exceeds the batch's images: 3 + 2 > 4, so the two run on the two processes.
    full = (Batching("m\na", samples=3), Batching("m\na", samples=2))
    assert wait_seconds(batched((1.0, 1.0), full)) == pytest.approx(1.0)
    assert wait_seconds(batched((1.0, 1.0), (a, a))) == pytest.approx(0.0)


def test_a_job_that_joins_a_batch_ahead_finishes_with_it() -> None:
    a = Batching("m\na")
    got = batched((1.0, 1.0), (a, Batching("m\nb")), processes=1)
    # It joins the first job's call: 1 s + its own 0.5 s, instead of running after both (2.5 s).
    assert estimate(got, 0.5, a) == 1.5
    assert estimate(got, 0.5, Batching("m\nc")) == 2.5
    assert estimate(got, 0.5, Batching("m\na", level=1)) == 2.5  # levels never mix
    assert estimate(got, 0.5, Batching("m\na", samples=4)) == 2.5  # over the batch's images
    assert estimate(dataclasses.replace(got, batch_images=1), 0.5, a) == 2.5  # batching off
    # A queue longer than the jobs simulated: it is not among the jobs a worker looks at.
    assert estimate(dataclasses.replace(got, queued_seconds=100.0), 0.5, a) > 100


def test_more_running_jobs_than_counted_processes_means_more_processes() -> None:
    got = inputs(processes=1, running=(2.0, 3.0), queued=1.0, first=(1.0,))
    assert wait_seconds(got) == pytest.approx(3.0)  # the 1 s job goes after the 2 s one


def test_a_model_no_live_process_holds_adds_its_load_time() -> None:
    assert estimate(inputs(warm=False, load=12.0), 1.0) == 13.0
    assert estimate(inputs(warm=True, load=12.0), 1.0) == 1.0
    assert estimate(inputs(warm=False, load=None), 1.0) == 1.0  # never loaded yet: unknown


def test_estimate_is_rounded_to_hundredths() -> None:
    assert estimate(inputs(queued=1.0, processes=3), 0.0) == 0.33


# ---------------------------------------------------------------- reading the fleet


def test_read_inputs_on_an_empty_store(server: fakeredis.FakeServer) -> None:
    got = read(server)
    assert got == EtaInputs(RunStats(), Fleet(1, (), False), 0.0)


def test_live_processes_are_the_parallelism_and_say_which_models_are_warm(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    live_process(client, "h:1", ["demo"], until=NOW + 30)
    live_process(client, "h:2", [], until=NOW + 30)
    live_process(client, "h:3", ["other"], until=NOW - 1)  # dead: its deadline passed
    got = read(server).fleet
    assert (got.processes, got.warm) == (2, True)
    assert read(server, "other").fleet.warm is False


def test_workers_too_old_to_publish_models_are_counted_per_node(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    client.zadd(keys.WORKERS, {"a": NOW - 1, "b": NOW - HEARTBEAT_TTL, "stale": NOW - 120})
    assert read(server).fleet.processes == 2


def test_running_jobs_count_what_they_still_need(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    client.zadd(keys.RUNNING_JOBS, {"1": NOW + 2.5, "2": NOW + 1.0, "3": NOW - 4.0})
    assert read(server).fleet.running == pytest.approx((0.0, 1.0, 2.5))  # overdue: ending now


def test_the_models_statistics_are_read_for_the_jobs_shape(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    client.hset(
        keys.model_stats("demo"),
        mapping={SMALL.field: "0.25", "unit_seconds": "0.5", "load_seconds": "3.0"},
    )
    got = read(server).stats
    assert (got.shape_seconds, got.unit_seconds, got.load_seconds) == (0.25, 0.5, 3.0)
    assert read(server, shape=LARGE).stats.shape_seconds is None


# ---------------------------------------------------------------- the queue, kept by the store


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, ttl_seconds=3600, clock=lambda: NOW)


def queued_seconds(client: redis.Redis, level: int = 0) -> float:
    return float(client.hget(keys.QUEUED_WORK, str(level)) or 0)


def test_the_queue_holds_each_waiting_jobs_prediction_until_a_worker_claims_it(
    server: fakeredis.FakeServer, client: redis.Redis, store: JobStore
) -> None:
    ids = [store.create(new_job(predicted_seconds=seconds)) for seconds in (1.5, 2.0, 4.0)]
    assert read(server).queued_seconds == pytest.approx(7.5)
    token = new_lease_token()
    store.acquire(ids[0], token)
    assert read(server).queued_seconds == pytest.approx(6.0)
    # The claimed job is running, expected to end its predicted seconds after the claim.
    assert client.zscore(keys.RUNNING_JOBS, ids[0]) == pytest.approx(NOW + 1.5)
    assert read(server).fleet.running == pytest.approx((1.5,))
    assert store.succeed(ids[0], output=[], generation_time=1.0, meta={}, lease=token)
    assert client.zcard(keys.RUNNING_JOBS) == 0
    store.fail(ids[1], "refused")  # failed while queued: leaves the queue
    assert read(server).queued_seconds == pytest.approx(4.0)
    assert client.zrange(keys.QUEUED_JOBS, 0, -1) == [str(ids[2]).encode()]


def test_a_requeued_job_is_waiting_again(
    server: fakeredis.FakeServer, client: redis.Redis, store: JobStore
) -> None:
    job_id = store.create(new_job(predicted_seconds=2.0))
    store.acquire(job_id, new_lease_token())
    assert store.release_lease(job_id, lease_owner(os.getpid()))  # its process died
    assert store.transition(job_id, JobStatus.QUEUED).applied
    assert read(server).queued_seconds == pytest.approx(2.0)
    assert client.zcard(keys.RUNNING_JOBS) == 0


def test_the_queued_work_returns_to_zero_exactly(client: redis.Redis, store: JobStore) -> None:
    ids = [store.create(new_job(predicted_seconds=0.1)) for _ in range(10)]
    for job_id in ids:
        store.acquire(job_id, new_lease_token())
    assert queued_seconds(client) == 0.0  # no float residue left behind an empty queue


def test_a_waiting_job_sees_only_the_jobs_ahead_of_it(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    ids = [store.create(new_job(predicted_seconds=seconds)) for seconds in (1.0, 2.0, 3.0, 4.0)]
    first = read_ahead(server, ids[0])
    assert (first.ahead, first.queued_seconds) == (0, 0.0)
    third = read_ahead(server, ids[2])
    assert (third.ahead, third.queued_seconds) == (2, pytest.approx(3.0))
    store.acquire(ids[0], new_lease_token())
    third = read_ahead(server, ids[2])
    assert (third.ahead, third.queued_seconds) == (1, pytest.approx(2.0))
    assert third.fleet.running == pytest.approx((1.0,))
    assert third.first == pytest.approx((2.0,))


def test_both_readers_see_how_the_jobs_ahead_batch(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    keyed = new_job(predicted_seconds=1.0, batch_key="demo\nk", samples=2, level=1)
    ids = [store.create(keyed), store.create(new_job(predicted_seconds=2.0, level=1))]
    last = store.create(new_job(level=1))
    expected = (Batching("demo\nk", 2, 1), Batching("", 1, 1))
    assert read_ahead(server, last).first_batching == expected
    # A new job's view holds every queued job (the last one too).
    assert read_view(server).at_level(1, 4).first_batching == (*expected, Batching("", 1, 1))
    assert read_view(server).at_level(1, 4).batch_images == 4
    assert read_view(server).at_level(0).first_batching == ()
    assert ids


def test_a_long_queue_ahead_is_extrapolated_from_its_first_jobs(
    server: fakeredis.FakeServer, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eta, "QUEUE_SCAN_LIMIT", 2)
    monkeypatch.setattr(eta, "SIMULATED_AHEAD", 2)
    ids = [store.create(new_job(predicted_seconds=seconds)) for seconds in (1.0, 3.0, 8.0, 8.0)]
    got = read_ahead(server, ids[3])
    assert got.ahead == 3
    assert got.queued_seconds == pytest.approx((1.0 + 3.0) / 2 * 3)


def test_more_urgent_levels_count_in_full_and_only_the_own_level_is_extrapolated(
    server: fakeredis.FakeServer, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A low-priority job behind many urgent ones: their work is the job store's exact sum, not
    a scan of them; the scan and its extrapolation cover the jobs ahead in its own level."""
    monkeypatch.setattr(eta, "QUEUE_SCAN_LIMIT", 2)
    monkeypatch.setattr(eta, "SIMULATED_AHEAD", 2)
    for seconds in (1.0, 2.0, 4.0, 8.0, 16.0):
        store.create(new_job(predicted_seconds=seconds, level=0))
    for seconds in (3.0, 5.0, 100.0):
        store.create(new_job(predicted_seconds=seconds, level=1))
    waiting = store.create(new_job(predicted_seconds=1.0, level=1))
    store.create(new_job(predicted_seconds=50.0, level=0))  # urgent, after it: ahead of it too
    got = read_ahead(server, waiting)
    assert got.ahead == 9
    # 81 s of urgent work exactly, then (3 + 5) / 2 per job for the 3 ahead in its level.
    assert got.queued_seconds == pytest.approx(1 + 2 + 4 + 8 + 16 + 50 + (3.0 + 5.0) / 2 * 3)
    assert got.first == pytest.approx((1.0, 2.0))  # the first SIMULATED_AHEAD, in order


def test_the_head_reaches_past_the_scan_into_its_own_level(
    server: fakeredis.FakeServer, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulated head is the first jobs in the order workers take them, urgent ones first,
    however few of its own level the sum scans; what it reads is summed exactly."""
    monkeypatch.setattr(eta, "QUEUE_SCAN_LIMIT", 1)
    for seconds in (1.0, 2.0):
        store.create(new_job(predicted_seconds=seconds, level=0))
    for seconds in (3.0, 5.0, 100.0):
        store.create(new_job(predicted_seconds=seconds, level=1))
    waiting = store.create(new_job(predicted_seconds=1.0, level=1))
    got = read_ahead(server, waiting)
    assert got.first == pytest.approx((1.0, 2.0, 3.0, 5.0, 100.0))
    assert got.queued_seconds == pytest.approx(1 + 2 + 3 + 5 + 100)


# ---------------------------------------------------------------- learning


def test_first_observation_is_taken_as_is(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("demo", units=10.0, run_seconds=5.0, job_seconds=8.0)
    assert recorder.unit_seconds("demo") == pytest.approx(0.5)
    assert float(client.hget(keys.STATS_ALL, "job_seconds")) == pytest.approx(8.0)
    assert client.hget(keys.model_stats("demo"), "n") == b"1"


def test_later_observations_are_alpha_weighted(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("demo", units=10.0, run_seconds=5.0, job_seconds=8.0, shape=SMALL)
    recorder.record("demo", units=10.0, run_seconds=10.0, job_seconds=18.0, shape=SMALL)
    assert recorder.unit_seconds("demo") == pytest.approx(ALPHA * 1.0 + (1 - ALPHA) * 0.5)
    shape = float(client.hget(keys.model_stats("demo"), SMALL.field))
    assert shape == pytest.approx(ALPHA * 18.0 + (1 - ALPHA) * 8.0, abs=1e-6)
    assert client.hget(keys.model_stats("demo"), "n") == b"2"


def test_zero_work_units_leave_the_unit_time_alone(client: redis.Redis) -> None:
    recorder = DurationRecorder(client)
    recorder.record("demo", units=0.0, run_seconds=5.0, job_seconds=6.0)
    assert recorder.unit_seconds("demo") is None


def learn(client: redis.Redis, samples: list[tuple[Shape, float]], model: str = "demo") -> None:
    recorder = DurationRecorder(client)
    for shape, seconds in samples:
        recorder.record(model, shape.units, seconds * 0.9, seconds, shape=shape)


def test_measured_shapes_feed_the_next_estimate(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    # A tiny model: a fixed 80 ms per job whatever its size, plus 0.4 s a unit.
    def seconds(shape: Shape) -> float:
        return 0.08 + 0.4 * shape.units

    learn(client, [(SMALL, seconds(SMALL)), (LARGE, seconds(LARGE))] * 3)
    for shape in (SMALL, LARGE):
        got = predict_run_seconds(read(server, shape=shape).stats, shape, DEFAULT)
        assert got == pytest.approx(seconds(shape), rel=1e-3)
    unseen = Shape("txt2img", 96, 96, 6, 2)
    got = predict_run_seconds(read(server, shape=unseen).stats, unseen, DEFAULT)
    assert got == pytest.approx(seconds(unseen), rel=0.01)
    # Another model, or another kind of this one, learns nothing from these.
    assert read(server, "other", SMALL).stats == RunStats()
    other_kind = Shape("img2img", 64, 64, 2, 1)
    assert read(server, shape=other_kind).stats.fit is None


def test_the_line_follows_a_change_in_speed(
    server: fakeredis.FakeServer, client: redis.Redis
) -> None:
    learn(client, [(SMALL, 1.0), (LARGE, 4.0)] * 10)
    learn(client, [(SMALL, 0.5), (LARGE, 2.0)] * 40)  # the fleet moved to faster GPUs
    unseen = Shape("txt2img", 96, 96, 2, 1)
    got = predict_run_seconds(read(server, shape=unseen).stats, unseen, DEFAULT)
    expected = 0.5 + (2.0 - 0.5) * (unseen.units - SMALL.units) / (LARGE.units - SMALL.units)
    assert got == pytest.approx(expected, rel=0.05)


def test_heartbeats_age_out_after_a_day(client: redis.Redis) -> None:
    heartbeat(client, "w1", now=NOW)
    heartbeat(client, "w2", now=NOW + 2 * 24 * 3600)
    assert client.zrange(keys.WORKERS, 0, -1) == [b"w2"]


# ---------------------------------------------------------------- priority levels


def test_a_job_waits_only_behind_its_level_and_the_levels_served_before(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    low = [store.create(new_job(predicted_seconds=5.0, level=2)) for _ in range(2)]
    normal = store.create(new_job(predicted_seconds=2.0, level=1))
    high = store.create(new_job(predicted_seconds=1.0, level=0))
    view = read_view(server)
    assert view.queued_by_level == {2: 10.0, 1: 2.0, 0: 1.0}
    assert view.at_level(0).queued_seconds == 1.0
    assert view.at_level(1).queued_seconds == 3.0
    assert view.at_level(3).queued_seconds == 13.0
    # The head of the queue, one by one, in the order workers take it: the more urgent first.
    assert view.at_level(0).first == (1.0,)
    assert view.at_level(1).first == (1.0, 2.0)
    assert view.at_level(3).first == (1.0, 2.0, 5.0, 5.0)
    # Fetch: the later high job is first in the queue, the earlier low jobs last.
    positions = {job_id: read_ahead(server, job_id).ahead for job_id in [*low, normal, high]}
    assert positions == {high: 0, normal: 1, low[0]: 2, low[1]: 3}
    assert read_ahead(server, low[1]).queued_seconds == pytest.approx(8.0)


def test_a_levels_work_returns_to_zero_when_its_last_job_leaves(
    client: redis.Redis, store: JobStore
) -> None:
    kept = store.create(new_job(predicted_seconds=0.1, level=0))
    taken = [store.create(new_job(predicted_seconds=0.1, level=2)) for _ in range(3)]
    for job_id in taken:
        store.acquire(job_id, new_lease_token())
    assert queued_seconds(client, level=2) == 0.0
    assert queued_seconds(client, level=0) == pytest.approx(0.1)
    assert client.zrange(keys.QUEUED_JOBS, 0, -1) == [str(kept).encode()]


def test_the_submitting_keys_unfinished_jobs_are_read_with_the_queue(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    for _ in range(3):
        store.create(new_job(owner="key-1"))
    store.create(new_job(owner="key-2"))
    assert read_view(server).unfinished == 3
