"""Job leases and the attempts cap (storage/jobs.py) on fakeredis: a duplicate delivery exits, a
stale worker cannot overwrite, an expired lease lets a redelivery claim, a poison job stops."""

from __future__ import annotations

import os

import pytest
import redis

from storage import keys
from storage.jobs import (
    ClaimOutcome,
    JobStatus,
    JobStore,
    NewJob,
    lease_owner,
    new_lease_token,
)
from tests.support.jobs import new_job

LEASE = 30


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, ttl_seconds=3600, lease_seconds=LEASE, max_attempts=2)


def a_job() -> NewJob:
    return new_job(webhook="https://hooks.test/x")


def test_claim_takes_a_lease_with_a_ttl(store: JobStore, client: redis.Redis) -> None:
    job_id = store.create(a_job())
    claim = store.acquire(job_id, "host:1:a")
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.job is not None
    assert (claim.job.status, claim.job.attempts) == (JobStatus.PROCESSING, 1)
    assert client.get(keys.job_lease(job_id)) == b"host:1:a"
    assert 0 < client.ttl(keys.job_lease(job_id)) <= LEASE


def test_a_duplicate_delivery_leaves_a_leased_job_alone(store: JobStore) -> None:
    job_id = store.create(a_job())
    store.acquire(job_id, "host:1:a")
    before = store.get(job_id)
    duplicate = store.acquire(job_id, "host:2:b")
    assert duplicate.outcome is ClaimOutcome.LEASED
    assert 0 < duplicate.lease_left <= LEASE  # when the duplicate should look again
    assert store.get(job_id) == before  # attempts and timestamps untouched


def test_only_the_holder_finishes(store: JobStore, client: redis.Redis) -> None:
    job_id = store.create(a_job())
    store.acquire(job_id, "host:1:a")
    assert not store.succeed(job_id, output=["x"], generation_time=1.0, lease="host:2:b")
    assert not store.fail(job_id, "stale", lease="host:2:b")
    assert not store.fail(job_id, "no lease given")
    assert store.succeed(job_id, output=["u"], generation_time=1.0, lease="host:1:a")
    job = store.get(job_id)
    assert job is not None and (job.status, job.output) == (JobStatus.SUCCESS, ["u"])
    assert client.exists(keys.job_lease(job_id)) == 0  # a terminal job has no lease


def test_a_stale_worker_cannot_overwrite_after_its_lease_expired(
    store: JobStore, client: redis.Redis
) -> None:
    job_id = store.create(a_job())
    store.acquire(job_id, "host:1:old")
    client.delete(keys.job_lease(job_id))  # what the TTL does when the worker died
    claim = store.acquire(job_id, "host:2:new")
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.job is not None and claim.job.attempts == 2
    assert not store.succeed(job_id, output=["old"], generation_time=1.0, lease="host:1:old")
    assert store.succeed(job_id, output=["new"], generation_time=1.0, lease="host:2:new")
    job = store.get(job_id)
    assert job is not None and job.output == ["new"]


def test_a_job_out_of_attempts_is_failed_once(store: JobStore, client: redis.Redis) -> None:
    job_id = store.create(a_job())
    for _ in range(2):
        assert store.acquire(job_id, "host:1:a").outcome is ClaimOutcome.CLAIMED
        client.delete(keys.job_lease(job_id))  # the process died each time
    claim = store.acquire(job_id, "host:1:c")
    assert claim.outcome is ClaimOutcome.EXHAUSTED
    assert claim.job is not None
    assert (claim.job.status, claim.job.error) == (
        JobStatus.FAILED,
        "The job failed 2 times; it was stopped.",
    )
    assert claim.job.attempts == 2
    assert store.acquire(job_id, "host:1:d").outcome is ClaimOutcome.GONE


def test_main_process_frees_only_its_dead_process_lease(store: JobStore) -> None:
    job_id = store.create(a_job())
    store.acquire(job_id, lease_owner(41, "host") + "x")
    assert not store.release_lease(job_id, lease_owner(4, "host"))  # pid 4 is not pid 41
    assert not store.release_lease(job_id, lease_owner(41, "other"))
    assert store.release_lease(job_id, lease_owner(41, "host"))
    assert store.acquire(job_id, "host:9:y").outcome is ClaimOutcome.CLAIMED


def test_main_process_fails_the_job_it_killed(store: JobStore) -> None:
    job_id = store.create(a_job())
    store.acquire(job_id, lease_owner(41, "host") + "x")
    assert not store.fail(job_id, "timeout", owner=lease_owner(42, "host"))
    assert store.fail(job_id, "timeout", owner=lease_owner(41, "host"))
    job = store.get(job_id)
    assert job is not None and (job.status, job.error) == (JobStatus.FAILED, "timeout")


def test_lease_tokens_carry_the_process_owner() -> None:
    first, second = new_lease_token(), new_lease_token()
    assert first != second
    assert first.startswith(lease_owner(os.getpid()))
