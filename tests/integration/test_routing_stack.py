"""Batching and model-aware routing end to end (workers/routing.py): the real API, real
`dreamq worker` processes on kombu's Redis transport, the tiny demo models.

- Compatible jobs waiting together run as one pipeline call: claimed in one step (one claim
  time), each with its own outputs, seeds and record.
- A job whose model another node holds warm, and which that node will serve sooner than a load
  here would take, is handed to that node's own queue. Redis serves the client blocked longest
  first, so without routing the idle cold worker would take every job.
"""

from __future__ import annotations

import re

import pytest
import redis

from storage.jobs import JobRecord, JobStatus, JobStore
from tests.support.processes import JobEvents
from tests.support.profile import QUICK, ProfileFactory

pytestmark = pytest.mark.integration


def test_compatible_waiting_jobs_run_as_one_batch(profile_factory: ProfileFactory) -> None:
    profile = profile_factory(batch_size=4)
    client = redis.Redis.from_url(profile.redis.url)
    batch = [
        profile.submit(prompt="a fox", seed="1", samples="1", **QUICK),
        profile.submit(prompt="a cat", seed="2", samples="2", **QUICK),
        profile.submit(prompt="a dog", seed="3", samples="1", **QUICK),
    ]
    apart = profile.submit(prompt="a fox", seed="1", **{**QUICK, "num_inference_steps": "3"})
    jobs, events = JobStore(client, ttl_seconds=60), JobEvents(client)
    with profile.worker("--concurrency", "1") as worker:
        records = [wait_success(jobs, events, job_id) for job_id in [*batch, apart]]
        worker.wait_for(rf"jobs {batch[0]}, {batch[1]}, {batch[2]}: processing as one batch", 5)
    together, alone = records[:3], records[3]
    assert len({record.started_at for record in together}) == 1  # one claim
    assert alone.started_at != together[0].started_at
    assert [len(record.output) for record in together] == [1, 2, 1]
    assert [len(profile.output_files(record)) for record in together] == [1, 2, 1]
    shares = [record.pipeline_time or 0.0 for record in together]
    assert shares[1] == pytest.approx(2 * shares[0], rel=0.05, abs=0.002)  # by samples


def test_a_cold_worker_leaves_a_job_to_the_warm_node(profile_factory: ProfileFactory) -> None:
    profile = profile_factory()
    client = redis.Redis.from_url(profile.redis.url)
    jobs, events = JobStore(client, ttl_seconds=60), JobEvents(client)

    def submit_xl() -> int:
        return profile.submit(model_id="demo-xl", **QUICK)

    with profile.worker("--concurrency", "1") as warm:
        first = submit_xl()
        wait_success(jobs, events, first)  # the warm worker loads demo-xl and records its load
        with profile.worker("--concurrency", "1") as cold:
            # Blocked on the broker since it started, the cold worker is served first.
            ids = []
            for _ in range(4):
                job_id = submit_xl()
                wait_success(jobs, events, job_id)
                ids.append(job_id)
            ran_warm = processed(warm.lines)
            ran_cold = processed(cold.lines)
            assert set(ids) <= ran_warm, cold.tail()
            assert not ran_cold & set(ids)
            assert cold.count(r"left to node ") >= 1  # it did receive messages, and passed them
            assert cold.count(r"model demo-xl loaded") == 0
            # A job for a model nobody holds is loaded by whoever is free: here, cold's turn.
            fresh = profile.submit(**QUICK)  # `demo`: nobody holds it
            try:
                wait_success(jobs, events, fresh)
            except TimeoutError:  # what each worker did, for a failure seen once in CI
                raise AssertionError(
                    f"job {fresh}: {jobs.get(fresh)}\n--- warm\n{warm.tail(60)}\n"
                    f"--- cold\n{cold.tail(60)}"
                ) from None


def processed(lines: list[str]) -> set[int]:
    found = set()
    for line in lines:
        match = re.search(r"job (\d+): processing \(model", line)
        if match:
            found.add(int(match.group(1)))
    return found


def wait_success(jobs: JobStore, events: JobEvents, job_id: int) -> JobRecord:
    assert events.wait_for(job_id, timeout=120) == "success"
    record = jobs.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCESS
    return record
