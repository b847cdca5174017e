"""A test profile for fault tests: its own queues, low limits, `dreamq worker` subprocesses and the
real API app in process, against a redis-server (and optionally a broker of its own).

Jobs are made slow honestly: the tiny demo model at 128x128 takes about 0.4 s a step on one CPU
thread.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from fastapi.testclient import TestClient

from api.app import create_app
from dreamq import lanes
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.jobs import JobRecord, JobStore
from tests.support.processes import JobEvents, ProcessOutput, RedisServer, dreamq_command, running

SLOW = {"width": "128", "height": "128", "num_inference_steps": "12"}
"""About 5 s of work: long enough to act on a job while it runs."""
QUICK = {"width": "64", "height": "64", "num_inference_steps": "2"}


@dataclass
class Profile:
    redis: RedisServer
    """Job records, keys, statistics (and the broker unless `broker_url` names another)."""
    settings: Settings
    env: dict[str, str]
    api: TestClient
    key: str
    outputs: Path

    @property
    def broker_url(self) -> str:
        return self.settings.effective_broker_url

    def worker(self, *args: str, env: dict[str, str] | None = None) -> Process:
        return self._start("worker", *args, env=env)

    def dispatcher(self, *args: str, env: dict[str, str] | None = None) -> Process:
        return self._start("dispatcher", *args, env=env)

    def _start(self, role: str, *args: str, env: dict[str, str] | None) -> Process:
        command = dreamq_command(role, *args)
        return _ready(running(command, env={**self.env, **(env or {})}, name=f"dreamq {role}"))

    def submit(self, webhook: bool | str = False, **fields: str) -> int:
        body: dict[str, Any] = {"key": self.key, "model_id": "demo", "prompt": "a fox", **fields}
        if webhook:
            body["webhook"] = webhook if isinstance(webhook, str) else "http://127.0.0.1:9/hook"
        response = self.api.post("/api/v4/dreambooth", json=body)
        assert response.status_code == 200, response.text
        job_id: int = response.json()["id"]
        return job_id

    def job(self, job_id: int) -> JobRecord:
        record = JobStore(self.redis.client(), ttl_seconds=60).get(job_id)
        assert record is not None
        return record

    def broker(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker_url)

    def generate_lists(self) -> list[str]:
        """The generation queue's broker lists, one per priority level (dreamq/lanes.py)."""
        queue = self.settings.generate_queue
        return [lanes.list_name(queue, level) for level in range(lanes.LEVELS)]

    def jobs_waiting(self) -> int:
        """Generation messages waiting in the broker, at every priority level."""
        broker = self.broker()
        return sum(int(broker.llen(name)) for name in self.generate_lists())

    def webhooks_queued(self) -> int:
        return int(self.broker().llen(self.settings.webhook_queue))

    def output_files(self, job: JobRecord) -> list[Path]:
        return sorted(self.outputs.rglob(f"{job.file_prefix}-*"))


Process = AbstractContextManager[ProcessOutput]


@contextmanager
def _ready(worker: Process) -> Iterator[ProcessOutput]:
    with worker as output:
        output.wait_for(r"\bready\.", timeout=90)
        yield output


ProfileFactory = Callable[..., Profile]


@contextmanager
def profiles(redis_proc: RedisServer, registry: Path, tmp_path: Path) -> Iterator[ProfileFactory]:
    """Makes profiles; each has queues of its own. Settings given as keywords (``lease...``) go
    to the worker environment as DREAMQ_<NAME> and to the in-process API's Settings."""
    clients: list[TestClient] = []

    def make(
        *,
        time_limit: float = 60,
        visibility: float = 120,
        attempts: int = 3,
        broker_url: str | None = None,
        **extra: Any,
    ) -> Profile:
        name = f"reliability-{uuid.uuid4().hex[:8]}"
        outputs = tmp_path / "outputs"
        values: dict[str, Any] = {
            "redis_url": redis_proc.url,
            "storage_url": f"file://{outputs}",
            "models_file": registry,
            "generate_queue": name,
            "webhook_queue": f"{name}-webhooks",
            "job_time_limit": time_limit,
            "visibility_timeout": visibility,
            "max_attempts": attempts,
            "outbound_allow_cidrs": "127.0.0.0/8",
            **extra,
        }
        if broker_url is not None:
            values["broker_url"] = broker_url
        env = {f"DREAMQ_{field.upper()}": str(value) for field, value in values.items()}
        env["HF_HUB_OFFLINE"] = "1"
        # No metrics endpoint unless a test asks: parallel workers would compete for one port.
        env.setdefault("DREAMQ_METRICS_PORT", "0")
        settings = Settings(**values)
        key, _ = ApiKeyStore(redis.Redis.from_url(redis_proc.url)).create("reliability")
        api = TestClient(create_app(settings))
        api.__enter__()
        clients.append(api)
        return Profile(redis_proc, settings, env, api, key, outputs)

    try:
        yield make
    finally:
        for api in clients:
            api.__exit__(None, None, None)


def processing(worker: ProcessOutput, job_id: int, attempt: int, timeout: float = 60) -> int:
    """Waits until a pool process starts the job's `attempt`; returns that process's pid."""
    pattern = rf" (\d+) job {job_id}: processing \(model \w+, attempt {attempt}\)"
    return int(worker.wait_for(pattern, timeout=timeout).group(1))


def terminal_events(events: JobEvents, job_id: int) -> list[str]:
    return [line for line in events.seen if line.split(" ")[0] == str(job_id)]


def force_visibility_expiry(profile: Profile) -> None:
    """What the broker does once the visibility timeout of a fetched message has passed: put it
    back on its queue. Done now, from a client whose visibility timeout is tiny, rather than
    waiting: the worker's own settings must pass the startup check (timeout >= 2 x limit)."""
    app = Celery(broker=profile.broker_url, set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 0.001}
    with app.connection_for_write() as connection:
        connection.default_channel.qos.restore_visible(num=100, interval=1)
