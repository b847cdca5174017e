"""Worker faults against real processes (R1, R2, R3, R4, R9, R12 of the reliability spec).

Each test runs its own `dreamq worker` subprocesses on a queue of its own, with a test profile of
low limits, against the session's redis-server; the API is the real app in process. Jobs are
made slow honestly: the tiny demo model at 128x128 takes about 0.4 s a step on one CPU thread.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.processes import JobEvents
from tests.support.profile import (
    QUICK,
    SLOW,
    ProfileFactory,
    force_visibility_expiry,
    processing,
    terminal_events,
)

pytestmark = pytest.mark.integration


def test_r1_pool_process_killed_mid_job_is_redelivered_and_completes(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory()
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        job_id = profile.submit(webhook=True, **SLOW)
        child = processing(worker, job_id, attempt=1)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        assert events.wait_for(job_id, timeout=90) == "success"
        print(f"\nR1: pool process kill -9 -> success in {time.monotonic() - killed:.1f} s")
        worker.wait_for(rf"job {job_id}: its worker process {child} died", timeout=5)
        assert processing(worker, job_id, attempt=2, timeout=5) != child
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 2)
    assert len(profile.output_files(job)) == 1  # one set of outputs
    assert terminal_events(events, job_id) == [f"{job_id} success"]
    assert profile.webhooks_queued() == 1  # one `completed` webhook handed off
    events.close()


def test_r3_a_job_redelivered_while_running_runs_once(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory()
    events = JobEvents(profile.redis.client())
    # Two pool processes: the redelivered message reaches the idle one while the job runs.
    with profile.worker("--concurrency", "2") as worker:
        job_id = profile.submit(**SLOW)
        processing(worker, job_id, attempt=1)
        force_visibility_expiry(profile)
        worker.wait_for(rf"job {job_id}: another worker process holds its lease", timeout=30)
        assert events.wait_for(job_id, timeout=60) == "success"
        assert worker.count(rf"job {job_id}: processing") == 1
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 1)
    assert terminal_events(events, job_id) == [f"{job_id} success"]
    events.close()


def test_r4_a_job_that_kills_its_process_every_time_stops_after_max_attempts(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory(attempts=2)
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        job_id = profile.submit(webhook=True, **SLOW)
        # The test is the crash: each attempt's process dies by kill -9 mid-job.
        for attempt in (1, 2):
            os.kill(processing(worker, job_id, attempt), signal.SIGKILL)
        assert events.wait_for(job_id, timeout=90) == "failed"
        job = profile.job(job_id)
        assert job.error == "The job failed 2 times; it was stopped."
        assert job.attempts == 2
        # Other jobs keep flowing.
        other = profile.submit(**QUICK)
        assert events.wait_for(other, timeout=60) == "success"
        assert profile.webhooks_queued() == 1  # one `failed` webhook
    assert terminal_events(events, job_id) == [f"{job_id} failed"]
    events.close()


def test_r9_sigterm_mid_job_finishes_the_job_then_exits(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory()
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        job_id = profile.submit(**SLOW)
        processing(worker, job_id, attempt=1)
        worker.process.send_signal(signal.SIGTERM)  # the main process: Celery's warm shutdown
        assert events.wait_for(job_id, timeout=60) == "success"
        assert worker.process.wait(timeout=60) == 0
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 1)
    client = profile.broker()
    assert profile.jobs_waiting() == 0
    assert client.hlen("unacked") == 0  # acked, not left for a redelivery
    events.close()


def test_r12_a_job_over_the_time_limit_fails_with_timeout_and_the_next_runs(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory(time_limit=3, visibility=6)
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        slow = profile.submit(webhook=True, width="128", height="128", num_inference_steps="40")
        started = time.monotonic()
        assert events.wait_for(slow, timeout=30) == "failed"
        assert time.monotonic() - started < 15
        job = profile.job(slow)
        assert job.error is not None and "timeout" in job.error
        nxt = profile.submit(**QUICK)
        assert events.wait_for(nxt, timeout=30) == "success"
        # Handed off by the job's own task, which ended before the next one started.
        assert profile.webhooks_queued() == 1
        worker.wait_for(rf"job {slow}: failed: over its time limit", timeout=5)
    events.close()


def test_r2_whole_worker_killed_mid_job_another_completes_it(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory(time_limit=10, visibility=20)
    events = JobEvents(profile.redis.client())
    with profile.worker() as first:
        job_id = profile.submit(**SLOW)
        processing(first, job_id, attempt=1)
        os.killpg(first.process.pid, signal.SIGKILL)
        killed = time.monotonic()
    with profile.worker() as second:
        bound = profile.settings.visibility_timeout + 10 + 30  # + restore tick + the job
        assert events.wait_for(job_id, timeout=bound) == "success"
        recovered = time.monotonic() - killed
        print(f"\nR2: worker group kill -9 -> success on another worker in {recovered:.1f} s")
        processing(second, job_id, attempt=2, timeout=5)
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 2)
    assert terminal_events(events, job_id) == [f"{job_id} success"]
    events.close()
