"""Worker liveness by consumption, against real processes: a `dreamq worker` on a queue of its own
(with a 0.5 s heartbeat), the session's redis-server as job store and broker, and `dreamq workers`
run as an operator (or a Kubernetes liveness probe) runs it.

The worker is made to stop consuming while its process stays up, the way a broker reconnect can
leave it (celery #8082, #10205): its consumer is cancelled through Celery's remote control.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from storage import keys
from tests.support.processes import Deadline, JobEvents, dreamq_command
from tests.support.profile import QUICK, Profile, ProfileFactory

pytestmark = pytest.mark.integration

HEARTBEAT = 0.5
LIMIT = 3 * HEARTBEAT  # stale / stalled after this long


def dreamq_workers(profile: Profile, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        dreamq_command("workers", *args),
        env={**os.environ, **profile.env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(profile: Profile, name: str) -> dict[str, Any] | None:
    """This worker's entry in `dreamq workers --json` (the session's Redis holds others)."""
    result = dreamq_workers(profile, "--json")
    assert result.returncode == 0, result.stderr
    return next((item for item in json.loads(result.stdout) if item["name"] == name), None)


def until(
    profile: Profile, name: str, test: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Run `dreamq workers --json` until this worker's entry passes `test` (each run is a fresh
    process: no sleep between them)."""
    deadline = Deadline(timeout)
    entry = None
    while not deadline.passed():
        entry = listed(profile, name)
        if entry is not None and test(entry):
            return entry
    raise TimeoutError(f"worker {name}: never matched; last seen {entry}")


def test_status_reports_a_consuming_worker_then_a_stalled_then_a_stale_one(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory(heartbeat_seconds=HEARTBEAT)
    queue = profile.settings.generate_queue
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        name = worker.wait_for(r"(generate-\d+@\S+) ready\.", timeout=5).group(1)
        assert name.startswith(f"generate-{worker.process.pid}@")  # unique per process

        job_id = profile.submit(**QUICK)
        assert events.wait_for(job_id, timeout=60) == "success"
        # Until the task has returned (the success event comes a little before): idle, demo held.
        ok = until(profile, name, lambda e: e["models"] == ["demo"] and not e["jobs"], timeout=30)
        assert (ok["role"], ok["queues"], ok["state"]) == ("generate", [queue], "ok")
        assert ok["pid"] == worker.process.pid and len(ok["pool_pids"]) == 1
        assert ok["heartbeat_age"] < LIMIT
        assert ok["last_received_age"] is not None  # the job's message
        assert ok["consuming"] == [queue] and ok["connected"] is True
        assert (ok["jobs"], ok["queue_depth"]) == ([], 0)
        check = dreamq_workers(profile, "--check", name)
        assert check.returncode == 0, check.stdout + check.stderr
        table = dreamq_workers(profile)
        assert table.returncode == 0
        rows = [line.split()[:3] for line in table.stdout.splitlines()]
        assert [name, "generate", "ok"] in rows

        # The process stays up, but its consumer stops taking messages.
        control = Celery(broker=profile.broker_url, set_as_current=False)
        replies = control.control.cancel_consumer(queue, destination=[name], reply=True, timeout=10)
        assert replies and name in replies[0], replies
        waiting = profile.submit(**QUICK)
        stalled = until(profile, name, lambda e: e["state"] == "stalled", timeout=30)
        # Either rule may speak first: idle while a message waits and nothing received, or
        # Celery's own view that the consumer is cancelled; the second holds soon in any case.
        assert stalled["heartbeat_age"] < LIMIT  # alive: heartbeats still arrive
        assert stalled["queue_depth"] == 1 and stalled["jobs"] == []
        # The heartbeat record says the consumer is gone at its next beat, which may come after
        # the idle rule spoke.
        cancelled = until(profile, name, lambda e: "not consuming" in e["reason"], timeout=30)
        assert cancelled["state"] == "stalled"
        assert cancelled["consuming"] == [] and cancelled["connected"] is True
        assert profile.job(waiting).status.value == "queued"
        check = dreamq_workers(profile, "--check", name)
        assert check.returncode == 1
        assert f"{name}: stalled" in check.stdout
        host = name.partition("@")[2]
        assert dreamq_workers(profile, "--check", f"generate@{host}").returncode == 1

        assert worker.count(r"heartbeat") == 0, worker.tail()  # no warning, no failure

        # kill -9 of the whole worker: no heartbeat, and its pool process's model list goes.
        pool_pid = ok["pool_pids"][0]
        os.killpg(worker.process.pid, signal.SIGKILL)
        stale = until(
            profile, name, lambda e: e["state"] == "stale" and e["models"] == [], timeout=30
        )
        assert "no heartbeat" in stale["reason"]
        assert profile.redis.client().hget(keys.WORKER_MODELS, f"{host}:{pool_pid}") is None
        assert dreamq_workers(profile, "--check", name).returncode == 1
    events.close()


def test_a_worker_stopped_cleanly_leaves_no_record(profile_factory: ProfileFactory) -> None:
    profile = profile_factory(heartbeat_seconds=HEARTBEAT)
    with profile.worker() as worker:
        name = worker.wait_for(r"(generate-\d+@\S+) ready\.", timeout=5).group(1)
        assert listed(profile, name) is not None
        worker.process.send_signal(signal.SIGTERM)  # warm shutdown, as `docker stop` does
        assert worker.process.wait(timeout=60) == 0
    assert listed(profile, name) is None
    client = profile.redis.client()
    assert client.exists(keys.worker(name)) == 0
    assert client.zscore(keys.WORKERS, name) is None  # the ETA no longer counts it
