"""The per-process control loop of a generation worker: warm on request, unload when idle.

Each pool process (one per GPU) runs one daemon thread that

- listens on the `dreamq:control` channel: `warm <model_id>` (sent by model_reload) loads the
  model as soon as no job runs in the process, so the next job finds it warm (never during a
  job: the load would hold the cache and compete with the job for GPU memory);
- every sweep interval unloads models unused for `DREAMQ_MODEL_IDLE_SECONDS`;
- publishes the models it holds in `dreamq:workers:models` (process name -> JSON list), for
  operators and tests (routing on it is later work).

Pub/sub is fire-and-forget: a process that is down when a reload is asked simply loads the model
on its first job, which is what would happen without the reload.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Protocol

import redis

from storage import keys

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
    ) -> None:
        self._client = client  # kept: redis-py closes a pubsub's connection with its client
        self._cache = cache
        self.name = name
        self._interval = sweep_interval(idle_seconds)
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
            self._client.hdel(keys.WORKER_MODELS, self.name)
        except redis.RedisError:
            log.warning("control: could not clear this process's model list")

    def report(self) -> None:
        """Publish the models this process holds, when they changed since the last report."""
        with self._lock:
            loaded = sorted(self._cache.loaded_ids())
            if loaded == self._reported:
                return
            self._client.hset(keys.WORKER_MODELS, self.name, json.dumps(loaded))
            self._reported = loaded

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
