"""A worker's heartbeat, written by its main process: liveness measured by consumption.

A thread of the Celery main process writes the worker's record (`storage/workers.py`) every
DREAMQ_HEARTBEAT_SECONDS, and at once after each message the consumer receives. It samples what
only the main process knows:

- the time the consumer last received a message (`task_received` fires in the main process, for
  every message the broker hands over);
- the jobs running now and the messages waiting for a pool process (`celery.worker.state`);
- Celery's view of its consumer (the `worker_ready` sender): does it hold a broker connection,
  and is its task consumer subscribed to each of the worker's queues (a queue cancelled with
  `celery control cancel_consumer`, or a consumer torn down by a connection loss, is not);
- its pool processes' pids, which attribute their published model lists to this worker; the
  lists of pool processes that are gone are dropped at once.

The ETA counts a generation worker only while it consumes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.utils.nodenames import WORKER_DIRECT_QUEUE_FORMAT
from celery.worker import state as celery_state

from storage.workers import WorkerRecord, WorkerStore

log = logging.getLogger("dreamq.worker")


def consumer_view(consumer: Any, queues: list[str]) -> tuple[bool, list[str]]:
    """(connected, the queues consumed now), as the Celery consumer sees itself. Attribute reads
    only: safe from another thread (the consumer may be reconnecting meanwhile)."""
    connection = getattr(consumer, "connection", None)
    try:
        connected = connection is not None and bool(connection.connected)
    except Exception:
        connected = False
    task_consumer = getattr(consumer, "task_consumer", None)
    if not connected or task_consumer is None:
        return connected, []
    try:
        return True, [queue for queue in queues if task_consumer.consuming_from(queue)]
    except Exception:
        return True, []


def pool_pids(consumer: Any) -> list[int]:
    """The prefork pool's process ids (none for the threads pool)."""
    processes = getattr(getattr(getattr(consumer, "pool", None), "_pool", None), "_pool", None)
    try:
        return sorted(int(process.pid) for process in list(processes or ()) if process.pid)
    except Exception:
        return []


def _job_id(request: Any) -> int | None:
    try:
        return int(request.args[0])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def _snapshot(requests: Any) -> list[Any]:
    """A WeakSet the consumer thread changes: copy it, trying again if it changed meanwhile."""
    for _ in range(5):
        try:
            return list(requests)
        except RuntimeError:
            continue
    return []


class Heartbeat:
    """Writes this worker's liveness record from the main process, on a timer and on receipt."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        role: str,
        interval: float,
        clock: Callable[[], float] = time.time,
        state: Any = celery_state,
        on_pool_gone: Callable[[list[int]], None] | None = None,
    ) -> None:
        """`on_pool_gone(pids)` hears of pool processes that exited (their live metrics go)."""
        self._store = WorkerStore(client)
        self._on_pool_gone = on_pool_gone
        self.role = role
        self.interval = interval
        self._clock = clock
        self._state = state
        self._consumer: Any = None
        self.record: WorkerRecord | None = None
        self._last_received: float | None = None
        self._stopping = False
        self._known_pids: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dreamq-heartbeat", daemon=True)

    def start(self, consumer: Any) -> None:
        """On `worker_ready` (its sender is the consumer): first record, then the timer."""
        self.attach(consumer)
        self._thread.start()

    def attach(self, consumer: Any) -> None:
        """Learn the worker from its consumer and write the first record."""
        self._consumer = consumer
        now = self._clock()
        task_consumer = getattr(consumer, "task_consumer", None)
        # A generation worker's own worker-direct queue (workers/routing.py) is its private
        # mailbox, not one of the queues it serves: it is left out of the record.
        direct = WORKER_DIRECT_QUEUE_FORMAT.format(hostname=consumer.hostname)
        queues = sorted(
            q.name for q in getattr(task_consumer, "queues", ()) or () if q.name != direct
        )
        controller = getattr(consumer, "controller", None)
        concurrency = getattr(controller, "concurrency", None) or getattr(
            getattr(consumer, "pool", None), "limit", 1
        )
        self.record = WorkerRecord(
            name=str(consumer.hostname),
            role=self.role,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=queues,
            concurrency=int(concurrency or 1),
            pool_pids=[],
            started_at=now,
            heartbeat_at=now,
            heartbeat_seconds=self.interval,
        )
        try:
            self.beat()
        except redis.RedisError:
            log.warning("heartbeat: Redis unavailable")

    def received(self, **_: Any) -> None:
        """On `task_received`: the consumer got a message; say so now, not at the next tick."""
        self._last_received = self._clock()
        self._wake.set()

    def stopping(self, **_: Any) -> None:
        """On `worker_shutting_down`: a warm shutdown stops consuming on purpose. Sent from a
        signal handler: only a flag (taking a lock here could deadlock the main thread); the
        next tick writes it."""
        self._stopping = True

    def stop(self, **_: Any) -> None:
        """On `worker_shutdown`: stop the timer and remove the record (a clean exit)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.record is not None:
            try:
                self._store.remove(self.record.name)
            except redis.RedisError:
                log.warning("heartbeat: could not remove this worker's record")

    def sample(self) -> WorkerRecord:
        """The record as of now (also what the next beat writes)."""
        assert self.record is not None, "start() first"
        record = self.record
        now = self._clock()
        active = _snapshot(self._state.active_requests)
        waiting = [r for r in _snapshot(self._state.reserved_requests) if r not in active]
        connected, consuming = consumer_view(self._consumer, record.queues)
        record.heartbeat_at = now
        record.pool_pids = pool_pids(self._consumer)
        record.jobs = sorted(j for j in (_job_id(r) for r in active) if j is not None)
        record.reserved = len(waiting)
        record.connected = connected
        record.consuming = consuming
        record.last_received_at = self._last_received
        record.stopping = self._stopping
        if active or waiting:
            record.busy_at = now
        if connected and set(record.queues) <= set(consuming):
            record.consuming_at = now
        return record

    def beat(self) -> None:
        record = self.sample()
        pids = set(record.pool_pids)
        gone, self._known_pids = self._known_pids - pids, pids
        serving = self.role == "generate" and record.consuming_at == record.heartbeat_at
        self._store.beat(record, serving=serving, gone_pids=sorted(gone))
        if gone and self._on_pool_gone is not None:
            try:
                self._on_pool_gone(sorted(gone))
            except Exception:  # bookkeeping of metrics: never worth a heartbeat
                log.warning("heartbeat: pool process cleanup failed", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.beat()
            except redis.RedisError:
                log.warning("heartbeat: Redis unavailable")
            except Exception:  # never let the heartbeat die: that would read as a dead worker
                log.exception("heartbeat failed")
