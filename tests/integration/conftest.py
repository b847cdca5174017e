"""The real stack for integration tests: redis-server, moto's S3 server, a `dreamq worker` and a
`dreamq dispatcher` subprocess, and the API app (real Redis, real Celery publisher) in process."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from dreamq.registry import ModelEntry, load_registry, write_registry
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.workers import WorkerStore
from tests.support.processes import (
    JobEvents,
    ProcessOutput,
    RedisServer,
    WebhookReceiver,
    dreamq_worker,
    webhook_receiver,
)
from tests.support.profile import ProfileFactory, profiles
from tests.support.s3 import MotoS3, moto_s3_server

BUCKET = "dreamq-outputs"


@dataclass
class Stack:
    redis: RedisServer
    s3: MotoS3
    settings: Settings
    worker: ProcessOutput
    dispatcher: ProcessOutput
    api: TestClient
    key: str
    other_key: str
    receiver: WebhookReceiver

    def events(self) -> JobEvents:
        return JobEvents(self.redis.client())


@pytest.fixture(scope="module")
def stack(
    redis_proc: RedisServer, demo_registry_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    redis_proc.client().flushall()
    registry_file = tmp_path_factory.mktemp("registry") / "models.yaml"
    demo = load_registry(demo_registry_file)
    broken = ModelEntry(source=str(registry_file.parent / "missing"))
    write_registry(
        registry_file, demo.model_copy(update={"models": {**demo.models, "broken": broken}})
    )
    with moto_s3_server() as s3, webhook_receiver() as receiver:
        s3.create_bucket(BUCKET)
        env = {
            **s3.env(),
            "DREAMQ_REDIS_URL": redis_proc.url,
            "DREAMQ_STORAGE_URL": f"s3://{BUCKET}/dq",
            "DREAMQ_PUBLIC_URL": "http://testserver",
            "DREAMQ_MODELS_FILE": str(registry_file),
            "DREAMQ_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
            "HF_HUB_OFFLINE": "1",
        }
        settings = Settings(
            redis_url=redis_proc.url,
            storage_url=f"s3://{BUCKET}/dq",
            s3_endpoint_url=s3.endpoint_url,
            public_url="http://testserver",
            models_file=registry_file,
            outbound_allow_cidrs="127.0.0.0/8",  # webhooks and image URLs on loopback servers
        )
        store = ApiKeyStore(redis.Redis.from_url(redis_proc.url))
        key, _ = store.create("tenant-a")
        other_key, _ = store.create("tenant-b")
        with pytest.MonkeyPatch.context() as patch:
            # The in-process API stores base64 inputs in the bucket: it needs the credentials too.
            for name, value in s3.env().items():
                if name.startswith("AWS_"):
                    patch.setenv(name, value)
            with (
                dreamq_worker(env, "worker") as worker,
                dreamq_worker(env, "dispatcher") as dispatcher,
                TestClient(create_app(settings)) as api,
            ):
                yield Stack(
                    redis=redis_proc,
                    s3=s3,
                    settings=settings,
                    worker=worker,
                    dispatcher=dispatcher,
                    api=api,
                    key=key,
                    other_key=other_key,
                    receiver=receiver,
                )


@pytest.fixture(autouse=True)
def _no_dead_workers_to_route_to(redis_proc: RedisServer) -> None:
    """Forget the model lists and busy notes of worker processes of earlier tests that no longer
    exist. A process killed with -9 (the fault tests do it) or with its group cannot clear its
    own; left until they expire (3 refreshes, 30 s), routing in the next test would hand a job
    to that dead node's queue, where it waits for a reconciler the test may not run (seen once
    in CI: a job of test_routing_stack never ran). Every worker here runs on this host, so a pid
    that is gone is a dead process; live ones (a module's stack) keep theirs."""
    store = WorkerStore(redis_proc.client())
    dead = [name for name in store.process_models(time.time()) if not _alive(name)]
    store.forget_models(*dead)


def _alive(process: str) -> bool:
    """Whether the pool process `<host>:<pid>` still serves its worker. A pool process whose
    worker died is re-parented to PID 1 and never takes a job again; once it exits, PID 1 here
    (the VM's init) never reaps it, so `kill(pid, 0)` would call the zombie alive for ever (seen
    in CI: a dead node kept `demo` warm, and test_routing_stack's last job was handed to it)."""
    pid = int(process.rsplit(":", 1)[1])
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X") and parent != "1"


@pytest.fixture
def profile_factory(
    redis_proc: RedisServer, demo_registry_file: Path, tmp_path: Path
) -> Iterator[ProfileFactory]:
    """Fault-test profiles (tests/support/profile.py): queues of their own, low limits."""
    with profiles(redis_proc, demo_registry_file, tmp_path) as make:
        yield make
