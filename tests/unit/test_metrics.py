"""The API's /metrics (route templates, the fleet collector), /ready, and the worker metrics."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from api.app import Overrides, create_app
from api.metrics import FleetReader, FleetSnapshot
from dreamq.queue import AsyncRecordingPublisher
from dreamq.settings import Settings
from storage.jobs import AsyncJobStore, JobStore
from storage.objects import MemoryObjectStore
from storage.workers import WorkerRecord, WorkerStore
from tests.support.jobs import new_job
from tests.support.processes import free_port
from tests.unit.test_api import REGISTRY, build, txt2img
from workers.metrics import WorkerMetrics
from workers.webhooks import webhook_outcome

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_requests_are_labelled_by_route_template_never_the_raw_path() -> None:
    with build() as api:
        assert txt2img(api).status_code == 200
        for job_id in (7, 8, 9):
            api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": "dq_nope"})
        api.client.post("/api/v3/dreambooth/fetch/7", json={"key": api.key})
        api.client.get("/api/v4/dreambooth/fetch/7")  # 405: the route knows the path
        api.client.get("/wp-admin/../etc/passwd")
        api.client.get("/health")
        samples = scrape(api.client)
    requests = "dreamq_http_requests_total"
    fetch = "/api/v4/dreambooth/fetch/{id}"
    assert value(samples, requests, route="/api/v4/dreambooth", method="POST", status="200") == 1
    assert value(samples, requests, route=fetch, method="POST", status="401") == 3
    assert value(samples, requests, route=fetch, method="GET", status="405") == 1
    v3 = "/api/v3/dreambooth/fetch/{id}"
    assert value(samples, requests, route=v3, method="POST", status="404") == 1
    assert value(samples, requests, route="other", method="GET", status="404") == 1
    assert value(samples, requests, route="/health", method="GET", status="200") == 1
    routes = {dict(labels).get("route") for (_, labels) in samples}
    assert not any(route and ("/7" in route or "passwd" in route) for route in routes)
    duration = "dreamq_http_request_duration_seconds_count"
    assert value(samples, duration, route=fetch, method="POST") == 3


def test_metrics_route_is_not_in_the_openapi_document() -> None:
    with build() as api:
        assert "/metrics" not in api.client.get("/openapi.json").json()["paths"]


def test_a_body_over_the_cap_is_counted() -> None:
    with build(max_body_bytes=100) as api:
        assert txt2img(api, prompt="x" * 500).status_code == 413
        samples = scrape(api.client)
    # Refused on its declared length, before routing: no route served it.
    labels = {"route": "other", "method": "POST", "status": "413"}
    assert value(samples, "dreamq_http_requests_total", **labels) == 1


def test_fleet_gauges_from_redis() -> None:
    with build() as api:
        jobs = JobStore(api.raw, ttl_seconds=60)
        queued = [jobs.create(new_job(owner="k1")) for _ in range(3)]
        assert jobs.claim(queued[0]) is not None  # processing
        finished = jobs.create(new_job(owner="k1"))
        jobs.claim(finished)
        jobs.succeed(finished, output=[], generation_time=1.0, meta={})
        # kombu's Redis lists: the queue itself and its priority lists.
        api.raw.lpush("generate", "m1", "m2")
        api.raw.lpush("generate\x06\x166", "m3")
        record = WorkerRecord(
            name="generate-1@gpu-1",
            role="generate",
            host="gpu-1",
            pid=1,
            queues=["generate"],
            concurrency=1,
            pool_pids=[],
            started_at=time.time() - 60,
            heartbeat_at=time.time() - 5,
            heartbeat_seconds=10,
        )
        WorkerStore(api.raw).beat(record, serving=True)
        samples = scrape(api.client)
    assert value(samples, "dreamq_queue_depth", queue="generate") == 3
    assert value(samples, "dreamq_queue_depth", queue="webhooks") == 0
    assert value(samples, "dreamq_jobs", state="queued") == 2
    assert value(samples, "dreamq_jobs", state="processing") == 1
    age = value(samples, "dreamq_worker_heartbeat_age_seconds", worker="generate-1@gpu-1")
    assert age is not None and 5 <= age < 60


def test_fleet_reader_with_another_broker_and_without_one() -> None:
    server, broker_server = fakeredis.FakeServer(), fakeredis.FakeServer()
    client = fakeredis.aioredis.FakeRedis(server=server)
    broker = fakeredis.aioredis.FakeRedis(server=broker_server)
    fakeredis.FakeRedis(server=broker_server).lpush("webhooks", "m")
    # An expired worker record (index entry left behind) is not shown.
    fakeredis.FakeRedis(server=server).zadd("dreamq:workers:all", {"gone@x": 1.0})
    jobs = AsyncJobStore(client, ttl_seconds=60)

    def read(redis_broker: bool, broker: aioredis.Redis | None = None) -> FleetSnapshot:
        queues = ["generate", "webhooks"]
        reader = FleetReader(client, jobs, queues, redis_broker=redis_broker, broker=broker)
        return asyncio.run(reader.read())

    other = read(True, broker)
    assert other.queue_depth == {"generate": 0, "webhooks": 1}
    assert other.heartbeat_age == {}
    amqp = read(False)
    assert amqp.queue_depth == {}
    assert amqp.jobs == {"queued": 0, "processing": 0}


def test_ready_checks_redis_and_the_broker() -> None:
    with build() as api:
        answer = api.client.get("/ready")
        assert (answer.status_code, answer.json()) == (
            200,
            {"status": "ok", "redis": "up", "broker": "up"},
        )
        assert api.client.get("/health").json() == {"status": "ok"}
    closed = free_port()
    for broker_url in (f"redis://127.0.0.1:{closed}/0", f"amqp://guest:guest@127.0.0.1:{closed}//"):
        with build(broker_url=broker_url) as api:
            answer = api.client.get("/ready")
            assert answer.status_code == 503
            assert answer.json() == {"status": "unavailable", "redis": "up", "broker": "down"}


def test_ready_names_redis_down() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        Settings(redis_url=url),
        Overrides(
            registry=REGISTRY,
            objects=MemoryObjectStore("https://cdn.example.com"),
            publisher=AsyncRecordingPublisher(),
        ),
    )
    with TestClient(app) as client:
        answer = client.get("/ready")
        assert answer.status_code == 503
        assert answer.json() == {"status": "unavailable", "redis": "down", "broker": "down"}
        # Without Redis the fleet gauges are absent; the request metrics still answer.
        samples = scrape(client)
    assert value(samples, "dreamq_jobs", state="queued") is None
    labels = {"route": "/ready", "method": "GET", "status": "503"}
    assert value(samples, "dreamq_http_requests_total", **labels) == 1


def test_worker_metrics_names_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.job_finished("demo", "txt2img", "success", 1.5)
    metrics.model_loaded("demo", 3.0)
    metrics.cache_lookup(False)
    metrics.cache_lookup(True)
    metrics.webhook_attempt("delivered")

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    job = {"model_id": "demo", "kind": "txt2img", "status": "success"}
    assert get("dreamq_jobs_finished_total", **job) == 1
    assert get("dreamq_job_duration_seconds_count", **job) == 1
    assert get("dreamq_job_duration_seconds_sum", **job) == 1.5
    assert get("dreamq_model_loads_total", model_id="demo") == 1
    assert get("dreamq_model_load_seconds_count", model_id="demo") == 1
    assert get("dreamq_pipeline_cache_total", result="hit") == 1
    assert get("dreamq_pipeline_cache_total", result="miss") == 1
    assert get("dreamq_webhook_attempts_total", outcome="delivered") == 1


class _NoCuda:
    class cuda:  # torch's module layout
        @staticmethod
        def is_available() -> bool:
            return False


def test_gpu_memory_only_with_cuda() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.sample_gpu_memory(_NoCuda, "cuda:0")
    metrics.sample_gpu_memory(_NoCuda, "cpu")
    assert not [
        s for f in registry.collect() if f.name == "dreamq_gpu_memory_bytes" for s in f.samples
    ]


@pytest.mark.parametrize(
    ("code", "error", "will_retry", "outcome"),
    [
        (200, None, False, "delivered"),
        (204, None, False, "delivered"),
        (None, "refused: a private address", False, "refused"),
        (None, "refused: the URL is not valid", False, "refused"),
        (None, "timeout", True, "timeout"),
        (500, None, True, "retry"),
        (None, "ConnectError", True, "retry"),
        (500, None, False, "failed"),
        (410, None, False, "failed"),
    ],
)
def test_webhook_outcomes(
    code: int | None, error: str | None, will_retry: bool, outcome: str
) -> None:
    assert webhook_outcome(code, error, will_retry) == outcome
