"""Worker faults against real processes (R1, R2, R3, R4, R9, R12 of the reliability spec).

Each test runs its own `dreamq worker` subprocesses on a queue of its own, with a test profile of
low limits, against the session's redis-server; the API is the real app in process. Jobs are
made slow honestly: the tiny demo model at 128x128 takes about 0.4 s a step on one CPU thread.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient

from api.app import create_app
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.jobs import JobRecord, JobStore
from tests.support.processes import JobEvents, ProcessOutput, RedisServer, dreamq_command, running

pytestmark = pytest.mark.integration

SLOW = {"width": "128", "height": "128", "num_inference_steps": "12"}
"""About 5 s of work: long enough to act on a job while it runs."""
QUICK = {"width": "64", "height": "64", "num_inference_steps": "2"}


@dataclass
class Profile:
    redis: RedisServer
    settings: Settings
    env: dict[str, str]
    api: TestClient
    key: str
    outputs: Path

    def worker(self, *args: str) -> AbstractContextManager[ProcessOutput]:
        return _ready(running(dreamq_command("worker", *args), env=self.env, name="dreamq worker"))

    def submit(self, webhook: bool = False, **fields: str) -> int:
        body: dict[str, Any] = {"key": self.key, "model_id": "demo", "prompt": "a fox", **fields}
        if webhook:
            body["webhook"] = "http://127.0.0.1:9/hook"
        response = self.api.post("/api/v4/dreambooth", json=body)
        assert response.status_code == 200, response.text
        job_id: int = response.json()["id"]
        return job_id

    def job(self, job_id: int) -> JobRecord:
        record = JobStore(self.redis.client(), ttl_seconds=60).get(job_id)
        assert record is not None
        return record

    def webhooks_queued(self) -> int:
        return int(self.redis.client().llen(self.settings.webhook_queue))

    def output_files(self, job: JobRecord) -> list[Path]:
        return sorted(self.outputs.rglob(f"{job.file_prefix}-*"))


@contextmanager
def _ready(worker: AbstractContextManager[ProcessOutput]) -> Iterator[ProcessOutput]:
    with worker as output:
        output.wait_for(r"\bready\.", timeout=90)
        yield output


@pytest.fixture
def profile_factory(
    redis_proc: RedisServer, demo_registry_file: Path, tmp_path: Path
) -> Iterator[Callable[..., Profile]]:
    clients: list[TestClient] = []

    def make(*, time_limit: float = 60, visibility: float = 120, attempts: int = 3) -> Profile:
        name = f"reliability-{uuid.uuid4().hex[:8]}"
        outputs = tmp_path / "outputs"
        env = {
            "DREAMQ_REDIS_URL": redis_proc.url,
            "DREAMQ_STORAGE_URL": f"file://{outputs}",
            "DREAMQ_MODELS_FILE": str(demo_registry_file),
            "DREAMQ_GENERATE_QUEUE": name,
            "DREAMQ_WEBHOOK_QUEUE": f"{name}-webhooks",
            "DREAMQ_JOB_TIME_LIMIT": str(time_limit),
            "DREAMQ_VISIBILITY_TIMEOUT": str(visibility),
            "DREAMQ_MAX_ATTEMPTS": str(attempts),
            "DREAMQ_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
            "HF_HUB_OFFLINE": "1",
        }
        settings = Settings(
            redis_url=redis_proc.url,
            storage_url=f"file://{outputs}",
            models_file=demo_registry_file,
            generate_queue=name,
            webhook_queue=f"{name}-webhooks",
            job_time_limit=time_limit,
            visibility_timeout=visibility,
            max_attempts=attempts,
            outbound_allow_cidrs="127.0.0.0/8",
        )
        key, _ = ApiKeyStore(redis.Redis.from_url(redis_proc.url)).create("reliability")
        api = TestClient(create_app(settings))
        api.__enter__()
        clients.append(api)
        return Profile(redis_proc, settings, env, api, key, outputs)

    yield make
    for api in clients:
        api.__exit__(None, None, None)


def processing(worker: ProcessOutput, job_id: int, attempt: int, timeout: float = 60) -> int:
    """Waits until a pool process starts the job's `attempt`; returns that process's pid."""
    pattern = rf" (\d+) job {job_id}: processing \(model \w+, attempt {attempt}\)"
    return int(worker.wait_for(pattern, timeout=timeout).group(1))


def terminal_events(events: JobEvents, job_id: int) -> list[str]:
    return [line for line in events.seen if line.split(" ")[0] == str(job_id)]


def test_r1_pool_process_killed_mid_job_is_redelivered_and_completes(
    profile_factory: Callable[..., Profile],
) -> None:
    profile = profile_factory()
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        job_id = profile.submit(webhook=True, **SLOW)
        child = processing(worker, job_id, attempt=1)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        assert events.wait_for(job_id, timeout=90) == "success"
        print(f"\nR1: pool process kill -9 -> success in {time.monotonic() - killed:.1f} s")
        worker.wait_for(rf"job {job_id}: its worker process {child} died", timeout=5)
        assert processing(worker, job_id, attempt=2, timeout=5) != child
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 2)
    assert len(profile.output_files(job)) == 1  # one set of outputs
    assert terminal_events(events, job_id) == [f"{job_id} success"]
    assert profile.webhooks_queued() == 1  # one `completed` webhook handed off
    events.close()


def force_visibility_expiry(profile: Profile) -> None:
    """What the broker does once the visibility timeout of a fetched message has passed: put it
    back on its queue. Done now, from a client whose visibility timeout is tiny, rather than
    waiting: the worker's own settings must pass the startup check (timeout >= 2 x limit)."""
    app = Celery(broker=profile.redis.url, set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 0.001}
    with app.connection_for_write() as connection:
        connection.default_channel.qos.restore_visible(num=100, interval=1)


def test_r3_a_job_redelivered_while_running_runs_once(
    profile_factory: Callable[..., Profile],
) -> None:
    profile = profile_factory()
    events = JobEvents(profile.redis.client())
    # Two pool processes: the redelivered message reaches the idle one while the job runs.
    with profile.worker("--concurrency", "2") as worker:
        job_id = profile.submit(**SLOW)
        processing(worker, job_id, attempt=1)
        force_visibility_expiry(profile)
        worker.wait_for(rf"job {job_id}: another worker process holds its lease", timeout=30)
        assert events.wait_for(job_id, timeout=60) == "success"
        assert worker.count(rf"job {job_id}: processing") == 1
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 1)
    assert terminal_events(events, job_id) == [f"{job_id} success"]
    events.close()


def test_r4_a_job_that_kills_its_process_every_time_stops_after_max_attempts(
    profile_factory: Callable[..., Profile],
) -> None:
    profile = profile_factory(attempts=2)
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        job_id = profile.submit(webhook=True, **SLOW)
        # The test is the crash: each attempt's process dies by kill -9 mid-job.
        for attempt in (1, 2):
            os.kill(processing(worker, job_id, attempt), signal.SIGKILL)
        assert events.wait_for(job_id, timeout=90) == "failed"
        job = profile.job(job_id)
        assert job.error == "The job failed 2 times; it was stopped."
        assert job.attempts == 2
        # Other jobs keep flowing.
        other = profile.submit(**QUICK)
        assert events.wait_for(other, timeout=60) == "success"
        assert profile.webhooks_queued() == 1  # one `failed` webhook
    assert terminal_events(events, job_id) == [f"{job_id} failed"]
    events.close()


def test_r9_sigterm_mid_job_finishes_the_job_then_exits(
    profile_factory: Callable[..., Profile],
) -> None:
    profile = profile_factory()
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        job_id = profile.submit(**SLOW)
        processing(worker, job_id, attempt=1)
        worker.process.send_signal(signal.SIGTERM)  # the main process: Celery's warm shutdown
        assert events.wait_for(job_id, timeout=60) == "success"
        assert worker.process.wait(timeout=60) == 0
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 1)
    client = profile.redis.client()
    assert client.llen(profile.settings.generate_queue) == 0
    assert client.hlen("unacked") == 0  # acked, not left for a redelivery
    events.close()


def test_r12_a_job_over_the_time_limit_fails_with_timeout_and_the_next_runs(
    profile_factory: Callable[..., Profile],
) -> None:
    profile = profile_factory(time_limit=3, visibility=6)
    events = JobEvents(profile.redis.client())
    with profile.worker() as worker:
        slow = profile.submit(webhook=True, width="128", height="128", num_inference_steps="40")
        started = time.monotonic()
        assert events.wait_for(slow, timeout=30) == "failed"
        assert time.monotonic() - started < 15
        job = profile.job(slow)
        assert job.error is not None and "timeout" in job.error
        nxt = profile.submit(**QUICK)
        assert events.wait_for(nxt, timeout=30) == "success"
        # Handed off by the job's own task, which ended before the next one started.
        assert profile.webhooks_queued() == 1
        worker.wait_for(rf"job {slow}: failed: over its time limit", timeout=5)
    events.close()


def test_r2_whole_worker_killed_mid_job_another_completes_it(
    profile_factory: Callable[..., Profile],
) -> None:
    profile = profile_factory(time_limit=10, visibility=20)
    events = JobEvents(profile.redis.client())
    with profile.worker() as first:
        job_id = profile.submit(**SLOW)
        processing(first, job_id, attempt=1)
        os.killpg(first.process.pid, signal.SIGKILL)
        killed = time.monotonic()
    with profile.worker() as second:
        bound = profile.settings.visibility_timeout + 10 + 30  # + restore tick + the job
        assert events.wait_for(job_id, timeout=bound) == "success"
        recovered = time.monotonic() - killed
        print(f"\nR2: worker group kill -9 -> success on another worker in {recovered:.1f} s")
        processing(second, job_id, attempt=2, timeout=5)
    job = profile.job(job_id)
    assert (job.status.value, job.attempts) == ("success", 2)
    assert terminal_events(events, job_id) == [f"{job_id} success"]
    events.close()
