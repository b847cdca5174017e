"""The per-process control loop of a generation worker: warm on request, unload when idle.

Each pool process (one per GPU) runs one daemon thread that

- listens on the `dreamq:control` channel: `warm <model_id>` (sent by model_reload) loads the
  model as soon as no job runs in the process, so the next job finds it warm (never during a
  job: the load would hold the cache and compete with the job for GPU memory);
- every sweep interval unloads models unused for `DREAMQ_MODEL_IDLE_SECONDS`;
- publishes the models it holds in `dreamq:workers:models` (process name -> JSON list), for
  operators (`dreamq workers`) and tests (routing on it is later work): at once when they
  change, and again every heartbeat interval, which pushes the entry's deadline forward
  (`storage/workers.py`: the entry of a process killed with -9 is dropped once it passes).

Pub/sub is fire-and-forget: a process that is down when a reload is asked simply loads the model
on its first job, which is what would happen without the reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from storage import keys
from storage.workers import STALE_AFTER_INTERVALS, WorkerStore

log = logging.getLogger("dreamq.worker")


class ModelCache(Protocol):
    def warm(self, model_id: str) -> float: ...

    def unload_idle(self) -> list[str]: ...

    def loaded_ids(self) -> list[str]: ...


def sweep_interval(idle_seconds: float) -> float:
    """Often enough that a model is unloaded within a quarter of its idle period, and at least
    once a second so that stop() is prompt (a sweep is a dict scan: cheap)."""
    return min(1.0, max(0.05, idle_seconds / 4))


class WorkerControl:
    def __init__(
        self,
        client: redis.Redis,
        cache: ModelCache,
        *,
        name: str,
        idle_seconds: float,
        refresh_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client  # kept: redis-py closes a pubsub's connection with its client
        self._store = WorkerStore(client)
        self._cache = cache
        self.name = name
        self._interval = sweep_interval(idle_seconds)
        self._refresh = refresh_seconds
        self._clock = clock
        self._refresh_at = 0.0  # when the model list is published again even if unchanged
        self._stop = threading.Event()
        self._reported: list[str] | None = None
        self._lock = threading.Lock()
        self._idle = threading.Event()  # set while no job runs in this process
        self._idle.set()
        self._pending: list[str] = []  # models asked to warm, waiting for the process to idle
        self._thread = threading.Thread(target=self._loop, name="dreamq-control", daemon=True)

    def start(self) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(keys.CONTROL)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._store.forget_models(self.name)
        except redis.RedisError:
            log.warning("control: could not clear this process's model list")

    def report(self) -> None:
        """Publish the models this process holds, when they changed since the last report or
        the refresh interval passed (which keeps the entry alive: it dies 3 intervals later)."""
        with self._lock:
            loaded = sorted(self._cache.loaded_ids())
            now = self._clock()
            if loaded == self._reported and now < self._refresh_at:
                return
            until = now + STALE_AFTER_INTERVALS * self._refresh
            self._store.publish_models(self.name, loaded, until=until)
            self._reported = loaded
            self._refresh_at = now + self._refresh

    def job_started(self) -> None:
        self._idle.clear()

    def job_finished(self) -> None:
        self._idle.set()
        self.report()

    def handle(self, command: str) -> None:
        verb, _, argument = command.partition(" ")
        if verb == "warm" and argument:
            if argument not in self._pending:
                self._pending.append(argument)
            self.warm_pending()
        else:
            log.warning("control: unknown command %r", command)

    def warm_pending(self) -> None:
        """Load the models asked for, while no job runs (the runner waits for a load at most)."""
        while self._pending and self._idle.is_set():
            model_id = self._pending.pop(0)
            seconds = self._cache.warm(model_id)  # the cache reports the load time itself
            self.report()  # before the log line: whoever reads the log finds the list current
            log.info("model %s warm on request (%.2f s)", model_id, seconds)

    def sweep(self) -> list[str]:
        unloaded = self._cache.unload_idle()
        if unloaded:
            self.report()  # before the log lines, as in handle()
        for model_id in unloaded:
            log.info("model %s unloaded after being idle", model_id)
        return unloaded

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=self._interval)
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    self.handle(data.decode() if isinstance(data, bytes) else str(data))
                self.warm_pending()
                self.sweep()
                self.report()
            except redis.RedisError:
                log.warning("control: Redis unavailable")
                self._stop.wait(1.0)
            except Exception:
                # A model that fails to warm is logged; the job that needs it reports the error.
                log.exception("control: command failed")
