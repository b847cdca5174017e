"""R25: a Hypothesis state machine over a job's whole life and its webhook.

The real pieces: `JobStore` (its Lua state machine, leases and attempts cap) on fakeredis, the
`WebhookDispatcher` with a scripted receiver, and the `Reconciler` reading a fake broker. The
machine plays what the processes around them do, in any order: the API submits (and may fail to
publish); a worker takes a message and claims the job (a lease); it finishes, fails, is killed
(the pool process, freed by the main process; the whole worker, its lease lapsing; the hard time
limit, failed by the main process), or is frozen and writes late; the broker delivers a message
twice, or loses every message in a restart; the dispatcher makes attempts the receiver answers
2xx, 5xx, 410, 429 or lets time out, is killed before or after its POST or before publishing the
next attempt, gets duplicate messages; time passes; the reconciler runs; clients fetch.

After every step: a terminal state never changes (status, output, error, attempts); output is
non-empty iff the job succeeded; the job is in the active index iff it is not terminal, and
holds a lease iff a live worker runs it; attempts never exceed the cap; at most one terminal write
applies; every POST of a job's event carries one `webhook-id`; nothing is POSTed once the delivery
is recorded sent (a dispatcher killed after its POST may POST again: at least once, with the same
id to dedupe on); recorded attempts are numbered 1..n once each, within the retry schedule.

At the end every process is left to finish (in a poison run: to crash on every attempt, until
the attempts cap fails the job) and the receiver answers one way (200, 500 or 410) while the
dispatcher and the reconciler drain the broker: every job must be terminal and every delivery
ended sent or failed. Nothing is lost.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dreamq.contract import FailedResponse, FetchProcessingResponse, SuccessResponse, job_body
from storage import keys
from storage.jobs import ClaimOutcome, JobRecord, JobStatus, JobStore, NewJob, WebhookStatus
from storage.jobs import lease_owner as owner_prefix
from tests.support.jobs import new_job
from workers.reconciler import BrokerContents, Reconciler
from workers.supervision import TIMEOUT_FAILURE
from workers.webhooks import Delivery, Response, RetryPolicy, WebhookDispatcher, delivery_id

START = 1_700_000_000.0
HOST = "gpu-1"
HOOK = "http://127.0.0.1:9/hook"
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
SECRET = "whsec_" + "A" * 44
MAX_ATTEMPTS = 2
DELAYS = (10.0, 100.0)
"""Webhook retry schedule: at most 3 attempts."""
CLAIM_SECONDS = 70.0
GRACE = 5.0
MAX_REDRIVES = 2
RECORD_TTL = 30 * 86400
MAX_JOBS = 3
ANSWERS = (200, 204, 500, 410, 429, "timeout", "killed before POST", "killed after POST")


class Killed(BaseException):
    """kill -9 at this point: nothing after it runs, no handler sees it."""


@dataclass
class Worker:
    pid: int
    job_id: int

    @property
    def token(self) -> str:
        return owner_prefix(self.pid, HOST) + "t"


@dataclass
class Broker:
    """The broker as the reconciler sees it and the processes use it (the publisher's twin)."""

    queue: list[int] = field(default_factory=list)
    """Generation messages waiting for a worker (job ids)."""
    hooks: list[tuple[int, int, float | None]] = field(default_factory=list)
    """Webhook messages waiting for a dispatcher: (job id, attempt, due time)."""
    acked_hooks: list[tuple[int, int, float | None]] = field(default_factory=list)
    running: set[int] = field(default_factory=set)
    """Jobs whose message a live worker holds (unacked)."""
    die_on_publish: bool = False

    def publish_job(self, job_id: int, level: int = 0) -> None:
        self.queue.append(job_id)

    def publish_webhook(self, job_id: int) -> None:
        self.hooks.append((job_id, 1, None))

    def schedule(self, job_id: int, attempt: int, due_at: float) -> None:
        if self.die_on_publish:
            self.die_on_publish = False
            raise Killed
        self.hooks.append((job_id, attempt, due_at))

    def contents(self) -> BrokerContents:
        return BrokerContents(set(self.queue) | self.running, {h[0] for h in self.hooks})


@dataclass
class Post:
    job_id: int
    webhook_id: str
    answer: Any


class Receiver:
    """The webhook receiver, answering what the rule drew; checks no POST follows a delivery
    already recorded as sent."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs
        self.answer: Any = 200
        self.posts: list[Post] = []

    def send(self, delivery: Delivery) -> Response:
        job_id = json.loads(delivery.body)["id"]
        job = self._jobs.get(job_id)
        assert job is not None and job.webhook_status is not WebhookStatus.SENT, (
            f"job {job_id}: POSTed again after its delivery was recorded sent"
        )
        if self.answer == "killed before POST":
            raise Killed
        self.posts.append(Post(job_id, delivery.headers["webhook-id"], self.answer))
        if self.answer == "killed after POST":
            raise Killed
        if self.answer == "timeout":
            raise httpx.ReadTimeout("slower than the webhook timeout")
        assert isinstance(self.answer, int)
        return Response(self.answer, "7" if self.answer == 429 else None)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def _snapshot(job: JobRecord) -> tuple[Any, ...]:
    return (job.status, job.output, job.error, job.attempts, job.finished_at, job.generation_time)


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.clock = Clock()
        self.jobs = JobStore(
            self.redis,
            ttl_seconds=RECORD_TTL,
            max_attempts=MAX_ATTEMPTS,
            clock=self.clock,
        )
        self.broker = Broker()
        self.receiver = Receiver(self.jobs)
        self.dispatcher = WebhookDispatcher(
            jobs=self.jobs,
            sender=self.receiver,
            policy=RetryPolicy(DELAYS, uniform=lambda low, high: high),
            secrets=lambda owner, now: [SECRET],
            schedule=self.broker.schedule,
            allow=LOOPBACK,
            lease_seconds=CLAIM_SECONDS,
            clock=self.clock,
            monotonic=self.clock,
        )
        self.reconciler = Reconciler(
            jobs=self.jobs,
            publisher=self.broker,
            schedule_webhook=self.broker.schedule,
            broker=self.broker,
            grace_seconds=GRACE,
            opaque_after_seconds=GRACE,
            max_redrives=MAX_REDRIVES,
            clock=self.clock,
        )
        self.ids: list[int] = []
        self.workers: list[Worker] = []
        """Live pool processes, each running one job (holding its lease and its message)."""
        self.frozen: list[Worker] = []
        """Processes that lost their lease; a frozen one may still wake and try to write."""
        self.next_pid = 100
        self.terminal: dict[int, tuple[Any, ...]] = {}
        self.terminal_writes: Counter[int] = Counter()
        self.killed_after_post: Counter[int] = Counter()
        self.restarted = False
        self.final_answer: Any = 200
        self.poison = False

    @initialize(final_answer=st.sampled_from([200, 500, 410]), poison=st.booleans())
    def how_the_run_ends(self, final_answer: int, poison: bool) -> None:
        """What happens once the rules are done and everything drains: the receiver answers
        `final_answer` (500 takes each delivery to the end of its retry schedule); in a poison
        run every job crashes its process on every attempt, until the cap stops it (R4)."""
        self.final_answer = final_answer
        self.poison = poison

    # ------------------------------------------------------------------ the API

    @precondition(lambda self: len(self.ids) < MAX_JOBS)  # few jobs, each taken further
    @rule(
        webhook=st.sampled_from([True, True, False]),
        published=st.sampled_from([True, True, True, False]),
    )
    def submit(self, webhook: bool, published: bool) -> None:
        job_id = self.jobs.create(_new_job(HOOK if webhook else None))
        self.ids.append(job_id)
        if published:
            self.broker.publish_job(job_id)
        else:
            # The publish failed: the API fails the record it wrote, so fetch tells the truth.
            self._wrote_terminal(job_id, self.jobs.fail(job_id, "The queue is unavailable."))

    @precondition(lambda self: self.ids)
    @rule(pick=st.integers(min_value=0))
    def fetch(self, pick: int) -> None:
        job = self.jobs.get(self.ids[pick % len(self.ids)])
        assert job is not None, "fetch of an accepted id answered unknown"
        body = job_body(job, self.clock.now)
        if job.status is JobStatus.SUCCESS:
            assert isinstance(body, SuccessResponse) and body.output and body.output == job.output
        elif job.status is JobStatus.FAILED:
            assert isinstance(body, FailedResponse) and body.output == ""
            assert body.message == job.error
        else:
            assert isinstance(body, FetchProcessingResponse) and body.output == ""

    # ------------------------------------------------------------------ workers

    @precondition(lambda self: self.broker.queue)
    @rule(pick=st.integers(min_value=0))
    def worker_takes_a_message(self, pick: int) -> None:
        """A delivery (the first, a duplicate, or a redelivery) reaches a pool process."""
        job_id = self.broker.queue.pop(pick % len(self.broker.queue))
        self._run_delivery(job_id, self._new_pid())

    @precondition(lambda self: self.workers)
    @rule(pick=st.integers(min_value=0), how=st.sampled_from(["success", "failure", "die"]))
    def worker_finishes(self, pick: int, how: str) -> None:
        """The job ends; with "die" the process succeeds and is killed before it hands off the
        webhook and acks the message (which comes back)."""
        worker = self.workers.pop(pick % len(self.workers))
        self.broker.running.discard(worker.job_id)
        if how == "failure":
            applied = self.jobs.fail(worker.job_id, "Generation failed.", lease=worker.token)
        else:
            applied = self.jobs.succeed(
                worker.job_id, output=[_link(worker)], generation_time=1.0, lease=worker.token
            )
        assert applied, f"job {worker.job_id}: the lease holder could not finish it"
        self._wrote_terminal(worker.job_id, applied)
        if how == "die":
            self.broker.publish_job(worker.job_id)
        else:
            self._hand_off_webhook(worker.job_id)

    @precondition(lambda self: self.workers)
    @rule(
        pick=st.integers(min_value=0),
        how=st.sampled_from(["pool process killed", "worker killed", "hard time limit"]),
    )
    def worker_dies(self, pick: int, how: str) -> None:
        worker = self.workers.pop(pick % len(self.workers))
        job_id = worker.job_id
        self.broker.running.discard(job_id)
        if how == "pool process killed":
            # The main process frees the dead child's lease; the message is re-queued at once.
            assert self.jobs.release_lease(job_id, owner_prefix(worker.pid, HOST))
            self.broker.publish_job(job_id)
        elif how == "worker killed":
            # Nobody frees the lease: it lapses (what its Redis TTL does), and the message comes
            # back after the visibility timeout.
            self.redis.delete(keys.job_lease(job_id))
            self.broker.publish_job(job_id)
        else:
            # The main process kills the child over the hard limit and fails the job (acked).
            applied = self.jobs.fail(job_id, TIMEOUT_FAILURE, owner=owner_prefix(worker.pid, HOST))
            assert applied, f"job {job_id}: the main process could not fail the job it killed"
            self._wrote_terminal(job_id, applied)
            self._hand_off_webhook(job_id)
        self.frozen.append(worker)

    @precondition(lambda self: self.workers)
    @rule(pick=st.integers(min_value=0))
    def message_delivered_again_while_running(self, pick: int) -> None:
        """The visibility timeout expired while the job runs: the broker hands out a copy."""
        self.broker.publish_job(self.workers[pick % len(self.workers)].job_id)

    @precondition(lambda self: self.ids)
    @rule(pick=st.integers(min_value=0))
    def late_failure_without_a_lease(self, pick: int) -> None:
        """A writer that holds no lease fails the job (the API after a failed publish, the
        reconciler giving up): it applies only to a job that is not over and nobody runs."""
        job_id = self.ids[pick % len(self.ids)]
        before = self.jobs.get(job_id)
        assert before is not None
        running = any(worker.job_id == job_id for worker in self.workers)
        applied = self.jobs.fail(job_id, "Given up.")
        assert applied == (not before.status.is_terminal() and not running), (before, applied)
        self._wrote_terminal(job_id, applied)
        if applied:
            self._hand_off_webhook(job_id)

    @precondition(lambda self: self.frozen)
    @rule(pick=st.integers(min_value=0), succeed=st.booleans())
    def frozen_worker_wakes_and_writes(self, pick: int, succeed: bool) -> None:
        """A process presumed dead (its lease gone) finishes late: it must change nothing."""
        worker = self.frozen[pick % len(self.frozen)]
        if succeed:
            applied = self.jobs.succeed(
                worker.job_id, output=["stale"], generation_time=9.0, lease=worker.token
            )
        else:
            applied = self.jobs.fail(worker.job_id, "stale", lease=worker.token)
        assert not applied, f"job {worker.job_id}: a worker without its lease wrote"

    # ------------------------------------------------------------------ webhooks

    @precondition(lambda self: self.broker.hooks)
    @rule(
        pick=st.integers(min_value=0),
        answer=st.sampled_from(ANSWERS),
        wait=st.booleans(),
        die_on_publish=st.booleans(),
    )
    def dispatcher_handles_a_message(
        self, pick: int, answer: Any, wait: bool, die_on_publish: bool
    ) -> None:
        """A dispatcher takes a webhook message, possibly once it is due; the receiver answers
        `answer`. With `die_on_publish` the dispatcher is killed when it publishes the next
        attempt (after recording this one). A killed dispatcher's message comes back."""
        message = self.broker.hooks.pop(pick % len(self.broker.hooks))
        job_id, attempt, due_at = message
        if wait and due_at is not None:
            self.clock.now = max(self.clock.now, due_at)
        self.receiver.answer = answer
        self.broker.die_on_publish = die_on_publish
        posts = len(self.receiver.posts)
        try:
            self.dispatcher.handle(job_id, attempt, due_at)
        except Killed:
            self.broker.hooks.append(message)
            if answer == "killed after POST" and len(self.receiver.posts) > posts:
                self.killed_after_post[job_id] += 1
        else:
            self.broker.acked_hooks.append(message)
        finally:
            self.broker.die_on_publish = False

    @precondition(lambda self: self.broker.acked_hooks)
    @rule(pick=st.integers(min_value=0))
    def webhook_message_delivered_again(self, pick: int) -> None:
        """An acked message comes back anyway (acks_late and a lost ack)."""
        self.broker.hooks.append(self.broker.acked_hooks[pick % len(self.broker.acked_hooks)])

    # ------------------------------------------------------------------ the world

    @rule(seconds=st.sampled_from([1.0, 10.0, CLAIM_SECONDS + 1, 150.0, 3600.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: not self.restarted)  # once: it wipes what the run built up
    @rule()
    def broker_restarts_without_persistence(self) -> None:
        self.restarted = True
        self.broker.queue.clear()
        self.broker.hooks.clear()
        self.broker.running.clear()

    @rule()
    def reconciler_pass(self) -> None:
        self.reconciler.run_once()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def jobs_keep_their_invariants(self) -> None:
        active = set(self.jobs.active_ids())
        pending = set(self.jobs.webhooks_due(before=float("inf")))
        holders = {worker.job_id: worker.token for worker in self.workers}
        for job_id in self.ids:
            job = self.jobs.get(job_id)
            assert job is not None, f"job {job_id}: its record is gone"
            terminal = job.status.is_terminal()
            if job_id in self.terminal:
                assert _snapshot(job) == self.terminal[job_id], f"job {job_id}: left its end"
            elif terminal:
                self.terminal[job_id] = _snapshot(job)
            assert bool(job.output) == (job.status is JobStatus.SUCCESS), job
            assert (job_id in active) == (not terminal), f"job {job_id}: active index wrong"
            lease = self.redis.get(keys.job_lease(job_id))
            assert (lease.decode() if lease else None) == holders.get(job_id), (
                f"job {job_id}: lease {lease!r}, expected the live worker's"
            )
            assert job.attempts <= MAX_ATTEMPTS, job
            assert self.terminal_writes[job_id] <= 1, f"job {job_id}: ended twice"
            self._check_webhook(job, pending)

    def _check_webhook(self, job: JobRecord, pending: set[int]) -> None:
        posts = [post for post in self.receiver.posts if post.job_id == job.id]
        attempts = self.jobs.webhook_attempts(job.id)
        if not job.webhook:
            assert job.webhook_status is WebhookStatus.NONE
            assert not posts and not attempts and job.id not in pending
            return
        # Only a terminal job has an event; its status never changes, so neither does its id.
        expected_id = delivery_id(job.id, job.status.value)
        assert all(post.webhook_id == expected_id for post in posts), (job.id, posts)
        assert all(attempt["webhook_id"] == expected_id for attempt in attempts), attempts
        assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1)), attempts
        assert len(attempts) <= len(DELAYS) + 1, attempts
        # Each POST is a recorded attempt, or one whose dispatcher died before recording it.
        assert len(posts) <= len(attempts) + self.killed_after_post[job.id], (posts, attempts)
        delivered = [a for a in attempts if a["status_code"] and 200 <= a["status_code"] < 300]
        assert len(delivered) <= 1, attempts
        if job.webhook_status is WebhookStatus.SENT:
            assert delivered == attempts[-1:], attempts
        in_index = job.status.is_terminal() and job.webhook_status is WebhookStatus.PENDING
        assert (job.id in pending) == in_index, f"job {job.id}: pending-webhook index wrong"

    def teardown(self) -> None:
        """Let every process finish (in a poison run: crash on every attempt), every dispatcher
        deliver and the reconciler run: every job must end, and every delivery."""
        for _ in range(20):
            for _ in range(100):
                if self.workers and self.poison:
                    self.worker_dies(0, "pool process killed")
                elif self.workers:
                    self.worker_finishes(0, "success")
                elif self.broker.queue:
                    self._run_delivery(self.broker.queue.pop(0), self._new_pid())
            assert not (self.workers or self.broker.queue), "jobs keep coming back"
            for _ in range(200):
                if not self.broker.hooks:
                    break
                self.broker.hooks.sort(key=lambda hook: hook[2] or 0.0)
                self.dispatcher_handles_a_message(0, self.final_answer, True, False)
            assert not self.broker.hooks, "webhook messages keep coming back"
            self.clock.now += max(DELAYS) + CLAIM_SECONDS + GRACE + 1
            self.reconciler_pass()
            self.reconciler_pass()  # a missing message is re-driven when two passes miss it
            if not (self.broker.queue or self.broker.hooks or self.workers):
                break
        self.jobs_keep_their_invariants()
        for job_id in self.ids:
            job = self.jobs.get(job_id)
            assert job is not None and job.status.is_terminal(), f"job {job_id}: never ended"
            if job.webhook:
                assert job.webhook_status in (WebhookStatus.SENT, WebhookStatus.FAILED), (
                    f"job {job_id}: its webhook delivery was lost ({job.webhook_status})"
                )

    # ------------------------------------------------------------------ helpers

    def _new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def _run_delivery(self, job_id: int, pid: int) -> None:
        """What JobRunner.run does with a delivery, up to running the job."""
        before = self.jobs.get(job_id)
        assert before is not None
        worker = Worker(pid, job_id)
        claim = self.jobs.acquire(job_id, worker.token)
        holders = {w.job_id for w in self.workers}
        if before.status.is_terminal():
            expected = ClaimOutcome.GONE
        elif job_id in holders:
            expected = ClaimOutcome.LEASED
        elif before.attempts >= MAX_ATTEMPTS:
            expected = ClaimOutcome.EXHAUSTED
        else:
            expected = ClaimOutcome.CLAIMED
        assert claim.outcome is expected, (job_id, before, claim)
        if claim.outcome is ClaimOutcome.CLAIMED:
            self.workers.append(worker)
            self.broker.running.add(job_id)
        elif claim.outcome is ClaimOutcome.LEASED:
            self.broker.publish_job(job_id)  # looks again once the lease could have lapsed
        elif claim.outcome is ClaimOutcome.EXHAUSTED:
            self._wrote_terminal(job_id, True)
            self._hand_off_webhook(job_id)

    def _hand_off_webhook(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.webhook:
            self.broker.publish_webhook(job_id)

    def _wrote_terminal(self, job_id: int, applied: bool) -> None:
        if applied:
            self.terminal_writes[job_id] += 1


def _new_job(webhook: str | None) -> NewJob:
    return new_job(
        meta={"prompt": "a fox"},
        future_links=["https://cdn.example.com/p-0.png"],
        webhook=webhook,
        track_id="t",
    )


def _link(worker: Worker) -> str:
    return f"https://cdn.example.com/p-0.png?pid={worker.pid}"


Lifecycle.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lifecycle = Lifecycle.TestCase
