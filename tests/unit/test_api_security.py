"""Hostile-input and many-tenant properties of the API (R20 body cap, R21 keys in logs and error
bodies, R22 isolation, R24 presigned links), with fakes; the real-process checks are in
tests/integration/test_security_stack.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest

from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStatus
from storage.objects import S3_CLIENT_CONFIG, S3ObjectStore
from tests.unit.test_api import Api, build, txt2img


@pytest.fixture
def api() -> Iterator[Api]:
    with build() as api:
        yield api


# --- R20: request bodies over the cap get 413, before they are read -----------------------------


def test_a_declared_length_over_the_cap_gets_413() -> None:
    with build(max_body_bytes=2048) as api:
        response = txt2img(api, prompt="x" * 4096)
        assert response.status_code == 413
        assert response.json() == {
            "status": "error",
            "message": "Request body too large",
            "messege": "Request body too large",
        }
        assert api.publisher.jobs == []
        # Just under the cap is served as usual.
        assert txt2img(api, prompt="x" * 1500).status_code == 200


def test_a_chunked_body_is_counted_as_it_arrives() -> None:
    with build(max_body_bytes=2048) as api:
        sent: list[int] = []

        def chunks() -> Iterator[bytes]:
            yield b'{"key": "' + api.key.encode() + b'", "model_id": "demo", "prompt": "'
            for _ in range(64):
                sent.append(1)
                yield b"x" * 512
            yield b'"}'

        response = api.client.post(
            "/api/v4/dreambooth", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers  # really chunked
        assert response.status_code == 413
        assert api.publisher.jobs == []


def test_413_keeps_the_legacy_http_200_mode() -> None:
    with build(max_body_bytes=1024, legacy_http_200=True) as api:
        response = txt2img(api, prompt="x" * 4096)
    assert response.status_code == 200
    assert response.json()["message"] == "Request body too large"


def test_the_default_cap_fits_two_base64_inputs_at_the_input_cap() -> None:
    settings = Settings(input_max_bytes=3 * 1024 * 1024)
    assert settings.body_limit >= 2 * (4 * 1024 * 1024) + 64 * 1024
    assert Settings(max_body_bytes=5000).body_limit == 5000


# --- R21: the key never appears in an answer or a log line -------------------------------------


def test_invalid_unknown_revoked_and_malformed_keys_answer_byte_identically(api: Api) -> None:
    revoked_key, info = ApiKeyStore(api.raw).create("gone")
    assert ApiKeyStore(api.raw).revoke(info.id)
    answers = {
        candidate: txt2img(api, key=candidate)
        for candidate in ("dq_" + "A" * 43, revoked_key, "not-a-key", "", "dq_" + "é" * 10)
    }
    bodies = {response.content for response in answers.values()}
    statuses = {response.status_code for response in answers.values()}
    assert len(bodies) == 1 and statuses == {401}
    assert api.publisher.jobs == []


def test_the_key_is_never_echoed_nor_logged(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = api.key
    answers = [
        txt2img(api, width=key),  # a wrong type in a field
        txt2img(api, model_id="nope"),
        txt2img(api, lora_model=key),  # the key pasted into an id field
        txt2img(api, webhook=key),
        txt2img(api),
        api.client.post("/api/v4/dreambooth/fetch", json={"key": key, "request_id": key}),
        api.client.post("/api/v4/dreambooth/fetch/999", json={"key": key}),
        api.client.post("/api/v4/dreambooth/model_reload", json={"key": key, "model_id": key}),
    ]
    for response in answers:
        assert key not in response.text
    assert answers[0].status_code == 400 and answers[4].status_code == 200
    logged = "\n".join(record.getMessage() + str(record.args) for record in caplog.records)
    assert logged  # something was logged at all, so the check below means something
    assert key not in logged
    assert key.split("_", 1)[1][:12] not in logged


# --- R22: another key's id answers exactly like an unknown id ----------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v4/dreambooth/fetch/{id}",
        "/api/v3/dreambooth/fetch/{id}",
        "/api/v6/images/fetch/{id}",
        "/api/v4/dreambooth/fetch",
        "/api/v6/images/fetch",
    ],
)
@pytest.mark.parametrize("state", ["queued", "success", "failed"])
def test_another_keys_job_is_indistinguishable_from_an_unknown_one(
    api: Api, path: str, state: str
) -> None:
    job_id = txt2img(api).json()["id"]
    if state == "success":
        api.jobs.transition(job_id, JobStatus.PROCESSING)
        api.jobs.transition(job_id, JobStatus.SUCCESS, output=["https://cdn.example.com/x.png"])
    elif state == "failed":
        api.jobs.fail(job_id, "boom")
    unknown_id = job_id + 1000

    def ask(key: str, target: int) -> httpx.Response:
        body: dict[str, Any] = {"key": key}
        if "{id}" not in path:
            body["request_id"] = target
        response: httpx.Response = api.client.post(path.format(id=target), json=body)
        return response

    theirs, unknown = ask(api.other_key, job_id), ask(api.other_key, unknown_id)
    assert (theirs.status_code, theirs.content) == (unknown.status_code, unknown.content)
    assert theirs.status_code == 404
    assert ask(api.key, job_id).status_code == 200  # the owner still sees it


# --- R24: a private bucket's links are presigned when given out --------------------------------


def presigning_store() -> S3ObjectStore:
    # Presigning is local: this client never connects anywhere.
    client = boto3.client(
        "s3",
        endpoint_url="http://s3.internal.example:9000",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        region_name="us-east-1",
        config=S3_CLIENT_CONFIG,
    )
    return S3ObjectStore(
        "outputs",
        "dq",
        client=client,
        public_base="http://s3.internal.example:9000/outputs",
        presign_seconds=600,
    )


@pytest.fixture
def private_api() -> Iterator[Api]:
    with build(objects=presigning_store()) as api:
        yield api


def expires(link: str) -> int:
    return int(httpx.URL(link).params["X-Amz-Expires"])


def test_private_bucket_links_are_presigned_at_submission_and_fetch(private_api: Api) -> None:
    api = private_api
    answer = txt2img(api, samples=2).json()
    job_id = answer["id"]
    promised = answer["future_links"]
    assert len(promised) == 2 and all(expires(link) == 600 for link in promised)
    stored = api.jobs.get(job_id)
    assert stored is not None
    # The record keeps the canonical links: a signature is made for each answer, not stored.
    assert all("X-Amz-" not in link for link in stored.future_links)
    assert [link.split("?")[0] for link in promised] == stored.future_links

    api.jobs.transition(job_id, JobStatus.PROCESSING)
    api.jobs.transition(job_id, JobStatus.SUCCESS, output=stored.future_links)
    fetched = api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": api.key}).json()
    assert fetched["status"] == "success"
    assert [link.split("?")[0] for link in fetched["output"]] == stored.future_links
    assert all(expires(link) == 600 for link in fetched["output"])


def test_private_bucket_temp_links_live_at_most_a_day() -> None:
    store = presigning_store()
    long_lived = S3ObjectStore(
        "outputs",
        "dq",
        client=boto3.client(
            "s3",
            aws_access_key_id="AKIDEXAMPLE",
            aws_secret_access_key="secret",
            region_name="us-east-1",
            config=S3_CLIENT_CONFIG,
        ),
        public_base="https://outputs.s3.amazonaws.com",
        presign_seconds=7 * 24 * 3600,
    )
    assert expires(long_lived.present(long_lived.url("temp/generations/a-0.png"))) == 24 * 3600
    assert expires(long_lived.present(long_lived.url("generations/a-0.png"))) == 7 * 24 * 3600
    assert expires(store.present(store.url("temp/generations/a-0.png"))) == 600
