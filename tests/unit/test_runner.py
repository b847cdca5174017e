"""The runner with fakes: what a job's failure tells the client, and what bookkeeping failures
must not cost it (its outputs, its webhook)."""

from __future__ import annotations

from typing import Any

import redis
from PIL import Image

from dreamq.jobparams import ImageInput, JobParams
from dreamq.queue import RecordingPublisher
from dreamq.registry import Registry
from storage.eta import DurationRecorder
from storage.jobs import JobStatus, JobStore, NewJob
from storage.objects import MemoryObjectStore
from workers.generate import Generation, JobRefused
from workers.helpers import HelperModels
from workers.runner import GENERIC_FAILURE, JobRunner


class FakeGenerator:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def check(self, model_id: str, params: JobParams) -> None:
        pass

    def run(self, model_id: str, params: JobParams, **_: Any) -> Generation:
        if self.error is not None:
            raise self.error
        image = Image.new("RGB", (64, 64), (1, 2, 3))
        return Generation(images=[image], width=64, height=64, pipeline_seconds=0.01)


def broken() -> None:
    raise redis.ConnectionError("Redis went away")


def runner(client: redis.Redis, generator: FakeGenerator, **hooks: Any) -> JobRunner:
    def no_inputs(ref: ImageInput, field: str) -> Image.Image:
        raise AssertionError("no input expected")

    return JobRunner(
        jobs=JobStore(client, ttl_seconds=60),
        objects=MemoryObjectStore(),
        generator=generator,
        helpers=HelperModels(Registry(models={})),
        fetch_image=no_inputs,
        durations=DurationRecorder(client),
        publisher=hooks.pop("publisher", RecordingPublisher()),
        **hooks,
    )


def submit(client: redis.Redis) -> int:
    params = JobParams(kind="txt2img", prompt="a fox", width=64, height=64, steps=2)
    return JobStore(client, ttl_seconds=60).create(
        NewJob(
            owner="k1",
            model_id="demo",
            kind="txt2img",
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
    # 0.01 s of pipeline, one tick for translation (none here) and one for encoding.
    assert job.generation_time < 3
