"""The worker's main process and the jobs its dead pool process held: the one its message named,
the others it claimed for that message (a batch), and one it was still finishing (its task had
returned, its message was acked, its tail was in the finisher). Every job a token of that process
still holds is freed and published again (but the one whose message Celery re-queues); a job that
ended, or one another process holds, is left alone."""

from __future__ import annotations

import pytest
import redis
from celery import Celery

from dreamq.queue import RecordingPublisher
from dreamq.settings import Settings
from storage.jobs import ClaimOutcome, JobStatus, JobStore, lease_owner
from tests.support.jobs import new_job
from workers.supervision import TIMEOUT_FAILURE, JobSupervisor

DEAD = 41  # the pool process that died
OTHER = 42


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, ttl_seconds=3600, lease_seconds=30, max_attempts=3)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def supervisor(store: JobStore, publisher: RecordingPublisher) -> JobSupervisor:
    app = Celery(set_as_current=False)
    return JobSupervisor(Settings(), app, jobs=store, publisher=publisher)


def claimed(store: JobStore, pid: int, name: str) -> int:
    job_id = store.create(new_job(webhook="https://hooks.test/x"))
    assert store.acquire(job_id, lease_owner(pid) + name).outcome is ClaimOutcome.CLAIMED
    return job_id


def test_a_process_lost_mid_job_also_redelivers_the_job_it_was_storing(
    store: JobStore, supervisor: JobSupervisor, publisher: RecordingPublisher
) -> None:
    finishing = claimed(store, DEAD, "a")  # its task returned; its tail was in the finisher
    running = claimed(store, DEAD, "b")
    supervisor.process_lost(running, DEAD)
    assert publisher.jobs == [finishing]  # the running job's own message is re-queued by Celery
    for job_id in (finishing, running):
        assert store.acquire(job_id, lease_owner(7) + "x").outcome is ClaimOutcome.CLAIMED
    job = store.get(finishing)
    assert job is not None and job.attempts == 2


def test_a_process_lost_mid_batch_redelivers_every_member(
    store: JobStore, supervisor: JobSupervisor, publisher: RecordingPublisher
) -> None:
    # One token claimed three jobs for one message (workers/routing.py); the message named a
    # fourth job, which another process ran.
    batch = [claimed(store, DEAD, "batch") for _ in range(3)]
    elsewhere = claimed(store, OTHER, "z")
    supervisor.process_lost(elsewhere, DEAD)
    assert sorted(publisher.jobs) == batch
    assert store.acquire(elsewhere, lease_owner(7) + "x").outcome is ClaimOutcome.LEASED


def test_a_job_the_dead_process_had_finished_is_left_alone(
    store: JobStore, supervisor: JobSupervisor, publisher: RecordingPublisher
) -> None:
    done = claimed(store, DEAD, "a")
    assert store.succeed(done, output=[], generation_time=1.0, lease=lease_owner(DEAD) + "a")
    supervisor.process_lost(claimed(store, DEAD, "b"), DEAD)
    assert publisher.jobs == []


def test_a_lease_another_process_holds_is_left_alone(
    store: JobStore, supervisor: JobSupervisor, publisher: RecordingPublisher
) -> None:
    # The job was run again elsewhere (its lease had expired): the dead process must not free
    # the new holder's lease.
    elsewhere = claimed(store, OTHER, "a")
    supervisor.processes_gone([DEAD])
    assert publisher.jobs == []
    assert store.acquire(elsewhere, lease_owner(7) + "x").outcome is ClaimOutcome.LEASED


def test_a_process_gone_between_jobs_redelivers_its_finishing_job_once(
    store: JobStore, supervisor: JobSupervisor, publisher: RecordingPublisher
) -> None:
    finishing = claimed(store, DEAD, "a")
    claimed(store, OTHER, "z")  # another process: untouched
    supervisor.processes_gone([DEAD])
    supervisor.processes_gone([DEAD])  # the heartbeat and Celery may both report it
    assert publisher.jobs == [finishing]


def test_a_hard_limit_kill_fails_the_running_jobs_and_redelivers_the_finishing_one(
    store: JobStore, supervisor: JobSupervisor, publisher: RecordingPublisher, client: redis.Redis
) -> None:
    finishing = claimed(store, DEAD, "a")
    running = [claimed(store, DEAD, "b"), claimed(store, DEAD, "b")]  # a batch: one token
    # The batch was claimed after the finishing job started (its own claim time).
    client.hset(f"dreamq:job:{finishing}", "started_at", 1.0)
    supervisor.timed_out(running[0], DEAD)
    for job_id in running:
        job = store.get(job_id)
        assert job is not None and (job.status, job.error) == (JobStatus.FAILED, TIMEOUT_FAILURE)
    assert publisher.webhooks == running
    assert publisher.jobs == [finishing]
