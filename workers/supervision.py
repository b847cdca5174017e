"""What a worker's main process does for a job whose pool process it lost.

The pool process that runs a job holds the job's lease (`storage/jobs.py`). When that process dies
(kill -9, out of memory), Celery re-queues the message at once (`task_reject_on_worker_lost`); the
main process frees the dead process's lease first, so the redelivery can claim the job. When the
hard time limit kills the process, the main process fails the job with a timeout (the message is
acked, and a redelivery finds the job terminal). Neither needs torch: the main process never
loads it.

A pool process may hold more jobs than its message names: the jobs it claimed for that
message (workers/routing.py: another job, or a batch of several), and the job whose tail its
finisher still runs (workers/finisher.py: outputs being encoded and stored, the message already
acked). Every lease token a process takes starts with its `lease_owner` prefix, so when the
process dies (mid-job, killed at the hard limit, or seen gone by the heartbeat while idle) the
main process finds every job a token of it still holds: those never reached their terminal
transition. It frees their leases and publishes each again (attempt + 1), except the job of a
message Celery re-queues itself; at the hard limit it fails them. Without that they would wait
for their leases to expire and then for the reconciler.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import redis
from celery import Celery
from celery.exceptions import WorkerLostError
from celery.worker.request import Request

from dreamq.queue import CeleryPublisher, Publisher
from dreamq.settings import Settings
from storage.jobs import JobStore, lease_owner

log = logging.getLogger("dreamq.worker")

TIMEOUT_FAILURE = "The job ran over its time limit and was stopped (timeout)."


class JobSupervisor:
    """The main process's view of the jobs its pool processes run; built on first use."""

    def __init__(
        self,
        settings: Settings,
        app: Celery,
        *,
        jobs: JobStore | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        """`jobs` and `publisher` (tests) replace the store and Celery publisher it builds."""
        self._settings = settings
        self._app = app
        self._jobs = jobs
        self._publisher = publisher
        self._lock = threading.Lock()

    def _store(self) -> JobStore:
        with self._lock:
            if self._jobs is None:
                client = redis.Redis.from_url(self._settings.redis_url)
                self._jobs = JobStore(client, ttl_seconds=self._settings.job_ttl_seconds)
            return self._jobs

    def _publish(self) -> Publisher:
        return self._publisher or CeleryPublisher(self._app, self._settings)

    def process_lost(self, job_id: int, pid: int) -> None:
        """Pool process `pid` died running the task of `job_id`, whose message Celery puts back:
        free the leases it held and publish again every other job among them."""
        self._recover(pid, requeued=job_id)

    def timed_out(self, job_id: int, pid: int) -> None:
        """Pool process `pid` was killed at the hard time limit: the jobs its task claimed (one
        token: the one taken last) fail with a timeout; a job of an earlier task, whose tail was
        still storing, is delivered again."""
        jobs = self._store()
        owner = lease_owner(pid)
        held = jobs.leased_by(owner)
        records = {job_id: jobs.get(job_id) for job_id in held}

        def started(job_id: int) -> float:
            record = records[job_id]
            return (record.started_at or 0.0) if record is not None else 0.0

        current = held[max(held, key=started)] if held else None
        for held_id, token in held.items():
            if token != current:
                continue
            if not jobs.fail(held_id, TIMEOUT_FAILURE, owner=owner):
                continue
            log.warning("job %s: failed: over its hard time limit; process %s killed", held_id, pid)
            job = records[held_id]
            if job is not None and job.webhook:
                self._publish().publish_webhook(held_id)
        self._recover(pid)

    def processes_gone(self, pids: list[int]) -> None:
        """Pool processes the heartbeat no longer finds (they may have died between jobs)."""
        for pid in pids:
            _guard(functools.partial(self._recover, pid))

    def _recover(self, pid: int, requeued: int | None = None) -> None:
        jobs = self._store()
        owner = lease_owner(pid)
        for held in jobs.leased_by(owner):
            # Only while a token of the dead process holds the lease: nobody can end the job.
            if not jobs.release_lease(held, owner):
                continue
            log.warning("job %s: its worker process %s died; the job is delivered again", held, pid)
            if held == requeued:
                continue
            job = jobs.get(held)
            self._publish().publish_job(held, job.level if job is not None else 0)


def supervised_request(supervisor: JobSupervisor) -> type[Request]:
    """A Celery request class (runs in the main process) that tells `supervisor` what happened."""

    class SupervisedRequest(Request):
        def _job_id(self) -> int:
            return int(self.args[0])

        def on_timeout(self, soft: bool, timeout: float) -> None:
            if not soft and self.worker_pid:
                _guard(lambda: supervisor.timed_out(self._job_id(), self.worker_pid))
            super().on_timeout(soft, timeout)

        def on_failure(
            self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
        ) -> None:
            # Before the base class re-queues the message: the redelivery must find no lease.
            exc = exc_info.exception
            exc = getattr(exc, "exc", exc)  # billiard wraps it in ExceptionWithTraceback
            if isinstance(exc, WorkerLostError) and self.worker_pid:
                _guard(lambda: supervisor.process_lost(self._job_id(), self.worker_pid))
            super().on_failure(exc_info, send_failed_event, return_ok)

    return SupervisedRequest


def _guard(call: Any) -> None:
    # A Redis blip here must not break the main process's bookkeeping of its pool.
    try:
        call()
    except Exception:
        log.exception("worker supervision failed")
