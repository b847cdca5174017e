"""The HTTP API with fakes: fakeredis, an in-memory object store, a recording publisher."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient

from api.app import Overrides, create_app
from dreamq.jobparams import ImageInput, JobParams, LoraChoice
from dreamq.queue import RecordingPublisher
from dreamq.registry import (
    EmbeddingEntry,
    HelperEntry,
    LoraEntry,
    ModelEntry,
    Registry,
    VaeEntry,
)
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
    objects: MemoryObjectStore


HELPER = HelperEntry(source="/models/helper")
REGISTRY = Registry(
    models={
        "demo": ModelEntry(source="/models/demo"),
        "xl": ModelEntry(source="/models/xl", family="sdxl"),
        "clip": ModelEntry(source="/models/clip", kind="text2video"),
        "fill": ModelEntry(source="/models/fill", kind="inpaint"),
    },
    loras={"a": LoraEntry(source="/l/a"), "b": LoraEntry(source="/l/b")},
    embeddings={"e": EmbeddingEntry(source="/e/e.safetensors")},
    vaes={"v": VaeEntry(source="/v/v")},
    safety_checker=HELPER,
    upscaler=HELPER,
    translator=HELPER,
)


@contextmanager
def build(registry: Registry | None = None, **settings: Any) -> Iterator[Api]:
    objects = MemoryObjectStore("https://cdn.example.com")
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    publisher = RecordingPublisher()
    app = create_app(
        Settings(public_url="https://api.example.com", **settings),
        Overrides(
            redis_client=fakeredis.aioredis.FakeRedis(server=server),
            registry=registry or REGISTRY,
            objects=objects,
            publisher=publisher,
        ),
    )
    store = ApiKeyStore(sync)
    key, _ = store.create("a")
    other_key, _ = store.create("b")
    with TestClient(app) as client:
        yield Api(client, publisher, JobStore(sync, ttl_seconds=60), key, other_key, sync, objects)


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


def test_models_of_another_kind_are_refused_by_name(api: Api) -> None:
    for path, model_id in (
        ("/api/v4/dreambooth", "clip"),
        ("/api/v4/dreambooth/text2video", "demo"),
        ("/api/v4/dreambooth/img2img", "fill"),
    ):
        body = {"key": api.key, "model_id": model_id, "prompt": "x", "init_image": IMAGE_URL}
        response = api.client.post(path, json=body)
        assert response.status_code == 400, path
        assert list(response.json()["message"]) == ["model_id"], path
    assert api.publisher.jobs == []


def test_validation_errors_name_each_field_and_never_echo_the_key(api: Api) -> None:
    response = api.client.post(
        "/api/v4/dreambooth",
        json={"key": api.key, "model_id": "demo", "width": "wide", "samples": 9, "clip_skip": 0},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "error"
    assert body["message"] == body["messege"]
    assert body["message"] == {
        "prompt": ["The prompt field is required."],
        "width": ["The width must be a number."],
        "samples": ["The samples must be between 1 and 4."],
        "clip_skip": ["The clip skip must be between 1 and 8."],
    }
    assert api.key not in response.text
    assert api.publisher.jobs == []


def test_unknown_registry_ids_are_refused_naming_each_field(api: Api) -> None:
    response = txt2img(api, lora_model="a,nope", embeddings_model="nope", vae="nope")
    assert response.status_code == 400
    assert response.json()["message"] == {
        "lora_model": ["The LoRA nope is not available."],
        "embeddings_model": ["The embedding nope is not available."],
        "vae": ["The VAE nope is not available."],
    }
    assert api.publisher.jobs == []


def test_unknown_registry_ids_are_named_beside_other_field_errors(api: Api) -> None:
    fields = {"width": "wide", "lora_model": "a, nope,none", "vae": "none"}
    assert txt2img(api, **fields).json()["message"] == {
        "width": ["The width must be a number."],
        "lora_model": ["The LoRA nope is not available."],
    }
    # Not for an unknown key: the registry is not a stranger's business.
    anonymous = api.client.post("/api/v4/dreambooth", json={"key": "dq_x", "prompt": "p", **fields})
    assert set(anonymous.json()["message"]) == {"width", "model_id"}


@pytest.mark.parametrize(
    ("field", "value", "helper"),
    [
        ("safety_checker", "yes", "safety checker model"),
        ("upscale", "yes", "upscaler model"),
        ("multi_lingual", "yes", "translation model"),
    ],
)
def test_features_without_their_helper_model_are_refused_naming_both(
    field: str, value: str, helper: str
) -> None:
    bare = REGISTRY.model_copy(
        update={"safety_checker": None, "upscaler": None, "translator": None}
    )
    with build(bare) as api:
        response = txt2img(api, **{field: value})
        assert response.status_code == 400
        message = response.json()["message"][field][0]
        assert helper in message and "configured" in message
        assert api.publisher.jobs == []
        # A value that asks for nothing is accepted without the helper.
        assert txt2img(api, **{field: "no"}).status_code == 200


def test_lora_choices_and_flags_reach_the_job(api: Api) -> None:
    body = txt2img(
        api,
        lora_model="a,b",
        lora_strength="0.6,0.4",
        embeddings_model="e",
        vae="v",
        clip_skip=2,
        upscale="3",
        safety_checker="yes",
        safety_checker_type="blur",
        multi_lingual="yes",
        tomesd="yes",
    ).json()
    meta = body["meta"]
    assert (meta["lora"], meta["lora_strength"]) == ("a,b", "0.6,0.4")
    assert (meta["embeddings"], meta["vae"], meta["clip_skip"], meta["upscale"]) == (
        "e",
        "v",
        2,
        "3",
    )
    job = api.jobs.get(body["id"])
    assert job is not None and job.kind == "txt2img"
    params = JobParams.from_dict(job.params)
    assert params.loras == (LoraChoice("a", 0.6), LoraChoice("b", 0.4))
    assert (params.embedding, params.vae, params.clip_skip, params.upscale) == ("e", "v", 2, 3)
    assert (params.safety_checker, params.safety_checker_type) == (True, "blur")
    assert params.multi_lingual and params.tomesd
    one_strength = JobParams.from_dict(
        api.jobs.get(txt2img(api, lora_model="a,b", lora_strength=0.5).json()["id"]).params  # type: ignore[union-attr]
    )
    assert [lora.strength for lora in one_strength.loras] == [0.5, 0.5]


def test_enhance_prompt_appends_the_suffix_and_negative(api: Api) -> None:
    meta = txt2img(api, enhance_prompt="yes").json()["meta"]
    assert meta["prompt"].startswith("a fox, ") and len(meta["prompt"]) > len("a fox, ")
    assert meta["negative_prompt"]
    assert meta["enhance_prompt"] == "yes"


def test_temp_links_live_under_the_temp_prefix(api: Api) -> None:
    links = txt2img(api, temp="yes", samples=2).json()["future_links"]
    assert all(link.startswith("https://cdn.example.com/temp/generations/") for link in links)


IMAGE_URL = "https://images.example.com/init.png"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/img2img", "/api/v6/images/img2img"])
def test_img2img_with_a_url_takes_its_size_at_run_time(api: Api, path: str) -> None:
    body = {"key": api.key, "model_id": "demo", "prompt": "x", "init_image": IMAGE_URL}
    answer = api.client.post(path, json=body).json()
    assert answer["status"] == "processing"
    assert (answer["meta"]["W"], answer["meta"]["H"]) == (None, None)
    assert answer["meta"]["strength"] == 0.7
    assert answer["meta"]["init_image"] == IMAGE_URL
    job = api.jobs.get(answer["id"])
    assert job is not None and job.kind == "img2img"
    params = JobParams.from_dict(job.params)
    assert params.init_image == ImageInput(url=IMAGE_URL)
    assert (params.width, params.height) == (None, None)


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({"init_image": base64.b64encode(PNG_BYTES).decode(), "base64": "yes"}, True),
        ({"init_image": "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()}, True),
    ],
)
def test_base64_inputs_go_to_the_object_store(
    api: Api, fields: dict[str, Any], stored: bool
) -> None:
    body = {"key": api.key, "model_id": "demo", "prompt": "x", **fields}
    answer = api.client.post("/api/v4/dreambooth/img2img", json=body).json()
    assert answer["meta"]["init_image"] == "base64"
    job = api.jobs.get(answer["id"])
    assert job is not None
    ref = JobParams.from_dict(job.params).init_image
    assert ref is not None and ref.object_key is not None
    assert api.objects.get(ref.object_key) == PNG_BYTES
    # Not under the public file_prefix: an output link must not lead to the client's input.
    assert answer["meta"]["file_prefix"] not in ref.object_key
    assert "base64" not in json.dumps(job.params["init_image"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("aGVsbG8=", 'The init image must be an http(s) URL, or base64 data with "base64": "yes".'),
        ("data:image/png;base64,@@@", "The init image is not valid base64."),
        ("data:image/png;base64,aGVsbG8=", "The init image is not a PNG, JPEG or WEBP image."),
        ("data:image/png,xyz", "The init image must be base64 data (a data: URL with ;base64)."),
    ],
)
def test_bad_base64_inputs_are_refused_naming_the_field(api: Api, value: str, message: str) -> None:
    body = {"key": api.key, "model_id": "demo", "prompt": "x", "init_image": value}
    response = api.client.post("/api/v4/dreambooth/img2img", json=body)
    assert response.status_code == 400
    assert response.json()["message"] == {"init_image": [message]}
    assert api.publisher.jobs == []


def test_base64_inputs_over_the_cap_are_refused() -> None:
    with build(input_max_bytes=1024 * 1024) as api:
        big = base64.b64encode(PNG_BYTES + b"\x00" * 2 * 1024 * 1024).decode()
        body = {"key": api.key, "model_id": "demo", "prompt": "x", "init_image": big,
                "base64": "yes"}  # fmt: skip
        response = api.client.post("/api/v4/dreambooth/img2img", json=body)
        assert response.json()["message"] == {"init_image": ["The init image is larger than 1 MB."]}


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/inpaint", "/api/v6/images/inpaint"])
def test_inpaint_takes_a_mask_and_the_steps_alias(api: Api, path: str) -> None:
    body = {"key": api.key, "model_id": "demo", "prompt": "x", "init_image": IMAGE_URL,
            "mask_image": IMAGE_URL + "?mask", "steps": 12}  # fmt: skip
    answer = api.client.post(path, json=body).json()
    assert answer["meta"]["steps"] == 12
    job = api.jobs.get(answer["id"])
    assert job is not None and job.kind == "inpaint"
    assert JobParams.from_dict(job.params).mask_image == ImageInput(url=IMAGE_URL + "?mask")
    on_fill = api.client.post(path, json={**body, "model_id": "fill"})
    assert on_fill.json()["status"] == "processing"


@pytest.mark.parametrize(
    ("fields", "frames", "extension"),
    [({}, 16, "mp4"), ({"seconds": 2, "fps": 4, "output_type": "gif"}, 8, "gif")],
)
@pytest.mark.parametrize("path", ["/api/v4/dreambooth/text2video", "/api/v6/video/text2video"])
def test_text2video_promises_one_video(
    api: Api, path: str, fields: dict[str, Any], frames: int, extension: str
) -> None:
    body = {"key": api.key, "model_id": "clip", "prompt": "x", **fields}
    answer = api.client.post(path, json=body).json()
    assert len(answer["future_links"]) == 1
    assert answer["future_links"][0].endswith(f"-0.{extension}")
    assert answer["meta"]["num_frames"] == frames
    job = api.jobs.get(answer["id"])
    assert job is not None and job.kind == "text2video"


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/model_reload", "/api/v6/images/model_reload"])
def test_model_reload_asks_the_workers_and_answers_the_contract(api: Api, path: str) -> None:
    pubsub = api.raw.pubsub()
    pubsub.subscribe(keys.CONTROL)
    pubsub.get_message(timeout=1)
    api.raw.hset(keys.model_stats("demo"), "load_seconds", "4.25")
    response = api.client.post(path, json={"key": api.key, "model_id": "demo"})
    assert response.json() == {"status": "success", "message": "model reload started", "eta": 4.25}
    message = pubsub.get_message(timeout=1)
    assert message is not None and message["data"] == b"warm demo"
    unknown = api.client.post(path, json={"key": api.key, "model_id": "nope"})
    assert unknown.json()["message"] == "Model id not found"
    assert api.client.post(path, json={"key": "dq_bad", "model_id": "demo"}).status_code == 401


def test_model_list(api: Api) -> None:
    items = api.client.post("/api/v4/dreambooth/model_list", json={"key": api.key}).json()
    assert [item["model_id"] for item in items] == ["demo", "xl", "clip", "fill"]
    assert items[1]["model_category"] == "stable_diffusion_xl"
    assert all(item["status"] == "model_ready" for item in items)


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
