"""RabbitMQ as the Celery broker (DREAMQ_BROKER_URL=amqp://...), for fleets that outgrow one
Redis: job records stay in Redis, messages go through the RabbitMQ on this machine."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu import Connection

from api.app import create_app
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from tests.support.processes import JobEvents, RedisServer, dreamq_worker

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_listening() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def rabbit_stack(
    redis_proc: RedisServer, demo_registry_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, str, str]]:
    if not _rabbitmq_listening():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (the project machine runs one)")
    # Queues of this test alone: the machine's RabbitMQ is shared with whatever else runs.
    suffix = uuid.uuid4().hex[:8]
    queues = {
        "DREAMQ_GENERATE_QUEUE": f"generate-{suffix}",
        "DREAMQ_WEBHOOK_QUEUE": f"hooks-{suffix}",
    }
    outputs = tmp_path_factory.mktemp("outputs")
    env = {
        "DREAMQ_REDIS_URL": redis_proc.url,
        "DREAMQ_BROKER_URL": AMQP_URL,
        "DREAMQ_STORAGE_URL": f"file://{outputs}",
        "DREAMQ_MODELS_FILE": str(demo_registry_file),
        "HF_HUB_OFFLINE": "1",
        **queues,
    }
    settings = Settings(
        redis_url=redis_proc.url,
        broker_url=AMQP_URL,
        storage_url=f"file://{outputs}",
        models_file=demo_registry_file,
        generate_queue=queues["DREAMQ_GENERATE_QUEUE"],
        webhook_queue=queues["DREAMQ_WEBHOOK_QUEUE"],
    )
    key, _ = ApiKeyStore(redis_proc.client()).create("rabbit")
    try:
        with dreamq_worker(env, "worker"), TestClient(create_app(settings)) as api:
            yield api, key, queues["DREAMQ_GENERATE_QUEUE"]
    finally:
        with Connection(AMQP_URL) as connection:
            channel = connection.default_channel
            for queue in queues.values():
                channel.queue_delete(queue)


def test_a_job_runs_through_rabbitmq(
    rabbit_stack: tuple[TestClient, str, str], redis_proc: RedisServer
) -> None:
    api, key, queue = rabbit_stack
    events = JobEvents(redis_proc.client())
    body = {"key": key, "model_id": "demo", "prompt": "a fox", "width": 64, "height": 64,
            "num_inference_steps": 2, "seed": 3}  # fmt: skip
    answer = api.post("/api/v4/dreambooth", json=body).json()
    assert answer["status"] == "processing", answer
    assert events.wait_for(answer["id"]) == "success"
    done = api.post(f"/api/v4/dreambooth/fetch/{answer['id']}", json={"key": key}).json()
    assert done["status"] == "success"
    assert len(done["output"]) == 1
    events.close()
    # The message went through RabbitMQ: the queue lives there (a passive declare fails for a
    # queue that does not exist), and no Redis broker binding names it.
    with Connection(AMQP_URL) as connection:
        connection.default_channel.queue_declare(queue, passive=True)
    client = redis_proc.client()
    bindings = [m for k in client.scan_iter("_kombu.binding.*") for m in client.smembers(k)]
    assert not [member for member in bindings if queue.encode() in member]
