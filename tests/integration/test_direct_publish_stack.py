"""The API's direct Redis publisher (dreamq/queue.py `RedisPublisher`, no kombu) feeding a real
`dreamq worker`: a message it pushes runs like one of `send_task`'s, whether the broker is the
job Redis (the job store's create step pushes it with the record) or a redis-server of its own
(a client with kombu's timeouts).
A broker that went away fails the request with 503, and the job with it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from dreamq.queue import RedisPublisher
from dreamq.settings import Settings
from storage import keys
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStatus, JobStore
from tests.support.processes import (
    JobEvents,
    RedisServer,
    RestartableRedis,
    dreamq_worker,
    restartable,
)

pytestmark = pytest.mark.integration

BODY = {"model_id": "demo", "prompt": "a fox", "width": 64, "height": 64,
        "num_inference_steps": 2}  # fmt: skip


@contextmanager
def direct_stack(
    redis_proc: RedisServer, registry: Path, folder: Path, *, own_broker: bool, worker: bool
) -> Iterator[tuple[TestClient, str, RestartableRedis | None]]:
    """(the in-process API, a key, the broker's redis-server when it is not the job Redis)."""
    with ExitStack() as stack:
        broker = stack.enter_context(restartable(folder / "broker")) if own_broker else None
        broker_url = broker.url if broker else redis_proc.url
        queue = f"generate-{uuid.uuid4().hex[:8]}"  # this test's alone: no other worker takes it
        outputs = folder / "outputs"
        settings = Settings(
            redis_url=redis_proc.url,
            broker_url=broker_url,
            generate_queue=queue,
            storage_url=f"file://{outputs}",
            models_file=registry,
        )
        if worker:
            env = {
                "DREAMQ_REDIS_URL": redis_proc.url,
                "DREAMQ_BROKER_URL": broker_url,
                "DREAMQ_GENERATE_QUEUE": queue,
                "DREAMQ_STORAGE_URL": f"file://{outputs}",
                "DREAMQ_MODELS_FILE": str(registry),
                "HF_HUB_OFFLINE": "1",
            }
            stack.enter_context(dreamq_worker(env, "worker"))
        key, _ = ApiKeyStore(redis_proc.client()).create("direct")
        api = stack.enter_context(TestClient(create_app(settings)))
        publisher = api.app.state.publisher  # type: ignore[attr-defined]
        assert isinstance(publisher, RedisPublisher)
        # The job Redis's create step pushes the message; a broker of its own gets a publish.
        assert (publisher.message_for_create(0) is None) == own_broker
        yield api, key, broker


@pytest.mark.parametrize("own_broker", [False, True], ids=["job-redis", "own-broker"])
def test_jobs_published_directly_run_on_a_real_worker(
    own_broker: bool, redis_proc: RedisServer, demo_registry_file: Path, tmp_path: Path
) -> None:
    events = JobEvents(redis_proc.client())
    with direct_stack(
        redis_proc, demo_registry_file, tmp_path, own_broker=own_broker, worker=True
    ) as (api, key, _):
        answers = [api.post("/api/v4/dreambooth", json={"key": key, **BODY}) for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200] * 3
        for job_id in (answer.json()["id"] for answer in answers):
            assert events.wait_for(job_id) == "success"
            fetched = api.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": key}).json()
            assert fetched["status"] == "success"
            assert len(fetched["output"]) == 1
    events.close()


def test_a_broker_gone_answers_503_and_fails_the_job(
    redis_proc: RedisServer, demo_registry_file: Path, tmp_path: Path
) -> None:
    with direct_stack(redis_proc, demo_registry_file, tmp_path, own_broker=True, worker=False) as (
        api,
        key,
        broker,
    ):
        assert broker is not None
        accepted = api.post("/api/v4/dreambooth", json={"key": key, **BODY})
        assert accepted.status_code == 200  # the publisher's connection is open, then:
        broker.kill()
        answer = api.post("/api/v4/dreambooth", json={"key": key, **BODY})
    assert answer.status_code == 503
    assert answer.json()["message"] == "The queue is unavailable, try again later."
    client = redis_proc.client()
    job_id = int(client.get(keys.JOB_SEQ) or 0)  # the record the create step wrote
    assert job_id == accepted.json()["id"] + 1
    job = JobStore(client, ttl_seconds=60).get(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert job.error == "The queue is unavailable; the job was not started."
