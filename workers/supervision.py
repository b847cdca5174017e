"""What a worker's main process does for a job whose pool process it lost.

The pool process that runs a job holds the job's lease (`storage/jobs.py`). When that process dies
(kill -9, out of memory), Celery re-queues the message at once (`task_reject_on_worker_lost`); the
main process frees the dead process's lease first, so the redelivery can claim the job. When the
hard time limit kills the process, the main process fails the job with a timeout (the message is
acked, and a redelivery finds the job terminal). Neither needs torch: the main process never
loads it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery
from celery.exceptions import WorkerLostError
from celery.worker.request import Request

from dreamq.queue import CeleryPublisher
from dreamq.settings import Settings
from storage.jobs import JobStore, lease_owner

log = logging.getLogger("dreamq.worker")

TIMEOUT_FAILURE = "The job ran over its time limit and was stopped (timeout)."


class JobSupervisor:
    """The main process's view of the jobs its pool processes run; built on first use."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self._settings = settings
        self._app = app
        self._jobs: JobStore | None = None
        self._lock = threading.Lock()

    def _store(self) -> JobStore:
        with self._lock:
            if self._jobs is None:
                client = redis.Redis.from_url(self._settings.redis_url)
                self._jobs = JobStore(client, ttl_seconds=self._settings.job_ttl_seconds)
            return self._jobs

    def process_lost(self, job_id: int, pid: int) -> None:
        if self._store().release_lease(job_id, lease_owner(pid)):
            log.warning(
                "job %s: its worker process %s died; the job is delivered again", job_id, pid
            )

    def timed_out(self, job_id: int, pid: int) -> None:
        jobs = self._store()
        if not jobs.fail(job_id, TIMEOUT_FAILURE, owner=lease_owner(pid)):
            return
        log.warning("job %s: failed: over its hard time limit; process %s killed", job_id, pid)
        job = jobs.get(job_id)
        if job is not None and job.webhook:
            CeleryPublisher(self._app, self._settings).publish_webhook(job_id)


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
