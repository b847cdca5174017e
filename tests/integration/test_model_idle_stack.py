"""Models idle longer than DREAMQ_MODEL_IDLE_SECONDS leave worker memory; the next job or a
model_reload brings them back. A real worker with a one-second idle period."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from dreamq.settings import Settings
from storage import keys
from storage.apikeys import ApiKeyStore
from tests.support.processes import JobEvents, ProcessOutput, RedisServer, dreamq_worker

pytestmark = pytest.mark.integration

QUEUE = "generate-idle-test"


@pytest.fixture(scope="module")
def idle_stack(
    redis_proc: RedisServer, demo_registry_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProcessOutput, TestClient, str]]:
    outputs = tmp_path_factory.mktemp("outputs")
    env = {
        "DREAMQ_REDIS_URL": redis_proc.url,
        "DREAMQ_STORAGE_URL": f"file://{outputs}",
        "DREAMQ_MODELS_FILE": str(demo_registry_file),
        "DREAMQ_GENERATE_QUEUE": QUEUE,
        "DREAMQ_MODEL_IDLE_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    settings = Settings(
        redis_url=redis_proc.url,
        storage_url=f"file://{outputs}",
        models_file=demo_registry_file,
        generate_queue=QUEUE,
    )
    key, _ = ApiKeyStore(redis_proc.client()).create("idle")
    with dreamq_worker(env, "worker") as worker, TestClient(create_app(settings)) as api:
        yield worker, api, key


def held(redis_proc: RedisServer) -> list[str]:
    lists = [json.loads(value) for value in redis_proc.client().hvals(keys.WORKER_MODELS)]
    return [model for models in lists for model in models]


def test_an_idle_model_is_unloaded_and_comes_back(
    idle_stack: tuple[ProcessOutput, TestClient, str], redis_proc: RedisServer
) -> None:
    worker, api, key = idle_stack
    events = JobEvents(redis_proc.client())
    body = {"key": key, "model_id": "demo", "prompt": "a fox", "width": 64, "height": 64,
            "num_inference_steps": 2}  # fmt: skip
    start = len(worker.lines)
    job_id = api.post("/api/v4/dreambooth", json=body).json()["id"]
    assert events.wait_for(job_id) == "success"
    worker.wait_for(r"model demo unloaded after being idle", timeout=30, start=start)
    assert "demo" not in held(redis_proc)

    again = api.post("/api/v4/dreambooth", json=body).json()["id"]
    assert events.wait_for(again) == "success"
    assert worker.count(r"model demo loaded in") == 2
    events.close()
