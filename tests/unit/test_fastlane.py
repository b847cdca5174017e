"""api/fastlane.py: the direct lane answers exactly as FastAPI does.

Two apps, one with the lane and one without, each on its own fake Redis in the same state, get
the same requests in the same order; every answer must match (status, JSON body, the headers a
client reads). The lane must also have answered the well-formed ones itself, or the comparison
would only compare FastAPI with itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import Overrides, create_app
from api.errors import REDIS_DOWN
from api.fastlane import FastLane
from dreamq.queue import AsyncRecordingPublisher
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStatus, JobStore
from storage.objects import MemoryObjectStore
from tests.unit.test_api import REGISTRY

KEY = "dq_fastlane-test-key-one"
OTHER = "dq_fastlane-test-key-two"
PLANS = {
    "tight": {"requests_per_minute": 1, "burst": 3},
    "capped": {"max_queued": 2},
    "unlimited": {},
}

RANDOM = object()
"""Stands for a value drawn at random per request (file prefixes, links holding them)."""


@dataclass
class Side:
    client: TestClient
    jobs: JobStore
    lane: FastLane | None
    redis: fakeredis.FakeServer


def _lane_of(app: FastAPI) -> FastLane | None:
    layer: Any = app.middleware_stack
    while layer is not None:
        if isinstance(layer, FastLane):
            return layer
        layer = getattr(layer, "app", None)
    return None


@dataclass
class Twins:
    lane: Side
    plain: Side

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        """Both apps answer; the answers must match. Returns the lane's."""
        if body is not None:
            kwargs["content"] = body if isinstance(body, bytes) else json.dumps(body).encode()
            kwargs.setdefault("headers", {"content-type": "application/json"})
        ours = self.lane.client.post(path, **kwargs)
        theirs = self.plain.client.post(path, **kwargs)
        mine, other = _masked(ours), _masked(theirs)
        if isinstance(mine, dict) and isinstance(other, dict) and "eta" in mine and "eta" in other:
            # A waiting job's eta counts down: the second app answers a few ms later.
            assert abs(mine["eta"] - other["eta"]) <= 0.1, path
            other["eta"] = mine["eta"]
        assert (ours.status_code, mine) == (theirs.status_code, other), path
        for header in ("content-type", "retry-after"):
            assert ours.headers.get(header) == theirs.headers.get(header), header
        return ours

    @property
    def served(self) -> int:
        assert self.lane.lane is not None
        return self.lane.lane.served


def _masked(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.content
    if isinstance(body, dict):
        meta = body.get("meta")
        if isinstance(meta, dict) and "file_prefix" in meta:
            meta["file_prefix"] = RANDOM
        if body.get("future_links"):
            body["future_links"] = RANDOM
    return body


def _side(fast_lane: bool, **settings: Any) -> Iterator[Side]:
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    app = create_app(
        Settings(public_url="https://api.example.com", **settings),
        Overrides(
            redis_client=fakeredis.aioredis.FakeRedis(server=server),
            registry=REGISTRY,
            objects=MemoryObjectStore("https://cdn.example.com"),
            publisher=AsyncRecordingPublisher(),
            fast_lane=fast_lane,
        ),
    )
    keys = ApiKeyStore(sync)
    keys.register(KEY, "one", plan=settings.get("default_plan"))
    keys.register(OTHER, "two")
    # An unhandled error is answered 500 instead of raised here: both apps are compared on it.
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Side(client, JobStore(sync, ttl_seconds=60), _lane_of(app), server)


def _twins(**settings: Any) -> Iterator[Twins]:
    lane, plain = _side(True, **settings), _side(False, **settings)
    with_lane, without = next(lane), next(plain)
    assert with_lane.lane is not None and without.lane is None
    yield Twins(with_lane, without)
    for side in (lane, plain):
        next(side, None)


@pytest.fixture
def twins() -> Iterator[Twins]:
    yield from _twins()


SUBMIT = {"key": KEY, "model_id": "demo", "prompt": "a fox", "seed": 7, "width": 64, "height": 64}


def test_a_submission_and_its_fetches_are_answered_alike_and_by_the_lane(twins: Twins) -> None:
    accepted = twins.post("/api/v4/dreambooth", SUBMIT).json()
    job_id = accepted["id"]
    assert accepted["status"] == "processing"
    twins.post("/api/v6/images/text2img", {**SUBMIT, "samples": 2, "track_id": "t"})
    for path in (
        f"/api/v4/dreambooth/fetch/{job_id}",
        f"/api/v3/dreambooth/fetch/{job_id}",
        f"/api/v6/images/fetch/{job_id + 1}",
        f"/api/v4/dreambooth/fetch/00{job_id}",  # pydantic reads it as the same id
    ):
        assert twins.post(path, {"key": KEY}).json()["status"] == "processing"
    assert twins.served == 6
    # Running, then done: the fetch bodies follow the record.
    for side in (twins.lane, twins.plain):
        assert side.jobs.claim(job_id) is not None
    twins.post(f"/api/v4/dreambooth/fetch/{job_id}", {"key": KEY})
    for side in (twins.lane, twins.plain):
        side.jobs.succeed(job_id, output=["generations/x-0.png"], generation_time=1.5)
    done = twins.post(f"/api/v4/dreambooth/fetch/{job_id}", {"key": KEY}).json()
    assert done["status"] == "success"
    assert twins.served == 8


def test_refusals_from_the_service_are_answered_alike_by_the_lane(twins: Twins) -> None:
    job_id = twins.post("/api/v4/dreambooth", SUBMIT).json()["id"]
    served = twins.served
    answers = [
        twins.post("/api/v4/dreambooth", {**SUBMIT, "key": "dq_unknown"}),  # 401
        twins.post("/api/v4/dreambooth", {**SUBMIT, "model_id": "nope"}),  # unknown model
        twins.post("/api/v4/dreambooth", {**SUBMIT, "lora_model": "zzz"}),  # unknown LoRA
        twins.post("/api/v4/dreambooth", {**SUBMIT, "webhook": "http://10.0.0.1/x"}),  # SSRF
        twins.post(f"/api/v4/dreambooth/fetch/{job_id}", {"key": OTHER}),  # another key's
        twins.post(f"/api/v4/dreambooth/fetch/{job_id + 99}", {"key": KEY}),  # unknown
        twins.post(f"/api/v4/dreambooth/fetch/{job_id}", {}),  # no key
    ]
    assert [answer.status_code for answer in answers] == [401, 400, 400, 400, 404, 404, 401]
    assert twins.served == served + len(answers)


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/api/v4/dreambooth", {**SUBMIT, "width": "wide"}, None),  # invalid field
        ("/api/v4/dreambooth", {"key": KEY}, None),  # required fields missing
        ("/api/v4/dreambooth", b"{not json", None),
        ("/api/v4/dreambooth", b"", None),
        ("/api/v4/dreambooth", b"[1, 2]", None),  # not an object
        ("/api/v4/dreambooth", b"[" * 100_000 + b"]" * 100_000, None),  # too deep to parse
        ("/api/v4/dreambooth", SUBMIT, {"content-type": "text/plain"}),
        ("/api/v4/dreambooth", SUBMIT, {"content-type": "application/vnd.x+json"}),
        ("/api/v4/dreambooth", SUBMIT, {}),  # no content type
        ("/api/v4/dreambooth/fetch/abc", {"key": KEY}, None),
        ("/api/v4/dreambooth/fetch/-1", {"key": KEY}, None),
        ("/api/v4/dreambooth/fetch/" + "9" * 30, {"key": KEY}, None),
        ("/api/v4/dreambooth/fetch/1", b"{not json", None),
    ],
)
def test_what_the_lane_leaves_to_fastapi_is_answered_alike(
    twins: Twins, path: str, body: Any, headers: dict[str, str] | None
) -> None:
    twins.post("/api/v4/dreambooth", SUBMIT)
    served = twins.served
    kwargs: dict[str, Any] = {"content": body if isinstance(body, bytes) else json.dumps(body)}
    if headers is not None:
        kwargs["headers"] = headers
    else:
        kwargs["headers"] = {"content-type": "application/json"}
    answer = twins.post(path, **kwargs)
    assert answer.status_code < 500  # refused, not failed
    assert twins.served == served


def test_a_charset_in_the_content_type_still_takes_the_lane(twins: Twins) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    answer = twins.post("/api/v4/dreambooth", json.dumps(SUBMIT).encode(), headers=headers)
    assert answer.status_code == 200
    assert twins.served == 1


@pytest.mark.parametrize("plan", ["tight", "capped"])
def test_rate_and_cap_refusals_keep_their_retry_after(plan: str) -> None:
    for twins in _twins(plans=PLANS, default_plan=plan):
        answers = [twins.post("/api/v4/dreambooth", {**SUBMIT, "seed": i}) for i in range(4)]
        limit = 3 if plan == "tight" else 2
        assert [a.status_code for a in answers] == [200] * limit + [429] * (4 - limit)
        assert answers[-1].headers["retry-after"]
        assert twins.served == 4


@pytest.mark.parametrize("legacy", [False, True])
def test_body_cap_and_legacy_status_are_kept(legacy: bool) -> None:
    for twins in _twins(max_body_bytes=300, legacy_http_200=legacy):
        big = {**SUBMIT, "prompt": "x" * 400}
        declared = twins.post("/api/v4/dreambooth", big)
        data = json.dumps(big).encode()
        chunked = [
            side.client.post(
                "/api/v4/dreambooth",
                content=iter([data[:200], data[200:]]),  # no length: counted as it arrives
                headers={"content-type": "application/json"},
            )
            for side in (twins.lane, twins.plain)
        ]
        assert _masked(chunked[0]) == _masked(chunked[1])
        refused = twins.post("/api/v4/dreambooth/fetch/1", {"key": KEY})
        codes = {declared.status_code, *(answer.status_code for answer in chunked)}
        assert codes == {200 if legacy else 413}
        assert refused.status_code == (200 if legacy else 404)
        assert refused.json()["status"] == "error"


def test_the_metrics_label_lane_answers_with_the_route_template(twins: Twins) -> None:
    job_id = twins.post("/api/v4/dreambooth", SUBMIT).json()["id"]
    twins.post(f"/api/v4/dreambooth/fetch/{job_id}", {"key": KEY})
    assert twins.served == 2
    metrics = twins.lane.client.get("/metrics").text
    for route in ("/api/v4/dreambooth", "/api/v4/dreambooth/fetch/{id}"):
        assert f'route="{route}",status="200"' in metrics.replace('method="POST",', "")


def test_a_job_the_lane_accepted_is_queued_like_any(twins: Twins) -> None:
    job_id = twins.post("/api/v4/dreambooth", SUBMIT).json()["id"]
    job = twins.lane.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.QUEUED
    assert job.params == twins.plain.jobs.get(job_id).params  # type: ignore[union-attr]


def test_redis_gone_is_the_same_503_both_ways(twins: Twins) -> None:
    """Redis gone mid-request: the app's handler for it answers the lane's error as the
    route's."""
    job_id = twins.post("/api/v4/dreambooth", SUBMIT).json()["id"]
    for side in (twins.lane, twins.plain):
        side.redis.connected = False
    answers = [
        twins.post("/api/v4/dreambooth", SUBMIT),
        twins.post(f"/api/v4/dreambooth/fetch/{job_id}", {"key": KEY}),
    ]
    assert [answer.status_code for answer in answers] == [503, 503]
    assert answers[0].json()["message"] == REDIS_DOWN


def test_an_unexpected_error_is_the_server_error_answer_both_ways(
    twins: Twins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No handler of the app's own but the catch-all, which the server error middleware
    applies to the lane's error as to the route's."""

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    for side in (twins.lane, twins.plain):
        service = side.client.app.state.service  # type: ignore[attr-defined]
        monkeypatch.setattr(service, "fetch", broken)
        monkeypatch.setattr(service, "submit", broken)
    answers = [
        twins.post("/api/v4/dreambooth", SUBMIT),
        twins.post("/api/v4/dreambooth/fetch/1", {"key": KEY}),
    ]
    assert [answer.status_code for answer in answers] == [500, 500]
    assert answers[0].json()["message"] == "Internal server error"
