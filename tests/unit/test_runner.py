"""The runner with fakes: what a job's failure tells the client, and what bookkeeping failures
must not cost it (its outputs, its webhook); the tail handed to the finisher (inline and on its
thread): the task returns first, the lease holds until the tail ends it, a failing tail fails the
job; the input downloads beside the model's preparation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from dreamq.errors import PublicJobError
from dreamq.jobparams import ImageInput, JobParams
from dreamq.queue import RecordingPublisher
from dreamq.registry import Registry
from storage import keys
from storage.eta import DurationRecorder, Shape, work_units
from storage.jobs import JobStatus, JobStore, NewJob
from storage.objects import MemoryObjectStore
from workers.finisher import Finisher, InlineFinisher, Tail, ThreadFinisher
from workers.generate import Generation, JobRefused
from workers.helpers import HelperModels
from workers.prefetch import Inputs
from workers.runner import GENERIC_FAILURE, JobRunner
from workers.supervision import TIMEOUT_FAILURE

LONG = 10.0  # a bound no passing test waits for


class FakeGenerator:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def check(self, model_id: str, params: JobParams) -> None:
        pass

    def run(
        self,
        model_id: str,
        params: JobParams,
        *,
        inputs: Callable[[], Inputs] | None = None,
        **_: Any,
    ) -> Generation:
        if self.error is not None:
            raise self.error
        self.inputs = inputs() if inputs is not None else (None, None)
        image = Image.new("RGB", (64, 64), (1, 2, 3))
        return Generation(images=[image], width=64, height=64, pipeline_seconds=0.01)


def broken() -> None:
    raise redis.ConnectionError("Redis went away")


def no_inputs(ref: ImageInput, field: str) -> Image.Image:
    raise AssertionError("no input expected")


def runner(client: redis.Redis, generator: FakeGenerator, **hooks: Any) -> JobRunner:
    return JobRunner(
        jobs=hooks.pop("jobs", JobStore(client, ttl_seconds=60)),
        objects=hooks.pop("objects", MemoryObjectStore()),
        generator=generator,
        helpers=HelperModels(Registry(models={})),
        fetch_image=hooks.pop("fetch_image", no_inputs),
        durations=hooks.pop("durations", DurationRecorder(client)),
        publisher=hooks.pop("publisher", RecordingPublisher()),
        **hooks,
    )


def submit(client: redis.Redis, kind: str = "txt2img") -> int:
    params = JobParams(kind="txt2img", prompt="a fox", width=64, height=64, steps=2)
    if kind == "img2img":
        params = JobParams(
            kind="img2img",
            prompt="a fox",
            steps=2,
            init_image=ImageInput(url="https://images.example.com/fox.png"),
            strength=0.5,
        )
    return JobStore(client, ttl_seconds=60).create(
        NewJob(
            owner="k1",
            model_id="demo",
            kind=kind,
            params=params.to_dict(),
            meta={},
            file_prefix="p",
            future_links=["memory://outputs/generations/p-0.png"],
            predicted_seconds=1.0,
            eta_seconds=1.0,
            webhook="https://hooks.example.com/x",
        )
    )


def test_a_refusal_only_the_loaded_model_can_find_is_a_public_failure(
    client: redis.Redis,
) -> None:
    refused = JobRefused({"self_attention": ["The self_attention field needs ..."]})
    job_id = submit(client)
    runner(client, FakeGenerator(refused)).run(job_id)
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert job.error == "The self_attention field needs ..."


def test_an_unexpected_error_is_the_generic_failure(client: redis.Redis) -> None:
    job_id = submit(client)
    runner(client, FakeGenerator(RuntimeError("CUDA exploded at 0x7f"))).run(job_id)
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None and job.error == GENERIC_FAILURE


def test_failing_bookkeeping_costs_neither_the_job_nor_its_webhook(client: redis.Redis) -> None:
    publisher = RecordingPublisher()
    job_id = submit(client)
    runner(client, FakeGenerator(), publisher=publisher, before_job=broken, after_job=broken).run(
        job_id
    )
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None and job.status is JobStatus.SUCCESS
    assert job.meta["W"] == 64
    assert publisher.webhooks == [job_id]


def test_generation_time_counts_the_pipeline_not_a_cold_load(client: redis.Redis) -> None:
    ticks = iter(float(t) for t in range(100))  # the runner's clock: one second per reading

    class SlowLoad(FakeGenerator):
        def run(self, model_id: str, params: JobParams, **_: Any) -> Generation:
            for _ in range(10):  # ten clock readings spent "loading"
                next(ticks)
            return super().run(model_id, params)

    job_id = submit(client)
    runner(client, SlowLoad(), clock=lambda: next(ticks)).run(job_id)
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None and job.generation_time is not None
    # 0.01 s of pipeline, one tick each for translation (none here), post-processing (none) and
    # encoding: the ten ticks of the load are not counted.
    assert job.generation_time < 4
    assert job.pipeline_time == 0.01  # the pipeline call alone


# --- the tail on the finisher -----------------------------------------------------------------


def get(client: redis.Redis, job_id: int) -> Any:
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None
    return job


@pytest.fixture
def finisher() -> Iterator[ThreadFinisher]:
    finisher = ThreadFinisher(deadline=60)
    yield finisher
    assert finisher.close(timeout=LONG)


class GatedStore(MemoryObjectStore):
    """An upload that waits until the test lets it through."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.entered.set()
        assert self.release.wait(LONG)
        super().put(key, data, content_type)


def test_the_task_returns_while_the_tail_stores_and_the_lease_holds_until_it_ends(
    client: redis.Redis, finisher: ThreadFinisher
) -> None:
    objects, publisher = GatedStore(), RecordingPublisher()
    job_id = submit(client)
    the_runner = runner(
        client, FakeGenerator(), objects=objects, publisher=publisher, finisher=finisher
    )
    assert the_runner.run(job_id) is None  # the task is done: Celery acks, the next job runs
    assert objects.entered.wait(LONG)
    job = get(client, job_id)
    # Still held: no duplicate delivery and no reconciler pass can run it meanwhile.
    assert job.status is JobStatus.PROCESSING
    assert client.exists(keys.job_lease(job_id))
    assert publisher.webhooks == []
    objects.release.set()
    assert finisher.drain(timeout=LONG)
    job = get(client, job_id)
    assert (job.status, job.pipeline_time, job.meta["W"]) == (JobStatus.SUCCESS, 0.01, 64)
    assert not client.exists(keys.job_lease(job_id))
    assert publisher.webhooks == [job_id]
    assert objects.get("generations/p-0.png").startswith(b"\x89PNG")


class BrokenStore(MemoryObjectStore):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        raise OSError("the bucket is gone")


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "threaded"])
def test_a_failing_upload_fails_the_job_logs_it_and_hands_off_its_webhook(
    client: redis.Redis, caplog: pytest.LogCaptureFixture, threaded: bool
) -> None:
    publisher = RecordingPublisher()
    finisher: Finisher = ThreadFinisher(deadline=60) if threaded else InlineFinisher()
    job_id = submit(client)
    the_runner = runner(
        client, FakeGenerator(), objects=BrokenStore(), publisher=publisher, finisher=finisher
    )
    the_runner.run(job_id)
    assert finisher.close(timeout=LONG)
    job = get(client, job_id)
    assert (job.status, job.error) == (JobStatus.FAILED, GENERIC_FAILURE)
    assert not client.exists(keys.job_lease(job_id))
    assert publisher.webhooks == [job_id]
    assert f"job {job_id}: failed while its outputs were stored or recorded" in caplog.text
    assert "the bucket is gone" in caplog.text


class FlakyStore(JobStore):
    """Redis drops the connection on the success transition (before applying it)."""

    def succeed(self, job_id: int, **fields: Any) -> bool:
        raise redis.ConnectionError("Redis went away")


def test_a_redis_error_at_the_success_transition_fails_the_job_instead(
    client: redis.Redis, finisher: ThreadFinisher
) -> None:
    publisher = RecordingPublisher()
    job_id = submit(client)
    the_runner = runner(
        client,
        FakeGenerator(),
        jobs=FlakyStore(client, ttl_seconds=60),
        publisher=publisher,
        finisher=finisher,
    )
    the_runner.run(job_id)
    assert finisher.drain(timeout=LONG)
    job = get(client, job_id)
    assert (job.status, job.error) == (JobStatus.FAILED, GENERIC_FAILURE)
    assert publisher.webhooks == [job_id]


def test_a_failed_generation_is_ended_by_the_finisher_too(
    client: redis.Redis, finisher: ThreadFinisher
) -> None:
    ended: list[tuple[str, str]] = []
    publisher = RecordingPublisher()
    job_id = submit(client)

    def on_finished(model_id: str, kind: str, status: str, seconds: float) -> None:
        ended.append((status, threading.current_thread().name))

    the_runner = runner(
        client,
        FakeGenerator(RuntimeError("CUDA exploded")),
        publisher=publisher,
        finisher=finisher,
        on_finished=on_finished,
    )
    the_runner.run(job_id)
    assert finisher.drain(timeout=LONG)
    assert get(client, job_id).error == GENERIC_FAILURE
    assert ended == [("failed", "dreamq-finisher")]
    assert publisher.webhooks == [job_id]


class SoftLimitWhileWaiting:
    """A finisher whose previous tail outlived this job's soft time limit."""

    def submit(self, tail: Tail) -> None:
        raise SoftTimeLimitExceeded()

    def drain(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True


def test_a_soft_time_limit_while_handing_over_fails_the_job_with_timeout_once(
    client: redis.Redis,
) -> None:
    publisher = RecordingPublisher()
    job_id = submit(client)
    the_runner = runner(
        client, FakeGenerator(), publisher=publisher, finisher=SoftLimitWhileWaiting()
    )
    assert the_runner.run(job_id) is None
    job = get(client, job_id)
    assert (job.status, job.error) == (JobStatus.FAILED, TIMEOUT_FAILURE)
    assert publisher.webhooks == [job_id]


class Durations:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float, float, Shape | None]] = []

    def record(
        self,
        model_id: str,
        units: float,
        run_seconds: float,
        job_seconds: float,
        shape: Shape | None = None,
    ) -> None:
        self.calls.append((model_id, units, run_seconds, job_seconds, shape))


def test_the_durations_are_recorded_from_the_tail_with_the_same_quantities(
    client: redis.Redis, finisher: ThreadFinisher
) -> None:
    durations = Durations()
    ticks = iter(float(t) for t in range(100))  # the runner's clock: one second per reading
    job_id = submit(client)
    the_runner = runner(
        client,
        FakeGenerator(),
        durations=durations,
        finisher=finisher,
        clock=lambda: next(ticks),
    )
    the_runner.run(job_id)
    assert finisher.drain(timeout=LONG)
    job = get(client, job_id)
    [(model_id, units, run_seconds, job_seconds, shape)] = durations.calls
    assert (model_id, units) == ("demo", work_units(64, 64, 2, 1))
    # The ETA learns the job's time under its shape, the one the API predicts it by.
    assert shape == Shape("txt2img", 64, 64, 2, 1)
    # Readings: claim 0, start 1, compute 2, translated 3, generated 4, post-processed 5,
    # encoding 6, encoded 7, success 8. The run: translation (1) + the pipeline (0.01) +
    # post-processing (1) + encoding (1), as generation_time; the job: start to success.
    assert run_seconds == pytest.approx(3.01)
    assert job.generation_time == 3.01
    assert job_seconds == 7.0


# --- input downloads beside the model's preparation ---------------------------------------------


class PreparingGenerator(FakeGenerator):
    """Says when the model is ready (loaded, adapters on): the moment it asks for the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared = threading.Event()
        self.order: list[str] = []

    def run(self, model_id: str, params: JobParams, **kwargs: Any) -> Generation:
        self.order.append("prepare model")
        self.prepared.set()
        return super().run(model_id, params, **kwargs)


def test_the_input_downloads_while_the_model_is_prepared(client: redis.Redis) -> None:
    generator = PreparingGenerator()
    fetched: list[tuple[str, str]] = []

    def fetch(ref: ImageInput, field: str) -> Image.Image:
        # Only possible when the download runs beside the preparation, not before it.
        assert generator.prepared.wait(LONG), "the download did not overlap the preparation"
        fetched.append((field, threading.current_thread().name))
        return Image.new("RGB", (64, 64), (9, 9, 9))

    job_id = submit(client, "img2img")
    runner(client, generator, fetch_image=fetch, overlap_inputs=True).run(job_id)
    assert get(client, job_id).status is JobStatus.SUCCESS
    assert fetched == [("init_image", "dreamq-input-init_image")]
    init, mask = generator.inputs
    assert init is not None and init.getpixel((0, 0)) == (9, 9, 9) and mask is None


def test_without_overlap_the_input_is_fetched_before_generation(client: redis.Redis) -> None:
    generator = PreparingGenerator()

    def fetch(ref: ImageInput, field: str) -> Image.Image:
        generator.order.append(f"fetch {field}")
        return Image.new("RGB", (64, 64))

    job_id = submit(client, "img2img")
    runner(client, generator, fetch_image=fetch).run(job_id)
    assert get(client, job_id).status is JobStatus.SUCCESS
    assert generator.order == ["fetch init_image", "prepare model"]


@pytest.mark.parametrize("overlap", [False, True], ids=["before", "beside"])
def test_a_refused_download_fails_the_job_with_its_message(
    client: redis.Redis, overlap: bool
) -> None:
    def refused(ref: ImageInput, field: str) -> Image.Image:
        raise PublicJobError("The init_image URL is not allowed: private address.")

    job_id = submit(client, "img2img")
    runner(client, FakeGenerator(), fetch_image=refused, overlap_inputs=overlap).run(job_id)
    job = get(client, job_id)
    assert (job.status, job.error) == (
        JobStatus.FAILED,
        "The init_image URL is not allowed: private address.",
    )


class WatchedStore(JobStore):
    """Says when a claim found the job leased."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, ttl_seconds=60)
        self.found_leased = threading.Event()

    def acquire(self, job_id: int, token: str) -> Any:
        claim = super().acquire(job_id, token)
        if claim.outcome.value == "leased":
            self.found_leased.set()
        return claim


def test_a_copy_of_the_job_this_process_is_storing_waits_for_it_instead_of_looking_again(
    client: redis.Redis, finisher: ThreadFinisher
) -> None:
    """A broker blip puts a running job's message back; its copy reaches the same process just
    after the task returned, while the finisher stores the outputs (R7)."""
    objects, jobs = GatedStore(), WatchedStore(client)
    job_id = submit(client)
    the_runner = runner(client, FakeGenerator(), objects=objects, jobs=jobs, finisher=finisher)
    assert the_runner.run(job_id) is None
    assert objects.entered.wait(LONG)
    answers: list[float | None] = []
    copy = threading.Thread(target=lambda: answers.append(the_runner.run(job_id)))
    copy.start()
    assert jobs.found_leased.wait(LONG)  # the copy met the lease of its own process's tail
    objects.release.set()
    copy.join(LONG)
    assert answers == [None]  # done with it: no redelivery asked for once the lease expires
    job = get(client, job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCESS, 1)
