"""Priority lanes and fair sharing end to end: the real API publishes each job at its level, a
real `dreamq worker` (kombu's Redis transport) takes them in that order.

Every job is submitted before the worker starts, so the order the worker claims them in is the
broker's order alone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from storage import keys
from storage.apikeys import ApiKeyStore
from storage.jobs import JobRecord, JobStatus, JobStore
from tests.support.processes import JobEvents
from tests.support.profile import QUICK, ProfileFactory

pytestmark = pytest.mark.integration

PLANS = {"gold": {"priority": "high"}, "unlimited": {}}


def test_a_flooding_key_waits_behind_the_others_and_a_high_lane_goes_first(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory(fair_backlog=2, plans=json.dumps(PLANS))
    client = redis.Redis.from_url(profile.redis.url)
    store = ApiKeyStore(client, plans=profile.settings.plans)
    other, _ = store.create("other")
    gold, _ = store.create("gold", plan="gold")

    def submit(key: str) -> dict[str, Any]:
        body = {"key": key, "model_id": "demo", "prompt": "a fox", **QUICK}
        response = profile.api.post("/api/v4/dreambooth", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    flood = [submit(profile.key) for _ in range(5)]  # levels 1, 1, then 2, 2, 2
    fresh = submit(other)  # level 1: behind the flooder's first two only
    first = submit(gold)  # level 0: ahead of everything
    jobs = JobStore(client, ttl_seconds=60)
    levels = [jobs_level(jobs, answer["id"]) for answer in [*flood, fresh, first]]
    assert levels == [1, 1, 2, 2, 2, 1, 0]

    def position(answer: dict[str, Any], key: str) -> int:
        url = f"/api/v4/dreambooth/fetch/{answer['id']}"
        found: int = profile.api.post(url, json={"key": key}).json()["queue_position"]
        return found

    assert position(first, gold) == 1
    assert position(fresh, other) == 4
    assert [position(answer, profile.key) for answer in flood] == [2, 3, 5, 6, 7]
    # The estimate counts only the work of the same or an earlier level.
    assert first["eta"] < fresh["eta"] < flood[-1]["eta"]

    events = JobEvents(client)
    with profile.worker("--concurrency", "1"):
        records = wait_all(jobs, events, [answer["id"] for answer in [*flood, fresh, first]])
    claimed = sorted(records, key=lambda record: record.started_at or 0.0)
    order = [record.id for record in claimed]
    assert order == [first["id"], flood[0]["id"], flood[1]["id"], fresh["id"]] + [
        answer["id"] for answer in flood[2:]
    ]
    assert client.zcard(keys.QUEUED_JOBS) == 0


def jobs_level(jobs: JobStore, job_id: int) -> int:
    record = jobs.get(job_id)
    assert record is not None
    return record.level


def wait_all(jobs: JobStore, events: JobEvents, ids: list[int]) -> list[JobRecord]:
    records = []
    for job_id in ids:
        assert events.wait_for(job_id, timeout=120) == "success"
        record = jobs.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCESS
        records.append(record)
    return records
