"""Which queued jobs a woken worker process claims (workers/routing.py), and the claim of
several jobs in one round trip (storage/claims.py), on the job store's own scripts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import redis

from storage import keys
from storage.claims import ClaimStore, ProcessView, QueuedJob, WorkView
from storage.jobs import ClaimOutcome, JobStatus, JobStore, new_lease_token
from storage.workers import WorkerStore
from tests.support.jobs import new_job
from workers.routing import Plan, plan

NOW = 1_000.0
ME = "celery@gpu-a"
OTHER = "celery@gpu-b"


def queued(
    job_id: int, model: str = "sd", *, level: int = 0, key: str = "", samples: int = 1
) -> QueuedJob:
    return QueuedJob(job_id, level, model, key, samples, 2.0)


def view(
    *head: QueuedJob,
    processes: tuple[ProcessView, ...] = (),
    loads: dict[str, float] | None = None,
    own: JobStatus | None = JobStatus.QUEUED,
    own_leased: bool = False,
) -> WorkView:
    return WorkView(NOW, own, own_leased, 5.0 if own_leased else 0.0, head, processes, loads or {})


def warm_elsewhere(model: str, *, free_in: float, node: str = OTHER) -> ProcessView:
    return ProcessView("gpu-b:7", frozenset({model}), node, NOW + free_in)


def test_the_head_of_the_queue_is_taken_in_turn() -> None:
    chosen = plan(view(queued(1), queued(2)), own_job=2, node=ME, warm=frozenset(), batch_images=1)
    assert chosen == Plan(take=(1,))


def test_the_most_urgent_level_comes_first_and_levels_never_mix() -> None:
    head = (queued(5, level=0), queued(1, level=1, key="k"), queued(2, level=1, key="k"))
    chosen = plan(view(*head), own_job=1, node=ME, warm=frozenset({"sd"}), batch_images=4)
    assert chosen.take == (5,)


def test_a_job_whose_holder_died_is_re_driven_by_its_own_message_first() -> None:
    lost = view(queued(1), own=JobStatus.PROCESSING, own_leased=False)
    assert plan(lost, own_job=9, node=ME, warm=frozenset(), batch_images=4) == Plan(
        take=(9,), recover=True
    )
    # Leased: another process runs it; the message claims queued work instead.
    running = dataclasses.replace(lost, own_leased=True)
    assert plan(running, own_job=9, node=ME, warm=frozenset(), batch_images=4).take == (1,)


def test_an_empty_queue_claims_nothing() -> None:
    assert plan(view(), own_job=1, node=ME, warm=frozenset(), batch_images=4) == Plan()


def test_a_cold_job_is_left_to_a_warm_node_that_frees_before_a_load_would_end() -> None:
    head = (queued(1, "xl"), queued(2, "sd"))
    fleet = (warm_elsewhere("xl", free_in=3.0),)
    chosen = plan(
        view(*head, processes=fleet, loads={"xl": 20.0}),
        own_job=1,
        node=ME,
        warm=frozenset({"sd"}),
        batch_images=1,
    )
    assert chosen == Plan(take=(2,), hand_off=(1, OTHER))


def test_a_cold_job_is_loaded_here_when_that_is_faster() -> None:
    head = (queued(1, "xl"), queued(2, "sd"))
    slow = (warm_elsewhere("xl", free_in=30.0),)
    chosen = plan(
        view(*head, processes=slow, loads={"xl": 20.0}),
        own_job=1,
        node=ME,
        warm=frozenset({"sd"}),
        batch_images=1,
    )
    assert chosen == Plan(take=(1,))


@pytest.mark.parametrize(
    ("fleet", "loads"),
    [
        ((), {"xl": 20.0}),  # nobody holds it: whoever is free loads it, in its turn
        ((warm_elsewhere("xl", free_in=0.0),), {}),  # no load time known
        ((warm_elsewhere("xl", free_in=0.0, node=ME),), {"xl": 20.0}),  # the same node
        ((dataclasses.replace(warm_elsewhere("xl", free_in=0.0), node=None),), {"xl": 20.0}),
    ],
)
def test_a_cold_job_is_never_skipped_without_a_warm_node_to_send_it_to(
    fleet: tuple[ProcessView, ...], loads: dict[str, float]
) -> None:
    head = (queued(1, "xl"), queued(2, "sd"))
    chosen = plan(
        view(*head, processes=fleet, loads=loads),
        own_job=2,
        node=ME,
        warm=frozenset({"sd"}),
        batch_images=1,
    )
    assert chosen == Plan(take=(1,))


def test_a_handed_over_message_is_never_handed_over_again() -> None:
    head = (queued(1, "xl"),)
    fleet = (warm_elsewhere("xl", free_in=0.0),)
    chosen = plan(
        view(*head, processes=fleet, loads={"xl": 20.0}),
        own_job=1,
        node=ME,
        warm=frozenset(),
        batch_images=1,
        routed=True,
    )
    assert chosen == Plan(take=(1,))


def test_everything_better_left_claims_nothing_but_hands_the_first_over() -> None:
    head = (queued(1, "xl"), queued(2, "xl"))
    fleet = (warm_elsewhere("xl", free_in=1.0),)
    chosen = plan(
        view(*head, processes=fleet, loads={"xl": 20.0}),
        own_job=2,
        node=ME,
        warm=frozenset(),
        batch_images=1,
    )
    assert chosen == Plan(hand_off=(1, OTHER))


def test_a_batch_gathers_the_same_key_while_its_images_fit() -> None:
    head = (
        queued(1, key="a", samples=2),
        queued(2, key="b"),
        queued(3, key="a", samples=2),  # would make 4 + ... : fits exactly at 4
        queued(4, key="a"),  # the batch is full
        queued(5, key="a", level=1),
    )
    chosen = plan(view(*head), own_job=4, node=ME, warm=frozenset({"sd"}), batch_images=4)
    assert chosen.take == (1, 3)


def test_a_batch_skips_a_job_too_big_and_takes_a_smaller_one_after_it() -> None:
    head = (queued(1, key="a"), queued(2, key="a", samples=4), queued(3, key="a"))
    chosen = plan(view(*head), own_job=1, node=ME, warm=frozenset({"sd"}), batch_images=4)
    assert chosen.take == (1, 3)


def test_no_batch_without_a_key_or_with_batching_off() -> None:
    head = (queued(1), queued(2))
    assert plan(view(*head), own_job=1, node=ME, warm=frozenset(), batch_images=4).take == (1,)
    keyed = (queued(1, key="a"), queued(2, key="a"))
    assert plan(view(*keyed), own_job=1, node=ME, warm=frozenset(), batch_images=1).take == (1,)


# --- the store side: one read, one claim ----------------------------------------------------


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, ttl_seconds=3600, lease_seconds=30, max_attempts=3)


def test_the_view_reads_the_head_the_fleet_and_the_load_times(
    client: redis.Redis, store: JobStore
) -> None:
    first = store.create(new_job(model_id="sd", batch_key="sd\nk", samples=2, level=1))
    second = store.create(new_job(model_id="xl", level=0))
    client.hset(keys.model_stats("xl"), "load_seconds", "12.5")
    workers = WorkerStore(client)
    workers.publish_models("gpu-b:7", ["xl"], until=NOW + 30)
    workers.publish_models("gpu-c:8", ["sd"], until=NOW - 1)  # dead
    claims = ClaimStore(client, store)
    claims.note_busy("gpu-b:7", OTHER, NOW + 4)
    seen = claims.read_view(first, NOW)
    assert [job.id for job in seen.head] == [second, first]  # level 0 first
    assert seen.head[1] == QueuedJob(first, 1, "sd", "sd\nk", 2, seen.head[1].predicted_seconds)
    assert seen.load_seconds == {"xl": 12.5}
    assert seen.processes == (ProcessView("gpu-b:7", frozenset({"xl"}), OTHER, NOW + 4),)
    assert (seen.own_status, seen.own_leased) == (JobStatus.QUEUED, False)


def test_a_claim_takes_several_jobs_under_one_token_and_skips_what_another_took(
    client: redis.Redis, store: JobStore
) -> None:
    ids = [store.create(new_job()) for _ in range(3)]
    taken = store.acquire(ids[1], new_lease_token())  # another process, first
    assert taken.outcome is ClaimOutcome.CLAIMED
    claims = ClaimStore(client, store)
    token = new_lease_token()
    result = claims.claim(ids, token, process="gpu-a:1", node=ME, now=NOW, until=NOW + 3)
    assert [claim.outcome for claim in result] == [
        ClaimOutcome.CLAIMED,
        ClaimOutcome.GONE,
        ClaimOutcome.CLAIMED,
    ]
    for job_id in (ids[0], ids[2]):
        record = store.get(job_id)
        assert record is not None and record.status is JobStatus.PROCESSING
        assert record.attempts == 1
        assert client.get(keys.job_lease(job_id)) == token.encode()
    assert client.zcard(keys.QUEUED_JOBS) == 0
    busy = claims.read_view(ids[0], NOW)
    assert busy.own_status is JobStatus.PROCESSING and busy.own_leased
    assert json.loads(client.hget(keys.WORKER_BUSY, "gpu-a:1")) == {"node": ME, "until": NOW + 3}
