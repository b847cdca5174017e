"""The reconciler (workers/reconciler.py) and the job store's pending-webhook index, on fakeredis.

The broker is a fake listing which job ids have a message; the kombu message format is read by
RedisBrokerView in tests/integration/test_reconciler_stack.py against a real broker.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from dreamq.queue import GENERATE_TASK, WEBHOOK_TASK, RecordingPublisher
from storage import keys
from storage.jobs import JobStatus, JobStore, Lease, WebhookStatus, new_lease_token
from tests.support.jobs import new_job
from workers.reconciler import (
    BrokerContents,
    FleetLock,
    OpaqueBroker,
    Reconciler,
    RedisBrokerView,
    lost_message_reason,
)

GRACE = 30.0
OPAQUE_AFTER = 600.0


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeBroker:
    jobs: set[int] = field(default_factory=set)
    webhooks: set[int] = field(default_factory=set)

    def contents(self) -> BrokerContents:
        return BrokerContents(set(self.jobs), set(self.webhooks))


@dataclass
class Scheduled:
    calls: list[tuple[int, int, float]] = field(default_factory=list)

    def __call__(self, job_id: int, attempt: int, due_at: float) -> None:
        self.calls.append((job_id, attempt, due_at))


@dataclass
class World:
    jobs: JobStore
    clock: Clock
    broker: FakeBroker
    publisher: RecordingPublisher
    scheduled: Scheduled
    reconciler: Reconciler

    def create(self, webhook: str | None = None, queue: str = "") -> int:
        return self.jobs.create(new_job(webhook=webhook, queue=queue))

    def passes(self, n: int = 2) -> Any:
        report = None
        for _ in range(n):
            report = self.reconciler.run_once()
        return report


def make_world(
    client: redis.Redis, broker: Any = None, max_redrives: int = 3, queue: str | None = None
) -> World:
    clock = Clock()
    jobs = JobStore(client, ttl_seconds=3600, lease_seconds=60, clock=clock)
    fake = FakeBroker()
    publisher = RecordingPublisher()
    scheduled = Scheduled()
    reconciler = Reconciler(
        jobs=jobs,
        publisher=publisher,
        schedule_webhook=scheduled,
        broker=broker or fake,
        grace_seconds=GRACE,
        opaque_after_seconds=OPAQUE_AFTER,
        max_redrives=max_redrives,
        queue=queue,
        clock=clock,
    )
    return World(jobs, clock, fake, publisher, scheduled, reconciler)


@pytest.fixture
def world(client: redis.Redis) -> World:
    return make_world(client)


def test_a_queued_job_with_its_message_is_left_alone(world: World) -> None:
    job_id = world.create()
    world.broker.jobs.add(job_id)
    world.clock.now += 2 * GRACE
    assert not world.passes(3)
    assert world.publisher.jobs == []


def test_a_queued_job_without_a_message_is_published_again_on_the_second_pass(
    world: World,
) -> None:
    job_id = world.create()
    world.clock.now += GRACE + 1
    assert not world.reconciler.run_once()  # first seen missing: only noted
    report = world.reconciler.run_once()
    assert report.jobs == [job_id]
    assert world.publisher.jobs == [job_id]
    assert world.jobs.get(job_id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    # Published: the next pass finds the message and does nothing.
    world.broker.jobs.add(job_id)
    assert not world.passes()


def test_a_message_seen_again_between_passes_is_not_a_loss(world: World) -> None:
    job_id = world.create()
    world.clock.now += GRACE + 1
    world.reconciler.run_once()
    world.broker.jobs.add(job_id)  # it was moving from the queue to a consumer
    assert not world.reconciler.run_once()
    world.broker.jobs.discard(job_id)
    assert not world.reconciler.run_once()  # missing again: a new suspicion, not a confirmation
    assert world.reconciler.run_once().jobs == [job_id]


def test_a_job_just_accepted_is_not_yet_expected_in_the_broker(world: World) -> None:
    world.create()
    world.clock.now += GRACE - 1
    assert not world.passes(3)


def test_a_running_job_is_left_to_its_lease_holder(world: World) -> None:
    job_id = world.create()
    world.jobs.acquire(job_id, new_lease_token())
    world.clock.now += GRACE + 1  # lease (60 s) still held
    assert not world.passes(3)


def test_a_processing_job_whose_holder_died_is_redriven_unless_the_broker_holds_it(
    world: World, client: redis.Redis
) -> None:
    job_id = world.create()
    world.jobs.acquire(job_id, new_lease_token())
    client.delete(keys.job_lease(job_id))  # the lease expired with its process
    world.clock.now += GRACE + 1
    world.broker.jobs.add(job_id)  # unacknowledged: the broker gives it back itself
    assert not world.passes(3)
    world.broker.jobs.discard(job_id)  # the broker lost it too
    assert world.passes().jobs == [job_id]


def test_a_worker_taking_the_job_between_look_and_act_wins(
    world: World, client: redis.Redis
) -> None:
    job_id = world.create()
    world.clock.now += GRACE + 1
    world.reconciler.run_once()
    assert world.jobs.count_redrive(job_id, JobStatus.QUEUED) == 1
    world.jobs.acquire(job_id, new_lease_token())
    assert world.jobs.count_redrive(job_id, JobStatus.QUEUED) == 0  # moved on
    client.delete(keys.job_lease(job_id))
    assert world.jobs.count_redrive(job_id, JobStatus.QUEUED) == 0  # status differs
    assert world.jobs.count_redrive(job_id, JobStatus.PROCESSING) == 2


def test_a_job_losing_its_message_too_often_fails_with_a_reason_and_its_webhook(
    client: redis.Redis,
) -> None:
    world = make_world(client, max_redrives=2)
    job_id = world.create(webhook="https://hook.test/x")
    world.clock.now += GRACE + 1
    for _ in range(2):
        assert world.passes().jobs == [job_id]
    report = world.passes()
    assert report.failed == [job_id] and report.jobs == []
    job = world.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert job.error == lost_message_reason(2)
    assert world.publisher.webhooks == [job_id]


def test_pending_webhooks_are_indexed_by_due_time_until_the_delivery_ends(
    world: World, client: redis.Redis
) -> None:
    plain = world.create()
    hooked = world.create(webhook="https://hook.test/x")
    for job_id in (plain, hooked):
        token = new_lease_token()
        world.jobs.acquire(job_id, token)
        world.jobs.succeed(job_id, output=[], generation_time=1.0, lease=token)
    assert client.zrange(keys.WEBHOOKS_PENDING, 0, -1, withscores=True) == [
        (str(hooked).encode(), world.clock.now)
    ]
    retry = {"attempt": 1, "next_at": world.clock.now + 300}
    world.jobs.record_webhook_attempt(hooked, retry, WebhookStatus.PENDING)
    assert client.zscore(keys.WEBHOOKS_PENDING, hooked) == world.clock.now + 300
    world.jobs.record_webhook_attempt(hooked, {"attempt": 2}, WebhookStatus.SENT)
    assert client.zcard(keys.WEBHOOKS_PENDING) == 0


def test_a_failed_job_with_a_webhook_is_indexed_too(world: World, client: redis.Redis) -> None:
    job_id = world.create(webhook="https://hook.test/x")
    world.jobs.fail(job_id, "no")
    assert client.zscore(keys.WEBHOOKS_PENDING, job_id) == world.clock.now
    world.jobs.set_webhook_status(job_id, WebhookStatus.FAILED)
    assert client.zcard(keys.WEBHOOKS_PENDING) == 0


def test_an_overdue_webhook_without_a_message_is_handed_off_for_its_next_attempt(
    world: World,
) -> None:
    job_id = world.create(webhook="https://hook.test/x")
    world.jobs.fail(job_id, "no")
    retry = {"attempt": 1, "next_at": world.clock.now + 300}
    world.jobs.record_webhook_attempt(job_id, retry, WebhookStatus.PENDING)
    world.clock.now += 300 + GRACE - 1
    assert not world.passes(3)  # not overdue by a grace period yet
    world.clock.now += 2
    world.broker.webhooks.add(job_id)  # held by a dispatcher as a countdown
    assert not world.passes(3)
    world.broker.webhooks.clear()
    report = world.passes()
    assert report.webhooks == [job_id]
    assert world.scheduled.calls == [(job_id, 2, world.clock.now)]


def test_a_pending_webhook_whose_record_expired_leaves_the_index(
    world: World, client: redis.Redis
) -> None:
    job_id = world.create(webhook="https://hook.test/x")
    world.jobs.fail(job_id, "no")
    client.delete(keys.job(job_id))
    world.clock.now += GRACE + 1
    assert not world.passes()
    assert client.zcard(keys.WEBHOOKS_PENDING) == 0
    assert world.scheduled.calls == []


def test_an_opaque_broker_redrives_only_long_orphaned_processing_jobs(
    client: redis.Redis,
) -> None:
    world = make_world(client, broker=OpaqueBroker())
    queued = world.create()
    running = world.create()
    world.jobs.transition(running, JobStatus.PROCESSING, lease=Lease())  # no lease left
    world.clock.now += OPAQUE_AFTER - 1
    assert not world.reconciler.run_once()
    world.clock.now += 2
    report = world.reconciler.run_once()  # nothing to confirm against: acts at once
    assert report.jobs == [running]
    assert queued not in world.publisher.jobs


def test_one_reconciler_holds_the_fleet_lock(client: redis.Redis) -> None:
    first, second = FleetLock(client, 10), FleetLock(client, 10)
    assert first.hold() and first.hold()  # renewed
    assert not second.hold()
    first.release()
    assert second.hold()
    assert not first.hold()


def _kombu_message(task: str, job_id: int) -> bytes:
    body = base64.b64encode(json.dumps([[job_id], {}, {}]).encode()).decode()
    envelope = {
        "body": body,
        "headers": {"task": task, "id": "x"},
        "properties": {"body_encoding": "base64"},
    }
    return json.dumps(envelope).encode()


def test_redis_broker_view_reads_queues_priority_lists_and_unacked(client: redis.Redis) -> None:
    client.rpush("gen", _kombu_message(GENERATE_TASK, 1), b"not json", _kombu_message("x", 9))
    client.rpush("gen\x06\x163", _kombu_message(GENERATE_TASK, 2))
    client.rpush("hooks", _kombu_message(WEBHOOK_TASK, 3))
    held = json.dumps([json.loads(_kombu_message(GENERATE_TASK, 4)), "", "gen"])
    client.hset("unacked", mapping={"tag1": held, "tag2": "garbage"})
    contents = RedisBrokerView(client, "gen", "hooks").contents()
    assert contents == BrokerContents(jobs={1, 2, 4}, webhooks={3})


def test_jobs_of_another_queue_are_another_deployments(client: redis.Redis) -> None:
    world = make_world(client, queue="mine")
    mine, legacy = world.create(queue="mine"), world.create()
    world.create(queue="theirs")
    hooked = world.create(webhook="https://hook.test/x", queue="theirs")
    world.jobs.fail(hooked, "no")
    world.clock.now += GRACE + 1
    report = world.passes()
    assert report.jobs == [mine, legacy]  # a record without a queue predates them: any
    assert report.webhooks == []
