"""The runner with routing (workers/routing.py) on a fake generator: a message claims the work
that suits its process, a batch runs as one call with each job ending on its own, and a job left
to a warm node is handed over."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from PIL import Image

from dreamq.errors import PublicJobError
from dreamq.jobparams import JobParams
from dreamq.queue import RecordingPublisher
from dreamq.registry import Registry
from storage import keys
from storage.claims import ClaimStore
from storage.eta import DurationRecorder
from storage.jobs import JobStatus, JobStore, NewJob
from storage.objects import MemoryObjectStore
from storage.workers import WorkerStore
from workers.generate import Generation
from workers.helpers import HelperModels
from workers.prefetch import Inputs
from workers.runner import JobRunner, Routing

NODE = "celery@gpu-a"


class BatchGenerator:
    """Records its calls; a job whose prompt is 'bad' gets an error in its slot."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def check(self, model_id: str, params: JobParams) -> None:
        pass

    def run(self, model_id: str, params: JobParams, **_: Any) -> Generation:
        self.calls.append([params.prompt])
        return _generation(params, 0.04)

    def run_batch(
        self,
        model_id: str,
        batch: Sequence[JobParams],
        *,
        inputs: Sequence[Callable[[], Inputs] | None],
    ) -> list[Generation | Exception]:
        self.calls.append([params.prompt for params in batch])
        return [
            ValueError("The init image could not be read.")
            if params.prompt == "bad"
            else _generation(params, 0.01 * params.samples)
            for params in batch
        ]


def _generation(params: JobParams, seconds: float) -> Generation:
    images = [Image.new("RGB", (64, 64), (i, 2, 3)) for i in range(params.samples)]
    return Generation(images=images, width=64, height=64, pipeline_seconds=seconds)


def submit(
    client: redis.Redis, prompt: str, *, model: str = "demo", key: str = "demo\nk", samples: int = 1
) -> int:
    params = JobParams(kind="txt2img", prompt=prompt, width=64, height=64, steps=2, samples=samples)
    return JobStore(client, ttl_seconds=60).create(
        NewJob(
            owner="k1",
            model_id=model,
            kind="txt2img",
            params=params.to_dict(),
            meta={},
            file_prefix=f"p-{prompt}",
            future_links=[f"memory://outputs/p-{prompt}-{i}.png" for i in range(samples)],
            predicted_seconds=1.0,
            eta_seconds=1.0,
            webhook="https://hooks.example.com/x",
            batch_key=key,
            samples=samples,
        )
    )


def routed_runner(
    client: redis.Redis,
    generator: BatchGenerator,
    publisher: RecordingPublisher,
    *,
    warm: Sequence[str] = ("demo",),
    handed: list[tuple[int, int, str]] | None = None,
) -> JobRunner:
    jobs = JobStore(client, ttl_seconds=60)
    routing = Routing(
        claims=ClaimStore(client, jobs),
        warm=lambda: warm,
        process="gpu-a:1",
        batch_images=4,
        hand_off=lambda job_id, level, node: (handed if handed is not None else []).append(
            (job_id, level, node)
        ),
    )
    return JobRunner(
        jobs=jobs,
        objects=MemoryObjectStore(),
        generator=generator,
        helpers=HelperModels(Registry(models={})),
        fetch_image=lambda ref, field: Image.new("RGB", (8, 8)),
        durations=DurationRecorder(client),
        publisher=publisher,
        routing=routing,
    )


def status(client: redis.Redis, job_id: int) -> JobStatus:
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None
    return job.status


def test_compatible_jobs_run_as_one_call_and_end_one_by_one(client: redis.Redis) -> None:
    ids = [submit(client, p, samples=s) for p, s in (("a", 1), ("b", 2), ("c", 1))]
    other = submit(client, "d", key="demo\nother")
    generator, publisher = BatchGenerator(), RecordingPublisher()
    routed_runner(client, generator, publisher).run(ids[2], node=NODE)
    assert generator.calls == [["a", "b", "c"]]  # the message of "c" brought the whole batch
    store = JobStore(client, ttl_seconds=60)
    for job_id, samples in zip(ids, (1, 2, 1), strict=True):
        job = store.get(job_id)
        assert job is not None and job.status is JobStatus.SUCCESS
        assert len(job.output) == samples
        assert job.pipeline_time == round(0.01 * samples, 3)  # its share of the call
    assert publisher.webhooks == ids
    assert status(client, other) is JobStatus.QUEUED  # another key: not in the batch


def test_a_member_that_fails_fails_alone(client: redis.Redis) -> None:
    ids = [submit(client, p) for p in ("a", "bad", "c")]
    routed_runner(client, BatchGenerator(), RecordingPublisher()).run(ids[0], node=NODE)
    store = JobStore(client, ttl_seconds=60)
    bad = store.get(ids[1])
    assert bad is not None and bad.status is JobStatus.FAILED
    assert bad.error == "The init image could not be read."
    assert [status(client, ids[0]), status(client, ids[2])] == [JobStatus.SUCCESS] * 2


def test_a_message_whose_job_went_elsewhere_claims_the_next_one(client: redis.Redis) -> None:
    first, second = submit(client, "a", key=""), submit(client, "b", key="")
    generator = BatchGenerator()
    routed_runner(client, generator, RecordingPublisher()).run(second, node=NODE)
    assert generator.calls == [["a"]]  # the head of the queue, whichever message woke it
    assert (status(client, first), status(client, second)) == (JobStatus.SUCCESS, JobStatus.QUEUED)
    routed_runner(client, generator, RecordingPublisher()).run(first, node=NODE)
    assert status(client, second) is JobStatus.SUCCESS
    # A message with nothing left to claim ends without work.
    routed_runner(client, generator, RecordingPublisher()).run(first, node=NODE)
    assert generator.calls == [["a"], ["b"]]


def test_a_cold_job_is_handed_to_the_warm_node_and_the_next_one_runs_here(
    client: redis.Redis,
) -> None:
    cold = submit(client, "x", model="xl", key="")
    warm = submit(client, "a", key="")
    client.hset(keys.model_stats("xl"), "load_seconds", "30")
    workers = WorkerStore(client)
    workers.publish_models("gpu-b:7", ["xl"], until=4e9)
    jobs = JobStore(client, ttl_seconds=60)
    ClaimStore(client, jobs).note_busy("gpu-b:7", "celery@gpu-b", 0.0)  # free now
    handed: list[tuple[int, int, str]] = []
    generator = BatchGenerator()
    routed_runner(client, generator, RecordingPublisher(), handed=handed).run(cold, node=NODE)
    assert handed == [(cold, 0, "celery@gpu-b")]
    assert generator.calls == [["a"]]
    assert (status(client, cold), status(client, warm)) == (JobStatus.QUEUED, JobStatus.SUCCESS)
    # The message handed over, wherever it lands, runs the job even cold.
    routed_runner(client, generator, RecordingPublisher(), warm=()).run(
        cold, node="celery@gpu-b", routed=True
    )
    assert status(client, cold) is JobStatus.SUCCESS


def test_a_job_of_a_dead_holder_is_re_driven_by_its_own_message(client: redis.Redis) -> None:
    lost, waiting = submit(client, "lost", key=""), submit(client, "w", key="")
    jobs = JobStore(client, ttl_seconds=60)
    jobs.acquire(lost, "host:99:x")
    assert jobs.release_lease(lost, "host:99:")  # its process died; the main process freed it
    generator = BatchGenerator()
    routed_runner(client, generator, RecordingPublisher()).run(lost, node=NODE)
    assert generator.calls == [["lost"]]
    job = jobs.get(lost)
    assert job is not None and (job.status, job.attempts) == (JobStatus.SUCCESS, 2)
    assert status(client, waiting) is JobStatus.QUEUED


def test_a_public_error_of_the_whole_batch_fails_each_job_with_it(client: redis.Redis) -> None:
    class Broken(BatchGenerator):
        def run_batch(self, *args: Any, **kwargs: Any) -> list[Generation | Exception]:
            raise PublicJobError("The model demo could not be loaded.")

    ids = [submit(client, p) for p in ("a", "b")]
    routed_runner(client, Broken(), RecordingPublisher()).run(ids[0], node=NODE)
    for job_id in ids:
        job = JobStore(client, ttl_seconds=60).get(job_id)
        assert job is not None and job.error == "The model demo could not be loaded."


def test_a_message_whose_job_another_claim_runs_works_and_looks_again(client: redis.Redis) -> None:
    held, waiting = submit(client, "held", key=""), submit(client, "w", key="")
    jobs = JobStore(client, ttl_seconds=60, lease_seconds=30)
    jobs.acquire(held, "host:99:x")  # a batch of another process took it (its holder may die)
    generator = BatchGenerator()
    look_again = routed_runner(client, generator, RecordingPublisher()).run(held, node=NODE)
    assert generator.calls == [["w"]]  # the message stands in for the job it can run
    assert status(client, waiting) is JobStatus.SUCCESS
    assert look_again is not None and 1 < look_again <= 31
