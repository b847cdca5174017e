"""Worker liveness: the records, the states (ok, stale, stalled), the pool processes' model lists,
the main process's heartbeat and `dreamq workers`, on fakeredis."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import redis

from dreamq import cli
from storage import keys
from storage.workers import (
    OK,
    RECORD_TTL_INTERVALS,
    STALE,
    STALLED,
    WorkerRecord,
    WorkerStore,
    assess,
    find,
    process_name,
)
from workers.control import WorkerControl
from workers.liveness import Heartbeat, consumer_view

NOW = 1_700_000_000.0
INTERVAL = 10.0
LIMIT = 3 * INTERVAL


def record(**changes: Any) -> WorkerRecord:
    values: dict[str, Any] = {
        "name": "generate-100@gpu1",
        "role": "generate",
        "host": "gpu1",
        "pid": 100,
        "queues": ["generate"],
        "concurrency": 1,
        "pool_pids": [101],
        "started_at": NOW - 3600,
        "heartbeat_at": NOW - 1,
        "heartbeat_seconds": INTERVAL,
        "connected": True,
        "consuming": ["generate"],
        "consuming_at": NOW - 1,
    }
    values.update(changes)
    return WorkerRecord(**values)


def no_depths(names: list[str]) -> dict[str, int | None]:
    return dict.fromkeys(names, 0)


# -- the states ------------------------------------------------------------------------------


def test_a_fresh_consuming_worker_is_ok() -> None:
    assert assess(record(), NOW, depth=0) == (OK, "")
    # Busy with a job while others wait: the queue's depth is no fault of its own.
    assert assess(record(jobs=[7], last_received_at=NOW - 600), NOW, depth=5)[0] == OK


def test_a_worker_silent_for_three_intervals_is_stale() -> None:
    assert assess(record(heartbeat_at=NOW - LIMIT), NOW, depth=0)[0] == OK  # the edge
    state, reason = assess(record(heartbeat_at=NOW - LIMIT - 1), NOW, depth=0)
    assert state == STALE
    assert "no heartbeat for 31 s" in reason


def test_a_worker_whose_consumer_stopped_consuming_is_stalled() -> None:
    cancelled = record(consuming=[], consuming_at=NOW - LIMIT - 5)
    state, reason = assess(cancelled, NOW, depth=None)
    assert state == STALLED
    assert "not consuming ['generate']" in reason
    disconnected = record(connected=False, consuming=[], consuming_at=NOW - LIMIT - 5)
    assert "no broker connection" in assess(disconnected, NOW, depth=None)[1]
    # A reconnect shorter than the limit is not a stall.
    assert assess(record(consuming=[], consuming_at=NOW - 5), NOW, depth=0)[0] == OK


def test_an_idle_worker_that_receives_nothing_while_messages_wait_is_stalled() -> None:
    # Celery believes it consumes (celery #8082, #10205), but nothing arrives.
    quiet = record(last_received_at=NOW - LIMIT - 1, busy_at=NOW - LIMIT - 2)
    state, reason = assess(quiet, NOW, depth=2)
    assert state == STALLED
    assert "idle with 2 message(s) ready" in reason
    assert assess(quiet, NOW, depth=0)[0] == OK  # nothing to receive
    assert assess(quiet, NOW, depth=None)[0] == OK  # the broker did not answer: unknown
    assert assess(record(last_received_at=NOW - 5), NOW, depth=2)[0] == OK  # just received
    assert assess(record(busy_at=NOW - 5), NOW, depth=2)[0] == OK  # just finished a job
    assert assess(record(reserved=1), NOW, depth=2)[0] == OK  # one waits for its pool process
    assert assess(record(started_at=NOW - 5), NOW, depth=2)[0] == OK  # just started


def test_a_worker_in_warm_shutdown_is_ok_until_it_goes_silent() -> None:
    draining = record(stopping=True, consuming=[], consuming_at=NOW - 600, jobs=[3])
    assert assess(draining, NOW, depth=4)[0] == OK
    assert assess(record(stopping=True, heartbeat_at=NOW - 60), NOW, depth=0)[0] == STALE


def test_a_worker_is_judged_by_its_own_interval() -> None:
    quick = record(heartbeat_seconds=1.0, heartbeat_at=NOW - 4)
    assert assess(quick, NOW, depth=0)[0] == STALE
    assert assess(record(heartbeat_at=NOW - 4), NOW, depth=0)[0] == OK


def test_records_round_trip_and_ignore_unknown_fields() -> None:
    original = record(jobs=[1, 2], last_received_at=NOW - 3)
    data = json.loads(original.to_json())
    data["from_a_newer_version"] = True
    assert WorkerRecord.from_json(json.dumps(data)) == original


# -- the store -------------------------------------------------------------------------------


def test_a_beat_writes_the_record_with_an_expiry_and_indexes_it(client: redis.Redis) -> None:
    store = WorkerStore(client)
    store.beat(record(heartbeat_at=NOW), serving=True)
    assert stored(client) == record(heartbeat_at=NOW)
    assert 0 < client.ttl(keys.worker("generate-100@gpu1")) <= RECORD_TTL_INTERVALS * INTERVAL
    assert client.zscore(keys.WORKER_INDEX, "generate-100@gpu1") == NOW
    assert client.zscore(keys.WORKERS, "generate-100@gpu1") == NOW  # the ETA counts it


def test_only_serving_workers_count_for_the_eta(client: redis.Redis) -> None:
    store = WorkerStore(client)
    store.beat(record(name="webhooks-5@cpu", role="webhooks", heartbeat_at=NOW), serving=False)
    store.beat(record(name="generate-6@gpu", heartbeat_at=NOW), serving=False)
    assert client.zcard(keys.WORKERS) == 0
    assert {r.name for r in store.records()} == {"webhooks-5@cpu", "generate-6@gpu"}


def test_expired_records_leave_the_index_and_remove_clears_everything(
    client: redis.Redis,
) -> None:
    store = WorkerStore(client)
    store.beat(record(name="a@h", heartbeat_at=NOW), serving=True)
    store.beat(record(name="b@h", heartbeat_at=NOW + 1), serving=True)
    client.delete(keys.worker("a@h"))  # what its expiry does
    assert [r.name for r in store.records()] == ["b@h"]
    assert client.zrange(keys.WORKER_INDEX, 0, -1) == [b"b@h"]
    store.remove("b@h")
    assert store.records() == []
    assert client.zscore(keys.WORKERS, "b@h") is None
    assert client.exists(keys.worker("b@h")) == 0


def test_model_lists_past_their_deadline_are_pruned(client: redis.Redis) -> None:
    store = WorkerStore(client)
    store.publish_models("gpu1:101", ["demo"], until=NOW + 30)
    store.publish_models("gpu1:102", ["demo-xl"], until=NOW - 1)  # killed with -9 long ago
    client.hset(keys.WORKER_MODELS, "gpu1:103", json.dumps(["old"]))  # no deadline at all
    assert store.process_models(NOW) == {"gpu1:101": ["demo"]}
    assert client.hkeys(keys.WORKER_MODELS) == [b"gpu1:101"]
    assert client.zrange(keys.WORKER_MODELS_EXPIRY, 0, -1) == [b"gpu1:101"]


def test_a_beat_drops_the_lists_of_its_gone_pool_processes(client: redis.Redis) -> None:
    store = WorkerStore(client)
    store.publish_models("gpu1:101", ["demo"], until=NOW + 30)
    store.publish_models("gpu1:102", ["demo"], until=NOW + 30)
    store.beat(record(heartbeat_at=NOW, pool_pids=[102]), serving=True, gone_pids=[101])
    assert client.hkeys(keys.WORKER_MODELS) == [b"gpu1:102"]
    # The prune on every beat also drops a list whose deadline passed.
    store.beat(record(heartbeat_at=NOW + 31, pool_pids=[102]), serving=True)
    assert client.hlen(keys.WORKER_MODELS) == 0


def test_statuses_attribute_models_by_host_and_pool_pid_and_sum_queue_depths(
    client: redis.Redis,
) -> None:
    store = WorkerStore(client)
    store.beat(record(heartbeat_at=NOW, pool_pids=[101, 102], busy_at=NOW), serving=True)
    other = record(name="generate-7@gpu2", host="gpu2", pid=7, pool_pids=[101], heartbeat_at=NOW)
    store.beat(replace(other, queues=["generate", "extra"]), serving=True)
    store.publish_models("gpu1:101", ["demo"], until=NOW + 30)
    store.publish_models("gpu1:102", ["demo-xl", "demo"], until=NOW + 30)
    store.publish_models("gpu2:101", ["demo-video"], until=NOW + 30)
    asked: list[list[str]] = []

    def depths(names: list[str]) -> dict[str, int | None]:
        asked.append(names)
        return {"generate": 2, "extra": 1}

    statuses = {s.record.name: s for s in store.statuses(depths, now=NOW + 1)}
    assert asked == [["extra", "generate"]]  # one broker round for every queue
    gpu1, gpu2 = statuses["generate-100@gpu1"], statuses["generate-7@gpu2"]
    assert gpu1.models == ["demo", "demo-xl"]
    assert gpu1.process_models == {101: ["demo"], 102: ["demo-xl", "demo"]}
    assert gpu2.models == ["demo-video"]
    assert (gpu1.queue_depth, gpu2.queue_depth) == (2, 3)
    shown = gpu1.as_dict()
    assert shown["state"] == OK
    assert shown["heartbeat_age"] == 1.0
    assert shown["process_models"] == {"101": ["demo"], "102": ["demo-xl", "demo"]}
    json.dumps(shown)


def test_find_takes_a_name_or_the_newest_worker_of_a_role_on_a_host(client: redis.Redis) -> None:
    store = WorkerStore(client)
    store.beat(record(name="generate-1@pod", host="pod", started_at=NOW - 60), serving=True)
    store.beat(record(name="generate-9@pod", host="pod", started_at=NOW - 5), serving=True)
    store.beat(record(name="webhooks-4@pod", role="webhooks", host="pod"), serving=False)
    statuses = store.statuses(no_depths, now=NOW)

    def found(target: str) -> str | None:
        status = find(statuses, target)
        return None if status is None else status.record.name

    assert found("generate-1@pod") == "generate-1@pod"
    assert found("generate@pod") == "generate-9@pod"  # the newest generation worker there
    assert found("webhooks@pod") == "webhooks-4@pod"
    assert found("generate@elsewhere") is None
    assert found("nobody") is None


# -- the pool process's control loop ---------------------------------------------------------


class FixedCache:
    def __init__(self, loaded: list[str]) -> None:
        self.loaded = loaded

    def warm(self, model_id: str) -> float:
        return 0.0

    def unload_idle(self) -> list[str]:
        return []

    def loaded_ids(self) -> list[str]:
        return list(self.loaded)


def test_the_control_loop_refreshes_its_list_before_the_deadline(client: redis.Redis) -> None:
    clock = [NOW]
    control = WorkerControl(
        client,
        FixedCache(["demo"]),
        name="gpu1:101",
        idle_seconds=60,
        refresh_seconds=INTERVAL,
        clock=lambda: clock[0],
    )
    control.report()
    assert client.zscore(keys.WORKER_MODELS_EXPIRY, "gpu1:101") == NOW + LIMIT
    clock[0] = NOW + INTERVAL - 1
    control.report()  # unchanged and not due: nothing written
    assert client.zscore(keys.WORKER_MODELS_EXPIRY, "gpu1:101") == NOW + LIMIT
    clock[0] = NOW + INTERVAL
    client.hdel(keys.WORKER_MODELS, "gpu1:101")  # pruned while its loop was held up
    control.report()  # due: written again, whatever happened meanwhile
    assert json.loads(client.hget(keys.WORKER_MODELS, "gpu1:101") or b"[]") == ["demo"]
    assert client.zscore(keys.WORKER_MODELS_EXPIRY, "gpu1:101") == NOW + INTERVAL + LIMIT
    control.start()
    control.stop()
    assert client.hlen(keys.WORKER_MODELS) == 0
    assert client.zcard(keys.WORKER_MODELS_EXPIRY) == 0


# -- the main process's heartbeat ------------------------------------------------------------


class FakeTaskConsumer:
    def __init__(self, queues: list[str]) -> None:
        self.queues = [SimpleNamespace(name=name) for name in queues]
        self.active = set(queues)

    def consuming_from(self, queue: str) -> bool:
        return queue in self.active


class FakeRequest:
    def __init__(self, job_id: int) -> None:
        self.args = [job_id]


def fake_consumer(pids: list[int]) -> SimpleNamespace:
    processes = [SimpleNamespace(pid=pid) for pid in pids]
    return SimpleNamespace(
        hostname="generate-100@gpu1",
        connection=SimpleNamespace(connected=True),
        task_consumer=FakeTaskConsumer(["generate"]),
        pool=SimpleNamespace(_pool=SimpleNamespace(_pool=processes)),
        controller=SimpleNamespace(concurrency=len(pids)),
    )


def heartbeat(client: redis.Redis, clock: list[float], role: str = "generate") -> Any:
    state = SimpleNamespace(active_requests=set(), reserved_requests=set())
    beat = Heartbeat(client, role=role, interval=INTERVAL, clock=lambda: clock[0], state=state)
    return beat, state


def stored(client: redis.Redis, name: str = "generate-100@gpu1") -> WorkerRecord:
    raw = client.get(keys.worker(name))
    assert raw is not None
    return WorkerRecord.from_json(raw)


def test_the_heartbeat_records_consumption_jobs_and_pool(client: redis.Redis) -> None:
    clock = [NOW]
    beat, state = heartbeat(client, clock)
    consumer = fake_consumer([101, 102])
    beat.attach(consumer)
    try:
        first = stored(client)
        assert (first.queues, first.pool_pids, first.concurrency) == (["generate"], [101, 102], 2)
        assert (first.connected, first.consuming, first.consuming_at) == (True, ["generate"], NOW)
        assert first.last_received_at is None and first.jobs == []
        assert client.zscore(keys.WORKERS, "generate-100@gpu1") == NOW  # serving

        clock[0] = NOW + 1
        beat.received()
        running, waiting = FakeRequest(7), FakeRequest(8)
        state.active_requests.add(running)
        state.reserved_requests.update({running, waiting})
        clock[0] = NOW + 2
        beat.beat()
        busy = stored(client)
        assert (busy.last_received_at, busy.jobs, busy.reserved, busy.busy_at) == (
            NOW + 1,
            [7],
            1,
            NOW + 2,
        )

        # Cancelled consumer (celery control cancel_consumer): not consuming, not counted.
        consumer.task_consumer.active.clear()
        state.active_requests.clear()
        state.reserved_requests.clear()
        clock[0] = NOW + 3
        beat.beat()
        cancelled = stored(client)
        assert (cancelled.consuming, cancelled.consuming_at) == ([], NOW + 2)
        assert client.zscore(keys.WORKERS, "generate-100@gpu1") == NOW + 2
        clock[0] = NOW + 2 + LIMIT + 1
        beat.beat()
        assert assess(stored(client), clock[0], depth=0)[0] == STALLED
    finally:
        beat.stop()
    assert client.exists(keys.worker("generate-100@gpu1")) == 0  # a clean exit leaves no record
    assert client.zcard(keys.WORKERS) == 0


def test_the_heartbeat_drops_the_model_lists_of_pool_processes_that_died(
    client: redis.Redis,
) -> None:
    clock = [NOW]
    beat, _ = heartbeat(client, clock)
    consumer = fake_consumer([101])
    store = WorkerStore(client)
    beat.attach(consumer)
    try:
        store.publish_models(process_name(socket.gethostname(), 101), ["demo"], until=NOW + 300)
        # Celery replaced a pool process killed with -9: its list goes at the next beat.
        consumer.pool._pool._pool = [SimpleNamespace(pid=103)]
        beat.beat()
        assert client.hlen(keys.WORKER_MODELS) == 0
        assert stored(client).pool_pids == [103]
    finally:
        beat.stop()


def test_a_dispatcher_has_a_record_but_never_counts_for_the_eta(client: redis.Redis) -> None:
    beat, _ = heartbeat(client, [NOW], role="webhooks")
    consumer = fake_consumer([])
    consumer.hostname = "webhooks-5@cpu"
    consumer.pool = SimpleNamespace(limit=8)  # the threads pool: no processes
    consumer.controller = SimpleNamespace(concurrency=8)
    beat.attach(consumer)
    try:
        mine = stored(client, "webhooks-5@cpu")
        assert (mine.role, mine.pool_pids, mine.concurrency) == ("webhooks", [], 8)
        assert client.zcard(keys.WORKERS) == 0
    finally:
        beat.stop()


def test_consumer_view_without_a_connection() -> None:
    consumer = fake_consumer([1])
    assert consumer_view(consumer, ["generate"]) == (True, ["generate"])
    consumer.connection = None  # what Celery sets while it reconnects
    assert consumer_view(consumer, ["generate"]) == (False, [])
    consumer.connection = SimpleNamespace(connected=False)
    assert consumer_view(consumer, ["generate"]) == (False, [])


# -- dreamq workers --------------------------------------------------------------------------


@pytest.fixture
def cli_redis(monkeypatch: pytest.MonkeyPatch, server: fakeredis.FakeServer) -> redis.Redis:
    fake = fakeredis.FakeRedis(server=server)
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, *a, **k: fake))
    monkeypatch.setattr("storage.workers.queue_depths", lambda url, names: dict.fromkeys(names, 3))
    return fake


def test_the_workers_command_lists_checks_and_fails_a_stalled_worker(
    cli_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    store = WorkerStore(cli_redis)
    store.beat(record(heartbeat_at=now, started_at=now - 5, consuming_at=now), serving=True)
    store.publish_models("gpu1:101", ["demo"], until=now + 30)
    quiet = record(
        name="generate-200@gpu2", host="gpu2", heartbeat_at=now, consuming_at=now,
        last_received_at=now - 120,
    )  # fmt: skip
    store.beat(quiet, serving=True)

    assert cli.main(["workers", "--json"]) == 0
    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert listed["generate-100@gpu1"]["state"] == OK
    assert listed["generate-100@gpu1"]["models"] == ["demo"]
    assert listed["generate-100@gpu1"]["queue_depth"] == 3
    assert listed["generate-200@gpu2"]["state"] == STALLED

    assert cli.main(["workers"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "NAME", "ROLE", "STATE", "QUEUES", "HEARTBEAT", "RECEIVED", "JOBS", "MODELS", "DEPTH",
    ]  # fmt: skip
    assert "generate-200@gpu2: idle with 3 message(s) ready" in table

    assert cli.main(["workers", "--check", "generate-100@gpu1"]) == 0
    assert cli.main(["workers", "--check", "generate@gpu1"]) == 0
    assert cli.main(["workers", "--check", "generate-200@gpu2"]) == 1
    assert cli.main(["workers", "--check", "generate-999@gone"]) == 1
    assert "unknown" in capsys.readouterr().err


def test_a_received_message_is_written_at_once_by_the_heartbeat_thread(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    beat = Heartbeat(client, role="generate", interval=INTERVAL)  # the real clock and thread
    beat.start(fake_consumer([101]))
    written = threading.Event()
    write = beat.beat

    def write_and_tell() -> None:
        write()
        written.set()

    monkeypatch.setattr(beat, "beat", write_and_tell)
    try:
        assert stored(client).last_received_at is None
        beat.received()  # long before the next 10 s tick
        assert written.wait(5), "the heartbeat thread did not write the receipt"
        assert stored(client).last_received_at is not None
    finally:
        beat.stop()
    assert client.exists(keys.worker("generate-100@gpu1")) == 0
