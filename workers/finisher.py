"""The finisher: a job's CPU and I/O tail runs beside the next job's compute.

After the pipeline call (and the upscaler and safety checker, which use the GPU), what is left of
a job needs no GPU: encoding (PNG, mp4, gif), the upload to the object store, the terminal
transition, the duration statistics, metrics and the webhook hand-off. The runner hands that tail
to the pool process's finisher and its Celery task returns, so the message is acked and the next
one is taken while the tail runs on the finisher's thread.

The bound is one job: `submit` waits until the previous tail is done before it hands over the
next. A process that dies therefore loses at most one finished-but-unstored job; that job keeps
its lease (the tail's terminal transition deletes it), so no other delivery runs it meanwhile,
and it is run again once the lease is gone: freed at once by the worker's main process when it
sees the pool process die (workers/supervision.py), or expired, after which the reconciler
re-drives it.

A tail that runs longer than `deadline` seconds (a hung upload) is abandoned: its thread is left
to finish or hang on its own, a fresh thread takes the next tail, and the job keeps its lease
until it expires (a late write by the old thread still applies only while it holds the lease).
Without that, a wedged tail would make every later job of the process wait for it and time out.
The runner passes the soft time limit: a job never waits for its predecessor's tail past its own
soft limit, since it started after that tail was handed over.

`InlineFinisher` runs each tail at once in the caller's thread: unit tests drive the runner with
it, and it is what a closed `ThreadFinisher` falls back to.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("dreamq.worker")

Tail = Callable[[], None]
"""A job's tail. It ends the job itself (success or failure); an exception escaping it is a bug,
logged here."""


class Finisher(Protocol):
    def submit(self, tail: Tail) -> None:
        """Hand a tail over; waits while the previous one runs."""
        ...

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no tail runs; False when `timeout` passed first (by default, when the
        running tail has run past the deadline after which it is abandoned)."""
        ...

    def close(self, timeout: float | None = None) -> bool:
        """Drain, then stop; later tails run inline. False when the drain timed out."""
        ...


def _run(tail: Tail) -> None:
    try:
        tail()
    except Exception:
        log.exception("a job's finishing step raised")


class InlineFinisher:
    """Runs each tail at once, in the caller's thread."""

    def submit(self, tail: Tail) -> None:
        _run(tail)

    def drain(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True


class _Worker:
    """One finisher thread and the tail it holds (at most one)."""

    def __init__(self, name: str) -> None:
        self.tail: tuple[Tail, contextvars.Context] | None = None
        self.since = 0.0
        """When the tail it holds was handed over (monotonic)."""
        self.retired = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.changed = threading.Condition()

    def _loop(self) -> None:
        while True:
            with self.changed:
                while self.tail is None and not self.retired:
                    self.changed.wait()
                if self.tail is None:
                    return
                tail, context = self.tail
            # The job's log context (job_id, model_id, key_name) was bound by the runner.
            context.run(_run, tail)
            with self.changed:
                self.tail = None
                self.changed.notify_all()
                if self.retired:
                    return


class ThreadFinisher:
    """One background thread per pool process; one job's tail at a time."""

    def __init__(
        self,
        *,
        deadline: float,
        name: str = "dreamq-finisher",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deadline = deadline
        self._name = name
        self._clock = clock
        self._closed = False
        self._worker = self._start()

    def _start(self) -> _Worker:
        worker = _Worker(self._name)
        worker.thread.start()
        return worker

    def submit(self, tail: Tail) -> None:
        if self._closed:
            _run(tail)
            return
        worker = self._worker
        with worker.changed:
            idle = self._wait_idle(worker, until=worker.since + self._deadline)
        if not idle:
            worker = self._replace(worker)
        with worker.changed:
            # Copied here, in the job's thread: the tail's log lines carry the job's context.
            worker.tail = (tail, contextvars.copy_context())
            worker.since = self._clock()
            worker.changed.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        worker = self._worker
        with worker.changed:
            # By default as long as a tail may run before it is abandoned.
            end = worker.since + self._deadline if timeout is None else self._clock() + timeout
            return self._wait_idle(worker, until=end)

    def close(self, timeout: float | None = None) -> bool:
        drained = self.drain(timeout)
        self._closed = True
        worker = self._worker
        with worker.changed:
            worker.retired = True
            worker.changed.notify_all()
        if drained:
            worker.thread.join(timeout)
        else:
            log.error("finisher: a job was still finishing when the process stopped")
        return drained

    def _wait_idle(self, worker: _Worker, *, until: float) -> bool:
        """With `worker.changed` held: wait until it holds no tail, at most until `until`."""
        while worker.tail is not None:
            left = until - self._clock()
            if left <= 0:
                return False
            # A SoftTimeLimitExceeded (a signal handler) interrupts the wait in the main thread:
            # the tail was then not handed over, and the runner fails the job itself.
            worker.changed.wait(left)
        return True

    def _replace(self, stuck: _Worker) -> _Worker:
        log.error(
            "finisher: a job's finishing step has run for more than %.0f s (a hung upload?); "
            "it is abandoned, and that job runs again once its lease has expired",
            self._deadline,
        )
        with stuck.changed:
            stuck.retired = True  # its thread exits once the tail returns, if ever
            stuck.changed.notify_all()
        self._worker = self._start()
        return self._worker
