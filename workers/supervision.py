"""What a worker's main process does for a job whose pool process it lost.

The pool process that runs a job holds the job's lease (`storage/jobs.py`). When that process dies
(kill -9, out of memory), Celery re-queues the message at once (`task_reject_on_worker_lost`); the
main process frees the dead process's lease first, so the redelivery can claim the job. When the
hard time limit kills the process, the main process fails the job with a timeout (the message is
acked, and a redelivery finds the job terminal). Neither needs torch: the main process never
loads it.

A job whose task has returned may still be in its process's finisher (workers/finisher.py: its
outputs being encoded and stored), its message already acked. The main process remembers, per
pool process, the last jobs whose tasks ended there; when that process dies (mid-job, killed at
the hard limit, or seen gone by the heartbeat while idle) and a token of it still holds such a
job's lease, the job never reached its terminal transition: the main process frees the lease and
publishes the job again (attempt + 1). Without that it would wait for its lease to expire and
then for the reconciler.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
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

ENDED_KEPT = 4
"""Jobs remembered per pool process after their tasks ended (the finisher holds at most one)."""


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
        self._ended: dict[int, deque[int]] = {}
        """Pool process id -> the last jobs whose tasks ended there: one may still be finishing
        (a few are kept, since tasks that hand nothing over, duplicates, end in between)."""
        self._ended_lock = threading.Lock()

    def _store(self) -> JobStore:
        with self._lock:
            if self._jobs is None:
                client = redis.Redis.from_url(self._settings.redis_url)
                self._jobs = JobStore(client, ttl_seconds=self._settings.job_ttl_seconds)
            return self._jobs

    def _publish(self) -> Publisher:
        return self._publisher or CeleryPublisher(self._app, self._settings)

    def task_ended(self, job_id: int, pid: int) -> None:
        """The task of `job_id` returned in pool process `pid` (acked): its tail may still run."""
        with self._ended_lock:
            self._ended.setdefault(pid, deque(maxlen=ENDED_KEPT)).append(job_id)

    def process_lost(self, job_id: int, pid: int) -> None:
        try:
            if self._store().release_lease(job_id, lease_owner(pid)):
                log.warning(
                    "job %s: its worker process %s died; the job is delivered again", job_id, pid
                )
        finally:
            self._lost_while_finishing(pid)

    def timed_out(self, job_id: int, pid: int) -> None:
        try:
            self._fail_timed_out(job_id, pid)
        finally:
            self._lost_while_finishing(pid)

    def _fail_timed_out(self, job_id: int, pid: int) -> None:
        jobs = self._store()
        if not jobs.fail(job_id, TIMEOUT_FAILURE, owner=lease_owner(pid)):
            return
        log.warning("job %s: failed: over its hard time limit; process %s killed", job_id, pid)
        job = jobs.get(job_id)
        if job is not None and job.webhook:
            self._publish().publish_webhook(job_id)

    def processes_gone(self, pids: list[int]) -> None:
        """Pool processes the heartbeat no longer finds (they may have died between jobs)."""
        for pid in pids:
            _guard(functools.partial(self._lost_while_finishing, pid))

    def _lost_while_finishing(self, pid: int) -> None:
        with self._ended_lock:
            ended = self._ended.pop(pid, ())
        for job_id in ended:
            # Only while a token of the dead process holds the lease: nobody can end the job.
            if not self._store().release_lease(job_id, lease_owner(pid)):
                continue
            log.warning(
                "job %s: its worker process %s died while storing its outputs; the job is "
                "delivered again",
                job_id,
                pid,
            )
            job = self._store().get(job_id)
            self._publish().publish_job(job_id, job.level if job is not None else 0)


def supervised_request(supervisor: JobSupervisor) -> type[Request]:
    """A Celery request class (runs in the main process) that tells `supervisor` what happened."""

    class SupervisedRequest(Request):
        def _job_id(self) -> int:
            return int(self.args[0])

        def acknowledge(self) -> None:
            # Celery's per-task request class overrides on_success without calling up, but acks
            # through here when the task has returned (late acks).
            super().acknowledge()
            if self.worker_pid:
                _guard(lambda: supervisor.task_ended(self._job_id(), self.worker_pid))

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
