"""A job moves the metrics: a real `dreamq worker` (prefork, JSON logs, metrics on a free port)
runs one job submitted through the API; then the worker's /metrics (its main process adding up
its pool process) and the API's /metrics (the fleet read from Redis) say so, and the worker's
log lines for the job are JSON objects that carry the job."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.processes import Deadline, JobEvents, RedisServer, free_port
from tests.support.profile import QUICK, ProfileFactory
from tests.unit.test_metrics import Samples, parse, value

pytestmark = pytest.mark.integration


def scrape_until(url: str, test: Callable[[Samples], bool], timeout: float = 15) -> Samples:
    """Scrape until `test` holds: the counters move just after the job's terminal event."""
    deadline = Deadline(timeout)
    samples: Samples = {}
    with httpx.Client(timeout=5) as client:
        while not deadline.passed():
            try:
                samples = parse(client.get(url).text)
            except httpx.TransportError:
                continue
            if test(samples):
                return samples
    raise TimeoutError(f"{url}: never matched; last scrape {sorted(samples)[:20]}")


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # Celery's startup banner is printed, not logged
        if isinstance(entry, dict):
            found.append(entry)
    return found


def test_a_job_moves_the_metrics(profile_factory: ProfileFactory, redis_proc: RedisServer) -> None:
    redis_proc.client().flushall()  # the fleet gauges count the whole Redis
    port = free_port()
    profile = profile_factory(metrics_port=port, log_format="json")
    events = JobEvents(redis_proc.client())
    url = f"http://127.0.0.1:{port}/metrics"
    job = {"model_id": "demo", "kind": "txt2img", "status": "success"}
    with profile.worker("--concurrency", "1") as worker:
        job_id = profile.submit(**QUICK)
        assert events.wait_for(job_id, timeout=60) == "success"
        samples = scrape_until(url, lambda s: value(s, "dreamq_jobs_finished_total", **job) == 1)
        assert value(samples, "dreamq_job_duration_seconds_count", **job) == 1
        duration = value(samples, "dreamq_job_duration_seconds_sum", **job)
        assert duration is not None and duration > 0
        assert value(samples, "dreamq_model_loads_total", model_id="demo") == 1
        assert value(samples, "dreamq_model_load_seconds_count", model_id="demo") == 1
        assert value(samples, "dreamq_pipeline_cache_total", result="miss") == 1

        fleet = parse(profile.api.get("/metrics").text)
        queue = profile.settings.generate_queue
        assert value(fleet, "dreamq_queue_depth", queue=queue) == 0
        assert value(fleet, "dreamq_jobs", state="queued") == 0
        assert value(fleet, "dreamq_jobs", state="processing") == 0
        ages = {
            dict(labels)["worker"]: age
            for (name, labels), age in fleet.items()
            if name == "dreamq_worker_heartbeat_age_seconds"
        }
        assert len(ages) == 1 and 0 <= next(iter(ages.values())) < 30
        submits = value(
            fleet,
            "dreamq_http_requests_total",
            route="/api/v4/dreambooth",
            method="POST",
            status="200",
        )
        assert submits == 1

        entries = json_lines(worker.lines)
        assert entries, worker.tail()
        mine = [entry for entry in entries if entry.get("job_id") == job_id]
        messages = [entry["message"] for entry in mine]
        assert any("processing" in message for message in messages), messages
        assert any("success" in message for message in messages), messages
        assert all(entry["model_id"] == "demo" for entry in mine)
        assert all(entry["key_name"] == "reliability" for entry in mine)
        assert all(profile.key not in line for line in worker.lines)
