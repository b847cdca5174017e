"""The job record and its state machine (storage/jobs.py) on fakeredis, Lua scripts included."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import fakeredis
import pytest
import redis

from storage import keys
from storage.jobs import (
    TRANSITIONS,
    AsyncJobStore,
    JobStatus,
    JobStore,
    NewJob,
    UnfinishedCapReached,
    WebhookStatus,
    sources_of,
)

TTL = 3600
START = 1_000.0

QUEUED, PROCESSING, SUCCESS, FAILED = (
    JobStatus.QUEUED,
    JobStatus.PROCESSING,
    JobStatus.SUCCESS,
    JobStatus.FAILED,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def store(client: redis.Redis, clock: Clock) -> JobStore:
    return JobStore(client, ttl_seconds=TTL, clock=clock)


@pytest.fixture
def events(client: redis.Redis) -> Any:
    pubsub = client.pubsub()
    pubsub.subscribe(keys.JOB_EVENTS)
    confirmation = pubsub.get_message(timeout=0)
    assert confirmation is not None
    assert confirmation["type"] == "subscribe"
    return pubsub


def new_job(**overrides: Any) -> NewJob:
    values: dict[str, Any] = {
        "owner": "key-1",
        "model_id": "demo",
        "kind": "txt2img",
        "params": {"prompt": "a red fox", "width": 512, "seed": None, "tags": ["a", "ü"]},
        "meta": {"prompt": "a red fox", "W": 512, "guidance_scale": 7.5, "lora": None},
        "file_prefix": "d00bf96e-8cec",
        "future_links": ["https://out.test/d00bf96e-8cec-0.png"],
        "predicted_seconds": 3.5,
        "eta_seconds": 12.25,
        **overrides,
    }
    return NewJob(**values)


def published(pubsub: Any) -> list[bytes]:
    messages = []
    while (message := pubsub.get_message(timeout=0)) is not None:
        assert message["type"] == "message"
        messages.append(message["data"])
    return messages


def force_status(client: redis.Redis, job_id: int, status: JobStatus) -> None:
    client.hset(keys.job(job_id), "status", status.value)


# ---------------------------------------------------------------- create and read


def test_create_gives_increasing_integer_ids_all_queued_and_active(store: JobStore) -> None:
    ids = [store.create(new_job()) for _ in range(3)]
    assert all(type(i) is int for i in ids)
    assert ids == sorted(set(ids))
    for job_id in ids:
        job = store.get(job_id)
        assert job is not None
        assert job.id == job_id
        assert job.status is QUEUED
    assert store.active_ids() == ids


@pytest.mark.parametrize("track_id", ["order-17", "42", 42, None, ""])
def test_record_round_trips(store: JobStore, track_id: Any) -> None:
    submitted = new_job(track_id=track_id, webhook="https://hooks.test/x")
    job = store.get(store.create(submitted))
    assert job is not None
    assert job.params == submitted.params
    assert job.meta == submitted.meta
    assert job.future_links == submitted.future_links
    assert job.track_id == track_id
    assert type(job.track_id) is type(track_id)
    assert (job.owner, job.model_id, job.kind, job.file_prefix) == (
        "key-1",
        "demo",
        "txt2img",
        "d00bf96e-8cec",
    )
    assert job.webhook == "https://hooks.test/x"
    assert job.webhook_status is WebhookStatus.PENDING
    assert job.created_at == job.updated_at == START
    assert job.eta_at == START + 12.25
    assert job.predicted_seconds == 3.5
    assert job.attempts == 0
    assert job.output == []
    assert job.started_at is job.finished_at is job.generation_time is job.error is None


def test_a_job_without_webhook_has_no_webhook_status(store: JobStore) -> None:
    job = store.get(store.create(new_job(webhook=None)))
    assert job is not None
    assert job.webhook is None
    assert job.webhook_status is WebhookStatus.NONE


def test_unknown_id_reads_as_none(store: JobStore) -> None:
    assert store.get(999) is None


# ---------------------------------------------------------------- claim, succeed, fail


def test_claim_moves_queued_to_processing_and_counts_attempts(
    store: JobStore, clock: Clock
) -> None:
    job_id = store.create(new_job())
    clock.now = START + 4
    job = store.claim(job_id)
    assert job is not None
    assert job.status is PROCESSING
    assert job.attempts == 1
    assert job.started_at == START + 4
    # Once running, the time left comes from the start and the predicted run time (3.5 s).
    assert job.remaining_seconds(START + 5) == 2.5
    assert job.updated_at == START + 4
    assert store.active_ids() == [job_id]


def test_a_redelivered_job_is_claimed_again_with_one_more_attempt(
    store: JobStore, clock: Clock
) -> None:
    job_id = store.create(new_job())
    store.claim(job_id)
    clock.now = START + 60
    again = store.claim(job_id)
    assert again is not None
    assert again.status is PROCESSING
    assert again.attempts == 2
    assert again.started_at == START + 60


def test_succeed_is_terminal(store: JobStore, client: redis.Redis, clock: Clock) -> None:
    job_id = store.create(new_job())
    store.claim(job_id)
    clock.now = START + 9
    assert store.succeed(job_id, output=["https://out.test/a-0.png"], generation_time=1.23456)
    job = store.get(job_id)
    assert job is not None
    assert job.status is SUCCESS
    assert job.status.is_terminal()
    assert job.output == ["https://out.test/a-0.png"]
    assert job.generation_time == 1.235
    assert job.finished_at == START + 9
    assert job.remaining_seconds(START + 9) == 0.0
    assert store.active_ids() == []
    assert 0 < client.ttl(keys.job(job_id)) <= TTL


@pytest.mark.parametrize("claimed", [False, True])
def test_fail_is_terminal_from_queued_and_processing(
    store: JobStore, client: redis.Redis, claimed: bool
) -> None:
    job_id = store.create(new_job())
    if claimed:
        store.claim(job_id)
    assert store.fail(job_id, "model not loaded")
    job = store.get(job_id)
    assert job is not None
    assert job.status is FAILED
    assert job.error == "model not loaded"
    assert store.active_ids() == []
    assert 0 < client.ttl(keys.job(job_id)) <= TTL


def test_non_terminal_records_do_not_expire(store: JobStore, client: redis.Redis) -> None:
    job_id = store.create(new_job())
    store.claim(job_id)
    assert client.ttl(keys.job(job_id)) == -1


def test_only_the_finished_job_leaves_the_active_set(store: JobStore) -> None:
    first, second, third = (store.create(new_job()) for _ in range(3))
    store.claim(second)
    store.succeed(second, output=[], generation_time=1)
    assert store.active_ids() == [first, third]


def test_success_absorbs(store: JobStore, client: redis.Redis, clock: Clock) -> None:
    job_id = store.create(new_job())
    store.claim(job_id)
    store.succeed(job_id, output=["u"], generation_time=1.0)
    before = client.hgetall(keys.job(job_id))
    clock.now = START + 100
    assert store.fail(job_id, "late failure") is False
    assert store.claim(job_id) is None
    assert store.succeed(job_id, output=["other"], generation_time=2.0) is False
    assert client.hgetall(keys.job(job_id)) == before


def test_failure_absorbs(store: JobStore, client: redis.Redis, clock: Clock) -> None:
    job_id = store.create(new_job())
    store.fail(job_id, "cancelled")
    before = client.hgetall(keys.job(job_id))
    clock.now = START + 100
    assert store.claim(job_id) is None
    assert store.succeed(job_id, output=["u"], generation_time=1.0) is False
    assert store.fail(job_id, "again") is False
    assert client.hgetall(keys.job(job_id)) == before


# ---------------------------------------------------------------- the transition table


def test_transition_table_matches_the_documented_machine() -> None:
    documented = {
        QUEUED: {PROCESSING, FAILED},
        PROCESSING: {PROCESSING, SUCCESS, FAILED, QUEUED},
        SUCCESS: set(),
        FAILED: set(),
    }
    assert documented == TRANSITIONS
    assert all(not TRANSITIONS[s] for s in JobStatus if s.is_terminal())
    assert sources_of(SUCCESS) == {PROCESSING}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(JobStatus, JobStatus)))
def test_every_pair_is_applied_exactly_when_the_table_allows_it(
    store: JobStore, client: redis.Redis, clock: Clock, source: JobStatus, target: JobStatus
) -> None:
    job_id = store.create(new_job())
    force_status(client, job_id, source)
    before = client.hgetall(keys.job(job_id))
    clock.now = START + 1

    result = store.transition(job_id, target)

    allowed = target in TRANSITIONS[source]
    assert result.applied is allowed
    assert result.previous is source
    job = store.get(job_id)
    assert job is not None
    if allowed:
        assert job.status is target
        assert job.updated_at == START + 1
    else:
        assert client.hgetall(keys.job(job_id)) == before


def test_unknown_ids_are_never_written(store: JobStore, client: redis.Redis, events: Any) -> None:
    result = store.transition(999, PROCESSING)
    assert result.applied is False
    assert result.previous is None
    assert store.claim(999) is None
    assert store.succeed(999, output=["u"], generation_time=1.0) is False
    assert store.fail(999, "x") is False
    assert store.set_webhook_status(999, WebhookStatus.SENT) is False
    assert client.exists(keys.job(999)) == 0
    assert store.get(999) is None
    assert published(events) == []


def test_requeue_from_processing_keeps_the_job_active(store: JobStore) -> None:
    job_id = store.create(new_job())
    store.claim(job_id)
    assert store.transition(job_id, QUEUED).applied
    assert store.active_ids() == [job_id]
    job = store.claim(job_id)
    assert job is not None
    assert job.attempts == 2


# ---------------------------------------------------------------- events


def test_terminal_transitions_publish_id_and_status(store: JobStore, events: Any) -> None:
    done, failed = store.create(new_job()), store.create(new_job())
    store.claim(done)
    assert published(events) == []  # claims are not announced
    store.succeed(done, output=["u"], generation_time=1.0)
    store.fail(failed, "boom")
    assert published(events) == [f"{done} success".encode(), f"{failed} failed".encode()]


def test_refused_transitions_publish_nothing(store: JobStore, events: Any) -> None:
    job_id = store.create(new_job())
    store.fail(job_id, "boom")
    published(events)
    store.fail(job_id, "again")
    store.succeed(job_id, output=[], generation_time=1.0)
    assert published(events) == []


def test_set_webhook_status_publishes_and_keeps_the_ttl(
    store: JobStore, client: redis.Redis, events: Any
) -> None:
    job_id = store.create(new_job(webhook="https://hooks.test/x"))
    store.claim(job_id)
    store.succeed(job_id, output=["u"], generation_time=1.0)
    published(events)

    assert store.set_webhook_status(job_id, WebhookStatus.SENT)

    assert published(events) == [f"{job_id} webhook_sent".encode()]
    job = store.get(job_id)
    assert job is not None
    assert job.webhook_status is WebhookStatus.SENT
    assert job.status is SUCCESS
    assert 0 < client.ttl(keys.job(job_id)) <= TTL


# ---------------------------------------------------------------- random walks


@pytest.mark.parametrize("seed", range(20))
def test_random_operation_sequences_keep_terminal_states_absorbing(
    store: JobStore, client: redis.Redis, clock: Clock, seed: int
) -> None:
    # Stands in for a hypothesis test (hypothesis is not installed): seeded, so reproducible.
    rng = random.Random(seed)
    job_id = store.create(new_job())
    status, attempts = QUEUED, 0
    frozen: dict[bytes, bytes] | None = None
    for _ in range(30):
        clock.now += 1
        op = rng.choice(["claim", "succeed", "fail", "requeue"])
        if op == "claim":
            applied = store.claim(job_id) is not None
            target = PROCESSING
        elif op == "succeed":
            applied = store.succeed(job_id, output=["u"], generation_time=1.0)
            target = SUCCESS
        elif op == "fail":
            applied = store.fail(job_id, "x")
            target = FAILED
        else:
            applied = store.transition(job_id, QUEUED).applied
            target = QUEUED
        assert applied is (target in TRANSITIONS[status])
        if applied:
            status = target
            attempts += op == "claim"
        if frozen is not None:
            assert client.hgetall(keys.job(job_id)) == frozen
        elif status.is_terminal():
            frozen = client.hgetall(keys.job(job_id))
        job = store.get(job_id)
        assert job is not None
        assert (job.status, job.attempts) == (status, attempts)
        assert (job_id in store.active_ids()) is not status.is_terminal()


# ---------------------------------------------------------------- async store


def test_async_store_creates_and_reads_what_the_sync_store_sees(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    async def scenario() -> tuple[int, Any]:
        jobs = AsyncJobStore(
            fakeredis.aioredis.FakeRedis(server=server), ttl_seconds=TTL, clock=lambda: 5.0
        )
        job_id = await jobs.create(new_job(track_id=7))
        return job_id, await jobs.get(job_id)

    job_id, job = asyncio.run(scenario())
    assert job is not None
    assert job.status is QUEUED
    assert job.track_id == 7
    assert job.created_at == 5.0
    assert store.get(job_id) == job
    assert store.active_ids() == [job_id]
    # ids from either store come from one counter
    assert store.create(new_job()) > job_id


def test_async_fail_is_terminal_and_announced(
    server: fakeredis.FakeServer, store: JobStore, client: redis.Redis, events: Any
) -> None:
    job_id = store.create(new_job())

    async def scenario() -> bool:
        client = fakeredis.aioredis.FakeRedis(server=server)
        return await AsyncJobStore(client, ttl_seconds=TTL, clock=lambda: 77.0).fail(
            job_id, "could not queue"
        )

    assert asyncio.run(scenario()) is True
    job = store.get(job_id)
    assert job is not None
    assert job.status is FAILED
    assert job.error == "could not queue"
    assert job.finished_at == 77.0
    assert store.active_ids() == []
    assert 0 < client.ttl(keys.job(job_id)) <= TTL
    assert published(events) == [f"{job_id} failed".encode()]


def test_async_fail_after_success_and_on_unknown_ids_is_refused(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    job_id = store.create(new_job())
    store.claim(job_id)
    store.succeed(job_id, output=["u"], generation_time=1.0)

    async def scenario() -> tuple[bool, bool, Any]:
        jobs = AsyncJobStore(fakeredis.aioredis.FakeRedis(server=server), ttl_seconds=TTL)
        return await jobs.fail(job_id, "late"), await jobs.fail(999, "x"), await jobs.get(999)

    late, unknown, missing = asyncio.run(scenario())
    assert (late, unknown, missing) == (False, False, None)
    job = store.get(job_id)
    assert job is not None
    assert job.status is SUCCESS
    assert job.error is None


# ---------------------------------------------------------------- cap on a key's unfinished jobs


def test_the_cap_refuses_a_job_past_it_and_creates_nothing(
    store: JobStore, client: redis.Redis
) -> None:
    first, second = (store.create(new_job(), max_unfinished=2) for _ in range(2))
    sequence = client.get(keys.JOB_SEQ)
    with pytest.raises(UnfinishedCapReached) as refused:
        store.create(new_job(), max_unfinished=2)
    assert refused.value.cap == 2
    # Refused before an id was taken or anything written.
    assert client.get(keys.JOB_SEQ) == sequence
    assert store.active_ids() == [first, second]
    assert store.unfinished("key-1") == [first, second]
    # The cap is per owner; without a cap nothing is refused (but the job still counts).
    other = store.create(new_job(owner="key-2"), max_unfinished=2)
    uncapped = store.create(new_job())
    assert store.unfinished("key-2") == [other]
    assert store.unfinished("key-1") == [first, second, uncapped]


@pytest.mark.parametrize("finish", ["succeed", "fail_queued", "fail_processing"])
def test_a_job_that_ends_either_way_frees_its_slot(store: JobStore, finish: str) -> None:
    job_id = store.create(new_job(), max_unfinished=1)
    with pytest.raises(UnfinishedCapReached):
        store.create(new_job(), max_unfinished=1)
    if finish == "succeed":
        store.claim(job_id)
        assert store.succeed(job_id, output=["u"], generation_time=1.0)
    elif finish == "fail_processing":
        store.claim(job_id)
        assert store.fail(job_id, "broken")
    else:
        assert store.fail(job_id, "broken")
    assert store.unfinished("key-1") == []
    assert store.create(new_job(), max_unfinished=1) > job_id


def test_processing_and_requeued_jobs_keep_their_slot(store: JobStore) -> None:
    job_id = store.create(new_job(), max_unfinished=1)
    store.claim(job_id)
    with pytest.raises(UnfinishedCapReached):
        store.create(new_job(), max_unfinished=1)
    assert store.transition(job_id, QUEUED).applied  # the reconciler's re-queue
    with pytest.raises(UnfinishedCapReached):
        store.create(new_job(), max_unfinished=1)
    assert store.unfinished("key-1") == [job_id]


def test_a_refused_transition_frees_nothing(store: JobStore) -> None:
    job_id = store.create(new_job(), max_unfinished=1)
    store.claim(job_id)
    assert not store.succeed(job_id, output=["u"], generation_time=1.0, lease="not-the-holder")
    assert store.unfinished("key-1") == [job_id]


def test_an_entry_older_than_the_job_ttl_no_longer_counts(
    store: JobStore, client: redis.Redis, clock: Clock
) -> None:
    lost = store.create(new_job(), max_unfinished=1)
    # Its record lost without a terminal transition (a Redis restart that kept only the set).
    client.delete(keys.job(lost))
    clock.now += TTL - 1
    with pytest.raises(UnfinishedCapReached):
        store.create(new_job(), max_unfinished=1)
    clock.now += 2
    fresh = store.create(new_job(), max_unfinished=1)
    assert store.unfinished("key-1") == [fresh]
    # The set itself expires with the ttl once its owner stops submitting.
    assert 0 < client.ttl(keys.unfinished_jobs("key-1")) <= TTL


def test_the_async_store_enforces_the_same_cap_and_the_sync_store_frees_it(
    server: fakeredis.FakeServer, store: JobStore
) -> None:
    jobs = AsyncJobStore(fakeredis.aioredis.FakeRedis(server=server), ttl_seconds=TTL)

    async def create() -> int:
        return await jobs.create(new_job(), max_unfinished=2)

    async def burst() -> list[Any]:
        # Concurrent submissions from one event loop: exactly the cap gets through.
        return await asyncio.gather(*(create() for _ in range(6)), return_exceptions=True)

    outcomes = asyncio.run(burst())
    created = [o for o in outcomes if isinstance(o, int)]
    assert len(created) == 2
    assert all(isinstance(o, UnfinishedCapReached) for o in outcomes if not isinstance(o, int))
    store.fail(created[0], "cancelled")
    assert asyncio.run(create()) > max(created)
