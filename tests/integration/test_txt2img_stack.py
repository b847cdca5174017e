"""Text to image through the real stack: API -> Redis -> Celery worker -> diffusers -> S3 -> fetch
and webhook."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def submit(stack: Stack, **fields: Any) -> dict[str, Any]:
    body = {
        "key": stack.key,
        "model_id": "demo",
        "prompt": "a red fox in the snow",
        "width": "64",
        "height": "64",
        "num_inference_steps": "2",
        **fields,
    }
    response = stack.api.post("/api/v4/dreambooth", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def fetch(stack: Stack, job_id: int, key: str | None = None) -> httpx.Response:
    return stack.api.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": key or stack.key})


def png(url: str) -> Image.Image:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, url
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def pixels(url: str) -> bytes:
    return png(url).convert("RGB").tobytes()


def max_difference(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_submit_run_fetch_and_webhook(stack: Stack) -> None:
    events = stack.events()
    answer = submit(
        stack,
        samples="2",
        seed=1234,
        webhook=stack.receiver.url,
        track_id="order-77",
        negative_prompt="blurry",
    )
    assert answer["status"] == "processing"
    job_id = answer["id"]
    assert isinstance(job_id, int)
    assert answer["eta"] > 0
    assert answer["messege"] == answer["message"]
    assert answer["fetch_result"] == f"http://testserver/api/v4/dreambooth/fetch/{job_id}"
    links = answer["future_links"]
    assert len(links) == 2
    assert all(link.startswith(f"{stack.s3.endpoint_url}/dreamq-outputs/dq/generations/")
               for link in links)  # fmt: skip
    meta = answer["meta"]
    assert (meta["W"], meta["H"], meta["steps"], meta["n_samples"], meta["seed"]) == (
        64, 64, 2, 2, 1234,
    )  # fmt: skip
    assert meta["negative_prompt"] == "blurry"
    assert all(meta["file_prefix"] in link for link in links)

    assert events.wait_for(job_id) == "success"
    done = fetch(stack, job_id).json()
    assert done["status"] == "success"
    assert done["output"] == links
    assert done["generationTime"] > 0
    assert done["meta"] == meta
    for link in links:
        assert png(link).size == (64, 64)

    hook = stack.receiver.next()
    body = hook.json()
    assert body["track_id"] == "order-77"
    assert body["status"] == "success"
    assert body["id"] == job_id
    assert body["output"] == links
    assert hook.headers["content-type"] == "application/json"
    assert hook.headers["webhook-id"]

    assert events.wait_for(job_id, "webhook_sent") == "webhook_sent"
    assert fetch(stack, job_id).json()["webhook_status"] == "sent"
    events.close()


@pytest.mark.parametrize(
    "path",
    [
        "/api/v4/dreambooth/fetch/{id}",
        "/api/v3/dreambooth/fetch/{id}",
        "/api/v6/images/fetch/{id}",
    ],
)
def test_fetch_paths_and_isolation(stack: Stack, path: str) -> None:
    events = stack.events()
    job_id = submit(stack, seed=7)["id"]
    events.wait_for(job_id)
    mine = stack.api.post(path.format(id=job_id), json={"key": stack.key})
    assert mine.json()["status"] == "success"
    for fetch_path in ("/api/v4/dreambooth/fetch", "/api/v6/images/fetch"):
        by_body = stack.api.post(fetch_path, json={"key": stack.key, "request_id": job_id})
        assert by_body.json() == mine.json()

    theirs = stack.api.post(path.format(id=job_id), json={"key": stack.other_key})
    unknown = stack.api.post(path.format(id=10**9), json={"key": stack.other_key})
    assert (theirs.status_code, theirs.json()) == (unknown.status_code, unknown.json())
    assert theirs.status_code == 404
    events.close()


def test_sample_i_is_seeded_seed_plus_i(stack: Stack) -> None:
    events = stack.events()
    pair = submit(stack, samples=2, seed=4242)
    single = submit(stack, samples=1, seed=4243)
    again = submit(stack, samples=1, seed=4242)
    for answer in (pair, single, again):
        assert events.wait_for(answer["id"]) == "success"
    pair_images = [pixels(url) for url in pair["future_links"]]
    # Same starting noise; batched convolutions may round a few values one level differently.
    assert max_difference(pair_images[1], pixels(single["future_links"][0])) <= 1
    assert max_difference(pair_images[0], pixels(again["future_links"][0])) <= 1
    assert max_difference(pair_images[0], pair_images[1]) > 1
    events.close()


def test_scheduler_by_name_changes_the_image(stack: Stack) -> None:
    events = stack.events()
    default = submit(stack, seed=99)
    euler = submit(stack, seed=99, scheduler="Euler a")
    for answer in (default, euler):
        assert events.wait_for(answer["id"]) == "success"
    assert euler["meta"]["scheduler"] == "Euler a"
    assert png(default["future_links"][0]).tobytes() != png(euler["future_links"][0]).tobytes()
    events.close()


def test_failure_is_public_and_hooked(stack: Stack) -> None:
    events = stack.events()
    answer = submit(stack, model_id="broken", webhook=stack.receiver.url, track_id=5)
    job_id = answer["id"]
    assert events.wait_for(job_id) == "failed"
    failed = fetch(stack, job_id).json()
    assert failed["status"] == "failed"
    assert failed["output"] == ""
    assert "Traceback" not in failed["message"]
    assert failed["message"]
    hook = stack.receiver.next()
    assert hook.json()["status"] == "failed"
    assert hook.json()["track_id"] == 5
    events.close()


def test_model_loads_once_per_worker_process(stack: Stack) -> None:
    events = stack.events()
    for seed in (1, 2):
        assert events.wait_for(submit(stack, seed=seed)["id"]) == "success"
    assert stack.worker.count(r"model demo loaded in") == 1
    events.close()
