"""The API's Prometheus metrics, served at `GET /metrics` on its own port.

- Requests and latencies, labelled by route TEMPLATE (`/api/v4/dreambooth/fetch/{id}`), never by
  the raw path, so a client cannot grow the series; a path no route knows is `other`.
- The fleet as Redis sees it, read at scrape time (`FleetReader`, a collector of its own): queue
  depth per broker queue (Redis broker; nothing for AMQP), queued and processing jobs, and each
  worker's heartbeat age.

Each app has its own registry (no process-wide state): tests build many apps. Under `uvicorn
--workers N` every process counts its own requests; Prometheus sums what it scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dreamq import lanes, logs
from storage import keys
from storage.jobs import AsyncJobStore, JobStatus
from storage.workers import WorkerRecord

OTHER_ROUTE = "other"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))

# kombu's Redis transport keeps a queue in one list per priority step: `queue`, then
# `queue\x06\x163`, ... (dreamq publishes its priority levels there, dreamq/lanes.py).
_KOMBU_PRIORITY_SUFFIXES = tuple(lanes.list_name("", level) for level in range(lanes.LEVELS))


class HttpMetrics:
    """Counts requests and times them, by route template, method and status (pure ASGI: sees
    every answer, a 413 from the body cap and an unhandled error's 500 included). Each request
    also starts with no bound log fields."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        logs.clear()
        method = scope["method"]
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(scope)
            self.requests.labels(route, method, str(status)).inc()
            self.latency.labels(route, method).observe(time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The path template of the route that served the request (the router notes it in the
    scope; for a 405, the route that knows the path), or `other`: no route matched, or the
    request was answered before routing (a 413 on its declared length)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else OTHER_ROUTE


@dataclass
class FleetSnapshot:
    queue_depth: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    heartbeat_age: dict[str, float] = field(default_factory=dict)


class FleetReader:
    """Reads what the fleet gauges need from Redis: one pipeline (the queue lengths when the
    broker is the job Redis, the job counts, the worker index), then the worker records.

    `broker`: the broker's Redis when it is another one (its lengths cost a second round trip);
    None with `redis_broker` False for an AMQP broker (no queue depth)."""

    def __init__(
        self,
        client: aioredis.Redis,
        jobs: AsyncJobStore,
        queues: list[str],
        *,
        redis_broker: bool,
        broker: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r = client
        self._jobs = jobs
        self._queues = queues
        self._redis_broker = redis_broker
        self._broker = broker
        self._clock = clock

    async def read(self) -> FleetSnapshot:
        snapshot = FleetSnapshot()
        same_redis = self._redis_broker and self._broker is None
        pipe = self._r.pipeline(transaction=False)
        if same_redis:
            self._queue_lengths(pipe)
        pipe.zrange(keys.WORKER_INDEX, 0, -1)
        replies = await pipe.execute()
        names = [_text(name) for name in replies[-1]]
        counts = await self._jobs.active_counts()
        snapshot.jobs = {JobStatus.QUEUED.value: counts[JobStatus.QUEUED],
                         JobStatus.PROCESSING.value: counts[JobStatus.PROCESSING]}  # fmt: skip
        if same_redis:
            snapshot.queue_depth = self._depths(replies[:-1])
        elif self._broker is not None:
            broker_pipe = self._broker.pipeline(transaction=False)
            self._queue_lengths(broker_pipe)
            snapshot.queue_depth = self._depths(await broker_pipe.execute())
        if names:
            raws = await self._r.mget([keys.worker(name) for name in names])
            now = self._clock()
            for raw in raws:
                if raw is not None:  # an expired record: the worker is long gone
                    record = WorkerRecord.from_json(raw)
                    snapshot.heartbeat_age[record.name] = max(0.0, now - record.heartbeat_at)
        return snapshot

    def _queue_lengths(self, pipe: aioredis.client.Pipeline) -> None:
        for queue in self._queues:
            for suffix in _KOMBU_PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)

    def _depths(self, lengths: list[int]) -> dict[str, int]:
        step = len(_KOMBU_PRIORITY_SUFFIXES)
        return {
            queue: sum(int(n) for n in lengths[i * step : (i + 1) * step])
            for i, queue in enumerate(self._queues)
        }


def fleet_families(snapshot: FleetSnapshot) -> list[Metric]:
    depth = GaugeMetricFamily(
        "dreamq_queue_depth",
        "Messages waiting in the broker's queue (Redis broker).",
        labels=["queue"],
    )
    for queue, count in snapshot.queue_depth.items():
        depth.add_metric([queue], count)
    jobs = GaugeMetricFamily(
        "dreamq_jobs", "Unfinished jobs by state, from the job records.", labels=["state"]
    )
    for state, count in snapshot.jobs.items():
        jobs.add_metric([state], count)
    age = GaugeMetricFamily(
        "dreamq_worker_heartbeat_age_seconds",
        "Seconds since each worker's last heartbeat (its liveness record).",
        labels=["worker"],
    )
    for worker, seconds in sorted(snapshot.heartbeat_age.items()):
        age.add_metric([worker], seconds)
    return [depth, jobs, age]


class _Exposition(Collector):
    """What one scrape renders: the request metrics and the fleet gauges just read."""

    def __init__(self, registry: CollectorRegistry, extra: list[Metric]) -> None:
        self._registry = registry
        self._extra = extra

    def collect(self) -> Iterable[Metric]:
        yield from self._registry.collect()
        yield from self._extra


class ApiMetrics:
    """The API's registry, its middleware's metrics and the /metrics route."""

    def __init__(self, fleet: FleetReader) -> None:
        self.registry = CollectorRegistry()
        self.fleet = fleet
        self.requests = Counter(
            "dreamq_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dreamq_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def install(self, app: FastAPI) -> None:
        app.add_middleware(HttpMetrics, requests=self.requests, latency=self.latency)

        @app.get("/metrics", include_in_schema=False)
        async def metrics(request: Request) -> Response:
            """Prometheus text format: requests, latencies and the fleet as Redis sees it."""
            try:
                extra = fleet_families(await self.fleet.read())
            except Exception:
                # Redis down: the request metrics still answer; the gauges are absent (/ready
                # says why).
                extra = []
            body = generate_latest(_Exposition(self.registry, extra))
            return Response(body, media_type=CONTENT_TYPE_LATEST)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
