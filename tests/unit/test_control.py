"""The worker's control loop: warm on request, unload when idle, report what it holds."""

from __future__ import annotations

import json
import threading

import redis

from storage import keys
from tests.support.processes import Deadline
from workers.control import WorkerControl, sweep_interval


class FakeCache:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.idle: list[str] = []
        self.warmed = threading.Event()

    def warm(self, model_id: str) -> float:
        if model_id in self.loaded:
            return 0.0
        self.loaded.append(model_id)
        self.warmed.set()
        return 1.5

    def unload_idle(self) -> list[str]:
        gone = [model for model in self.loaded if model in self.idle]
        self.loaded = [model for model in self.loaded if model not in gone]
        return gone

    def loaded_ids(self) -> list[str]:
        return list(self.loaded)


def control(client: redis.Redis, cache: FakeCache) -> WorkerControl:
    return WorkerControl(client, cache, name="w1", idle_seconds=60)


def held(client: redis.Redis) -> list[str]:
    raw = client.hget(keys.WORKER_MODELS, "w1")
    return json.loads(raw) if raw else []


def test_warm_loads_and_reports(client: redis.Redis) -> None:
    cache = FakeCache()
    worker = control(client, cache)
    worker.handle("warm demo")
    assert held(client) == ["demo"]
    worker.handle("warm demo")  # already warm
    assert cache.loaded == ["demo"]


def test_sweep_unloads_idle_models_and_reports(client: redis.Redis) -> None:
    cache = FakeCache()
    worker = control(client, cache)
    worker.handle("warm a")
    worker.handle("warm b")
    cache.idle = ["a"]
    assert worker.sweep() == ["a"]
    assert held(client) == ["b"]


def test_unknown_commands_are_ignored(client: redis.Redis) -> None:
    cache = FakeCache()
    control(client, cache).handle("explode now")
    assert cache.loaded == []


def test_the_loop_hears_the_control_channel_and_clears_itself_on_stop(
    client: redis.Redis,
) -> None:
    cache = FakeCache()
    worker = control(client, cache)
    worker.start()
    try:
        deadline = Deadline(10)
        # The subscription is made in start(), so a publish now reaches the loop.
        assert client.publish(keys.CONTROL, "warm demo") == 1
        assert cache.warmed.wait(deadline.left())
    finally:
        worker.stop()
    assert client.hget(keys.WORKER_MODELS, "w1") is None


def test_sweep_interval_bounds() -> None:
    assert sweep_interval(604800) == 1.0
    assert sweep_interval(1) == 0.25
    assert sweep_interval(0.01) == 0.05


def test_warm_waits_until_no_job_runs(client: redis.Redis) -> None:
    cache = FakeCache()
    worker = control(client, cache)
    worker.job_started()
    worker.handle("warm demo")
    worker.handle("warm demo")  # asked twice: loaded once
    assert cache.loaded == []
    worker.warm_pending()
    assert cache.loaded == []
    worker.job_finished()
    worker.warm_pending()
    assert cache.loaded == ["demo"]
    assert held(client) == ["demo"]
