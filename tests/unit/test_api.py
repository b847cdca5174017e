"""The HTTP API with fakes: fakeredis, an in-memory object store, a recording publisher."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient

from api.app import Overrides, create_app
from dreamq.queue import RecordingPublisher
from dreamq.registry import ModelEntry, Registry
from dreamq.settings import Settings
from storage import keys
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStatus, JobStore
from storage.objects import MemoryObjectStore


@dataclass
class Api:
    client: TestClient
    publisher: RecordingPublisher
    jobs: JobStore
    key: str
    other_key: str
    raw: fakeredis.FakeRedis


@contextmanager
def build(**settings: Any) -> Iterator[Api]:
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    publisher = RecordingPublisher()
    app = create_app(
        Settings(public_url="https://api.example.com", **settings),
        Overrides(
            redis_client=fakeredis.aioredis.FakeRedis(server=server),
            registry=Registry(
                models={
                    "demo": ModelEntry(source="/models/demo"),
                    "xl": ModelEntry(source="/models/xl", family="sdxl"),
                    "clip": ModelEntry(source="/models/clip", kind="text2video"),
                }
            ),
            objects=MemoryObjectStore("https://cdn.example.com"),
            publisher=publisher,
        ),
    )
    store = ApiKeyStore(sync)
    key, _ = store.create("a")
    other_key, _ = store.create("b")
    with TestClient(app) as client:
        yield Api(client, publisher, JobStore(sync, ttl_seconds=60), key, other_key, sync)


@pytest.fixture
def api() -> Iterator[Api]:
    with build() as api:
        yield api


def txt2img(api: Api, **fields: Any) -> Any:
    body = {"key": api.key, "model_id": "demo", "prompt": "a fox", **fields}
    return api.client.post("/api/v4/dreambooth", json=body)


def test_accepts_and_answers_processing_at_once(api: Api) -> None:
    response = txt2img(api, width="256", height=128, samples="2", seed="42", track_id=9)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "processing"
    assert body["messege"] == body["message"] == "Try to fetch request after seconds estimated"
    assert body["output"] == []
    assert body["fetch_result"] == f"https://api.example.com/api/v4/dreambooth/fetch/{body['id']}"
    prefix = body["meta"]["file_prefix"]
    assert body["future_links"] == [
        f"https://cdn.example.com/generations/{prefix}-0.png",
        f"https://cdn.example.com/generations/{prefix}-1.png",
    ]
    assert (body["meta"]["W"], body["meta"]["H"], body["meta"]["seed"]) == (256, 128, 42)
    assert body["eta"] > 0
    # Persist, then publish: the record exists and is queued, and the id went to the broker.
    assert api.publisher.jobs == [body["id"]]
    job = api.jobs.get(body["id"])
    assert job is not None and job.status is JobStatus.QUEUED
    assert job.track_id == 9
    assert job.params["samples"] == 2


def test_defaults_and_steps_cap() -> None:
    with build(max_steps=20) as api:
        body = txt2img(api, num_inference_steps="50").json()
    meta = body["meta"]
    assert (meta["W"], meta["H"], meta["n_samples"], meta["guidance_scale"]) == (512, 512, 1, 7.5)
    assert meta["steps"] == 20
    assert 0 <= meta["seed"] < 2**32


def test_ids_are_sequential_integers(api: Api) -> None:
    first = txt2img(api).json()["id"]
    second = txt2img(api).json()["id"]
    assert second == first + 1


def test_eta_grows_with_the_queue(api: Api) -> None:
    etas = [txt2img(api).json()["eta"] for _ in range(3)]
    assert etas[0] < etas[1] < etas[2]


def test_invalid_keys_get_one_identical_answer(api: Api) -> None:
    answers = [
        api.client.post("/api/v4/dreambooth", json={"model_id": "demo", "prompt": "x", "key": k})
        for k in ("dq_unknown", "not-a-key", None, 12345)
    ]
    assert {a.status_code for a in answers} == {401}
    assert all(a.json() == answers[0].json() for a in answers)
    assert answers[0].json()["message"] == "Invalid Api Key"
    assert api.publisher.jobs == []


def test_unknown_model(api: Api) -> None:
    response = txt2img(api, model_id="nope")
    assert response.status_code == 400
    assert response.json()["message"] == "Model id not found"


def test_models_the_deployment_cannot_run_for_text2img_are_refused_by_name(api: Api) -> None:
    for model_id, message in (
        ("xl", "sdxl models are not served by this deployment yet."),
        ("clip", "The model is a text2video model."),
    ):
        response = txt2img(api, model_id=model_id)
        assert response.status_code == 400
        assert response.json()["message"] == {"model_id": [message]}
    assert api.publisher.jobs == []


def test_validation_errors_name_each_field_and_never_echo_the_key(api: Api) -> None:
    response = api.client.post(
        "/api/v4/dreambooth",
        json={"key": api.key, "model_id": "demo", "width": "wide", "samples": 9, "lora_model": "x"},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "error"
    assert body["message"] == body["messege"]
    assert body["message"] == {
        "prompt": ["The prompt field is required."],
        "width": ["The width must be a number."],
        "samples": ["The samples must be between 1 and 4."],
        "lora_model": ["The lora model field is not served by this deployment yet."],
    }
    assert api.key not in response.text
    assert api.publisher.jobs == []


def test_bad_json_body(api: Api) -> None:
    response = api.client.post(
        "/api/v4/dreambooth", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["message"] == {"body": ["The request body is not valid JSON."]}


def test_fetch_processing_then_success(api: Api) -> None:
    job_id = txt2img(api).json()["id"]
    for path in (f"/api/v4/dreambooth/fetch/{job_id}", f"/api/v3/dreambooth/fetch/{job_id}"):
        body = api.client.post(path, json={"key": api.key}).json()
        assert body["status"] == "processing"
        assert body["output"] == ""
        assert body["messege"] == body["message"] == "try again later."
        assert body["eta"] >= 0
    api.jobs.claim(job_id)
    api.jobs.succeed(job_id, output=["https://cdn.example.com/x.png"], generation_time=1.5)
    body = api.client.post(
        "/api/v4/dreambooth/fetch", json={"key": api.key, "request_id": str(job_id)}
    ).json()
    assert body["status"] == "success"
    assert body["output"] == ["https://cdn.example.com/x.png"]
    assert body["generationTime"] == 1.5


def test_another_keys_job_answers_like_an_unknown_one(api: Api) -> None:
    job_id = txt2img(api).json()["id"]
    theirs = api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": api.other_key})
    unknown = api.client.post("/api/v4/dreambooth/fetch/999999", json={"key": api.other_key})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()


def test_publish_failure_fails_the_job_and_answers_503(api: Api) -> None:
    api.publisher.fail_with = ConnectionError("broker down")
    response = txt2img(api)
    assert response.status_code == 503
    assert "broker" not in response.text
    job_id = int(api.raw.get(keys.JOB_SEQ) or 0)
    job = api.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.FAILED


def test_legacy_http_200_mode() -> None:
    with build(legacy_http_200=True) as api:
        response = txt2img(api, model_id="nope")
    assert response.status_code == 200
    assert response.json()["status"] == "error"


def test_openapi_documents_the_contract(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert "/api/v4/dreambooth" in schema["paths"]
    assert "/api/v3/dreambooth/fetch/{id}" in schema["paths"]
    assert api.client.get("/docs").status_code == 200


def test_health_and_ready(api: Api) -> None:
    assert api.client.get("/health").json() == {"status": "ok"}
    assert api.client.get("/ready").status_code == 200
