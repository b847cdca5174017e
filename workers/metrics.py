"""Prometheus metrics of a worker (`dreamq worker`) or dispatcher (`dreamq dispatcher`).

The work happens in pool processes (prefork) or pool threads, but Prometheus scrapes one port
per worker: its Celery main process serves DREAMQ_METRICS_PORT and aggregates the pool with
prometheus_client's multiprocess mode. `MetricsServer.prepare` (main process, on `worker_init`,
before the pool forks) makes a private directory and names it in PROMETHEUS_MULTIPROC_DIR, so
every pool process writes its values to files there; a scrape reads them all. Counters and
histograms of a pool process that died stay counted; its live gauges (GPU memory) are dropped
(`process_gone`). The directory is removed when the worker exits.

`WorkerMetrics` is what the runner, the pipeline cache and the dispatcher record through; it
never imports torch itself (the dispatcher has none), `gpu_memory` takes the module from its
caller.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("dreamq.worker")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

JOB_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, float("inf"))
LOAD_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, float("inf"))


class WorkerMetrics:
    """The metrics a pool process (or pool thread) records. Not registered anywhere by default:
    in a worker the multiprocess files carry them to the main process's endpoint; a test passes
    a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.job_duration = Histogram(
            "dreamq_job_duration_seconds",
            "Wall time of a job run, from its claim to its terminal state.",
            ["model_id", "kind", "status"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )
        self.jobs_finished = Counter(
            "dreamq_jobs_finished",
            "Job runs that reached a terminal state.",
            ["model_id", "kind", "status"],
            registry=registry,
        )
        self.model_load = Histogram(
            "dreamq_model_load_seconds",
            "Time to load a model's pipeline into a worker process.",
            ["model_id"],
            buckets=LOAD_SECONDS_BUCKETS,
            registry=registry,
        )
        self.model_loads = Counter(
            "dreamq_model_loads", "Model loads.", ["model_id"], registry=registry
        )
        self.pipeline_cache = Counter(
            "dreamq_pipeline_cache",
            "Pipeline cache lookups: hit (loaded already) or miss (loads it).",
            ["result"],
            registry=registry,
        )
        self.webhook_attempts = Counter(
            "dreamq_webhook_attempts",
            "Webhook delivery attempts by outcome: delivered, retry, failed, refused, timeout.",
            ["outcome"],
            registry=registry,
        )
        self.gpu_memory = Gauge(
            "dreamq_gpu_memory_bytes",
            "CUDA memory of the worker's processes (torch's allocator): allocated or reserved.",
            ["device", "kind"],
            registry=registry,
            # Summed over the live pool processes; a dead process's value is dropped.
            multiprocess_mode="livesum",
        )

    def job_finished(self, model_id: str, kind: str, status: str, seconds: float) -> None:
        self.job_duration.labels(model_id, kind, status).observe(seconds)
        self.jobs_finished.labels(model_id, kind, status).inc()

    def model_loaded(self, model_id: str, seconds: float) -> None:
        self.model_load.labels(model_id).observe(seconds)
        self.model_loads.labels(model_id).inc()

    def cache_lookup(self, hit: bool) -> None:
        self.pipeline_cache.labels("hit" if hit else "miss").inc()

    def webhook_attempt(self, outcome: str) -> None:
        self.webhook_attempts.labels(outcome).inc()

    def sample_gpu_memory(self, torch: Any, device: str) -> None:
        """Allocated and reserved CUDA memory of `device` in this process. Only the device the
        process works on: asking about another would create a CUDA context there."""
        if not device.startswith("cuda") or not torch.cuda.is_available():
            return
        index = torch.cuda.current_device() if device == "cuda" else int(device.split(":")[1])
        label = f"cuda:{index}"
        self.gpu_memory.labels(label, "allocated").set(torch.cuda.memory_allocated(index))
        self.gpu_memory.labels(label, "reserved").set(torch.cuda.memory_reserved(index))


class MetricsServer:
    """The main process's side: the multiprocess directory and the endpoint that reads it."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.directory: str | None = None
        self._server: Any = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Before the pool forks: a private directory, named in the environment the pool
        processes inherit, and multiprocess values for every metric created from now on
        (prometheus_client chooses its value class when it is imported, maybe earlier)."""
        self.directory = tempfile.mkdtemp(prefix="dreamq-metrics-")
        os.environ[MULTIPROC_ENV] = self.directory
        values.ValueClass = values.MultiProcessValue()

    def start(self) -> None:
        """Serve the aggregated metrics. A port in use costs the metrics, not the worker."""
        if self.directory is None:
            raise RuntimeError("prepare() first")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        try:
            self._server, _ = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:
            log.warning(
                "metrics: cannot serve on port %s (%s); this worker runs without metrics",
                self.port,
                exc,
            )
            return
        log.info("metrics on http://%s:%s/metrics", self.host, self.port)

    def process_gone(self, pids: list[int]) -> None:
        """Pool processes that exited: drop their live gauges."""
        if self.directory is None:
            return
        for pid in pids:
            mark_process_dead(pid, self.directory)

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
