"""The HTTP API with fakes: fakeredis, an in-memory object store, a recording publisher."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from api.app import Overrides, create_app
from api.errors import REDIS_DOWN
from dreamq.jobparams import ImageInput, JobParams, LoraChoice
from dreamq.queue import AsyncRecordingPublisher
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
from storage.jobs import JobStatus, JobStore, WebhookStatus
from storage.objects import MemoryObjectStore, ObjectStore
from tests.support.processes import free_port


@dataclass
class Api:
    client: TestClient
    publisher: AsyncRecordingPublisher
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
def build(
    registry: Registry | None = None,
    *,
    limiter_clock: Callable[[], float] | None = None,
    limiter_client: aioredis.Redis | None = None,
    objects: ObjectStore | None = None,
    **settings: Any,
) -> Iterator[Api]:
    objects = objects or MemoryObjectStore("https://cdn.example.com")
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    publisher = AsyncRecordingPublisher()
    app = create_app(
        Settings(public_url="https://api.example.com", **settings),
        Overrides(
            redis_client=fakeredis.aioredis.FakeRedis(server=server),
            registry=registry or REGISTRY,
            objects=objects,
            publisher=publisher,
            limiter_client=limiter_client,
            limiter_clock=limiter_clock,
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
        "lora_model": ["The LoRA number 2 of 2 is not available."],
        "embeddings_model": ["The embedding is not available."],
        "vae": ["The VAE is not available."],
    }
    assert api.publisher.jobs == []


def test_unknown_registry_ids_are_named_beside_other_field_errors(api: Api) -> None:
    fields = {"width": "wide", "lora_model": "a, nope,none", "vae": "none"}
    assert txt2img(api, **fields).json()["message"] == {
        "width": ["The width must be a number."],
        "lora_model": ["The LoRA number 2 of 3 is not available."],
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


@pytest.mark.parametrize(
    ("field", "escaped"),
    [
        ("prompt", '"a \\ud800 fox"'),
        ("webhook", '"http://\\ud800.example.com/"'),
        ("lora_model", '"\\udfff"'),
        ("track_id", "1e400"),
        ("track_id", "NaN"),
    ],
)
def test_json_escapes_that_no_encoder_takes_are_refused_not_a_500(
    api: Api, field: str, escaped: str
) -> None:
    # Found fuzzing the API (R25): each of these answered 500 (a lone surrogate failed in
    # Redis' encoder or the response's UTF-8 body) or was accepted and stored as a track_id
    # the webhook body would carry as Infinity/NaN, which is not JSON.
    body = f'{{"key": "{api.key}", "model_id": "demo", "prompt": "x", "{field}": {escaped}}}'
    response = api.client.post(
        "/api/v4/dreambooth", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert list(response.json()["message"]) == [field]
    assert api.publisher.jobs == []


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


def test_fetch_of_a_waiting_job_gives_its_queue_position_and_the_work_ahead_now(api: Api) -> None:
    ids = [txt2img(api).json()["id"] for _ in range(3)]

    def fetch(job_id: int) -> dict[str, Any]:
        answer = api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": api.key})
        body: dict[str, Any] = answer.json()
        return body

    first, third = fetch(ids[0]), fetch(ids[2])
    assert (first["queue_position"], third["queue_position"]) == (1, 3)
    assert first["eta"] < third["eta"]
    api.jobs.claim(ids[0])  # a worker runs it: out of the queue, the others move up
    assert fetch(ids[0])["queue_position"] == 0
    assert fetch(ids[2])["queue_position"] == 2


def test_another_keys_job_answers_like_an_unknown_one(api: Api) -> None:
    job_id = txt2img(api).json()["id"]
    theirs = api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": api.other_key})
    unknown = api.client.post("/api/v4/dreambooth/fetch/999999", json={"key": api.other_key})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()


def test_publish_failure_fails_the_job_and_answers_503(api: Api) -> None:
    api.publisher.fail_with = ConnectionError("broker down")
    response = txt2img(api, webhook="https://hooks.example.com/x")
    assert response.status_code == 503
    assert "broker" not in response.text
    job_id = int(api.raw.get(keys.JOB_SEQ) or 0)
    job = api.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    # The client never learned the id: no "failed" webhook announces it later.
    assert job.webhook_status is WebhookStatus.NONE
    assert api.raw.zscore(keys.WEBHOOKS_PENDING, job_id) is None


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


# ---------------------------------------------------------------- limits and keys

PLANS = {
    "tight": {"requests_per_minute": 60, "burst": 2},
    "capped": {"max_queued": 2},
    "unlimited": {},
}


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key_id(api: Api, key: str) -> str:
    info = ApiKeyStore(api.raw).lookup(key)
    assert info is not None
    return info.id


def dead_redis() -> aioredis.Redis:
    return aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")


def test_a_key_over_its_rate_gets_429_with_retry_after_until_the_clock_moves() -> None:
    clock = Clock()
    with build(plans=PLANS, default_plan="tight", limiter_clock=clock) as api:
        assert [txt2img(api, seed=i).status_code for i in range(2)] == [200, 200]
        refused = txt2img(api, seed=3)
        # Another key has its own allowance.
        other = api.client.post(
            "/api/v4/dreambooth", json={"key": api.other_key, "model_id": "demo", "prompt": "x"}
        )
        clock.now += 1.0
        again = txt2img(api, seed=4)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    # [compat] the hosted API's body and text; clients match "limit exceeded".
    assert refused.json() == {
        "status": "error",
        "message": "Rate limit exceeded",
        "messege": "Rate limit exceeded",
    }
    assert other.status_code == 200
    assert again.status_code == 200
    assert len(api.publisher.jobs) == 4


def test_model_reload_counts_and_fetch_and_model_list_do_not() -> None:
    with build(plans=PLANS, default_plan="tight", limiter_clock=Clock()) as api:
        job_id = txt2img(api).json()["id"]
        reload = {"key": api.key, "model_id": "demo"}
        first = api.client.post("/api/v4/dreambooth/model_reload", json=reload)
        second = api.client.post("/api/v4/dreambooth/model_reload", json=reload)
        reads = [
            api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": api.key})
            for _ in range(5)
        ] + [
            api.client.post("/api/v4/dreambooth/model_list", json={"key": api.key})
            for _ in range(5)
        ]
    assert first.status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert {response.status_code for response in reads} == {200}


def test_a_request_is_counted_before_its_fields_are_checked() -> None:
    with build(plans=PLANS, default_plan="tight", limiter_clock=Clock()) as api:
        unknown = [txt2img(api, model_id="nope").status_code for _ in range(2)]
        valid = txt2img(api)
    assert unknown == [400, 400]
    assert valid.status_code == 429
    assert api.publisher.jobs == []


def test_legacy_mode_answers_200_and_still_sends_retry_after() -> None:
    with build(
        plans=PLANS, default_plan="tight", limiter_clock=Clock(), legacy_http_200=True
    ) as api:
        answers = [txt2img(api, seed=i) for i in range(3)]
    refused = answers[2]
    assert refused.status_code == 200
    assert refused.json()["status"] == "error"
    assert "limit exceeded" in refused.json()["message"]
    assert refused.headers["retry-after"] == "1"
    assert "retry-after" not in answers[0].headers


def test_the_queued_cap_holds_and_an_ended_job_frees_its_slot() -> None:
    with build(plans=PLANS) as api:
        ApiKeyStore(api.raw, plans=PLANS).set_plan(key_id(api, api.key), "capped")
        first, second = (txt2img(api, seed=i).json()["id"] for i in range(2))
        refused = txt2img(api, seed=3)
        other = api.client.post(
            "/api/v4/dreambooth", json={"key": api.other_key, "model_id": "demo", "prompt": "x"}
        )
        api.jobs.fail(first, "cancelled")
        after_fail = txt2img(api, seed=4)
        api.jobs.claim(second)
        assert api.jobs.succeed(second, output=["u"], generation_time=1.0)
        after_success = txt2img(api, seed=5)
        full_again = txt2img(api, seed=6)
    assert refused.status_code == 429
    message = refused.json()["message"]
    assert message == "Rate limit exceeded: 2 requests already queued or running for this key."
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 200  # the other key is on the default (unlimited) plan
    assert after_fail.status_code == 200
    assert after_success.status_code == 200
    assert full_again.status_code == 429
    assert len(api.publisher.jobs) == 5


def test_the_duplicate_filter_refuses_an_identical_request_within_the_window() -> None:
    clock = Clock()
    with build(duplicate_window_seconds=30, limiter_clock=clock) as api:
        first = txt2img(api, seed=1)
        clock.now += 0.5
        duplicate = txt2img(api, seed=1)
        different = txt2img(api, seed=2)
        other_endpoint = api.client.post(
            "/api/v4/dreambooth/text2video",
            json={"key": api.key, "model_id": "clip", "prompt": "a fox", "seed": 1},
        )
        other_key = api.client.post(
            "/api/v4/dreambooth",
            json={"key": api.other_key, "model_id": "demo", "prompt": "a fox", "seed": 1},
        )
        clock.now += 29.5
        after_window = txt2img(api, seed=1)
    assert first.status_code == 200
    assert duplicate.status_code == 429
    assert duplicate.headers["retry-after"] == "30"
    assert "limit exceeded" in duplicate.json()["message"]
    assert "identical request" in duplicate.json()["message"]
    assert [r.status_code for r in (different, other_endpoint, other_key, after_window)] == [
        200,
        200,
        200,
        200,
    ]


def test_the_duplicate_filter_is_off_by_default(api: Api) -> None:
    assert [txt2img(api, seed=1).status_code for _ in range(3)] == [200, 200, 200]


def test_a_request_refused_by_the_cap_is_not_remembered_as_a_duplicate() -> None:
    with build(plans=PLANS, duplicate_window_seconds=30, limiter_clock=Clock()) as api:
        ApiKeyStore(api.raw, plans=PLANS).set_plan(key_id(api, api.key), "capped")
        first = txt2img(api, seed=1).json()["id"]
        txt2img(api, seed=2)
        refused = txt2img(api, seed=3)
        api.jobs.fail(first, "cancelled")
        retried = txt2img(api, seed=3)
    assert refused.status_code == 429 and "queued" in refused.json()["message"]
    assert retried.status_code == 200


def test_a_request_whose_publish_failed_is_not_remembered_as_a_duplicate() -> None:
    with build(duplicate_window_seconds=30, limiter_clock=Clock()) as api:
        api.publisher.fail_with = ConnectionError("broker down")
        failed = txt2img(api, seed=1)
        api.publisher.fail_with = None
        retried = txt2img(api, seed=1)
    assert failed.status_code == 503
    assert retried.status_code == 200


def test_revoked_unknown_and_malformed_keys_get_byte_identical_answers() -> None:
    with build() as api:
        job_id = txt2img(api).json()["id"]
        assert ApiKeyStore(api.raw).revoke(key_id(api, api.key)) is not None
        unknown = "dq_" + "x" * 43
        answers = {}
        for name, key in [
            ("revoked", api.key),
            ("unknown", unknown),
            ("malformed", "not-a-key"),
            ("missing", None),
        ]:
            answers[name] = [
                api.client.post(
                    "/api/v4/dreambooth", json={"key": key, "model_id": "demo", "prompt": "x"}
                ),
                api.client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": key}),
                api.client.post("/api/v4/dreambooth/model_list", json={"key": key}),
                api.client.post(
                    "/api/v4/dreambooth/model_reload", json={"key": key, "model_id": "demo"}
                ),
            ]
        still = api.client.post(
            "/api/v4/dreambooth", json={"key": api.other_key, "model_id": "demo", "prompt": "x"}
        )

    def shape(response: Any) -> tuple[int, bytes, str]:
        return response.status_code, response.content, response.headers["content-type"]

    expected = [shape(response) for response in answers["unknown"]]
    assert expected[0][0] == 401
    assert json.loads(expected[0][1])["message"] == "Invalid Api Key"
    for name in ("revoked", "malformed", "missing"):
        assert [shape(response) for response in answers[name]] == expected, name
    assert still.status_code == 200
    assert api.publisher.jobs == [job_id, still.json()["id"]]


def test_limiter_redis_down_open_admits_unthrottled_and_the_cap_still_holds() -> None:
    plans = {"tight": {"requests_per_minute": 60, "burst": 2, "max_queued": 4}, "unlimited": {}}
    with build(plans=plans, default_plan="tight", limiter_client=dead_redis()) as api:
        answers = [txt2img(api, seed=i) for i in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
    assert "4 requests already queued" in answers[4].json()["message"]


def test_limiter_redis_down_closed_answers_503_and_reads_still_work() -> None:
    with build(
        plans=PLANS,
        default_plan="tight",
        rate_limit_when_down="closed",
        limiter_client=dead_redis(),
    ) as api:
        refused = txt2img(api)
        listed = api.client.post("/api/v4/dreambooth/model_list", json={"key": api.key})
    assert refused.status_code == 503
    assert refused.json()["message"] == "The rate limiter is unavailable, try again later."
    assert api.publisher.jobs == []
    assert api.raw.get(keys.JOB_SEQ) is None
    assert listed.status_code == 200


def test_a_key_on_a_plan_no_longer_configured_gets_the_default_plan() -> None:
    with build(plans=PLANS, default_plan="tight", limiter_clock=Clock()) as api:
        ApiKeyStore(api.raw).set_plan(key_id(api, api.key), "retired")
        codes = [txt2img(api, seed=i).status_code for i in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.parametrize("fast_lane", [True, False])
def test_a_job_redis_that_cannot_be_reached_answers_503_not_500(fast_lane: bool) -> None:
    """The app's own multiplexed connection (no client given), to a port nobody listens on."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        Settings(public_url="https://api.example.com", redis_url=dead),
        Overrides(
            registry=REGISTRY,
            objects=MemoryObjectStore(),
            publisher=AsyncRecordingPublisher(),
            fast_lane=fast_lane,
        ),
    )
    with TestClient(app) as client:
        body = {"key": "dq_" + "x" * 43, "model_id": "demo", "prompt": "a fox"}
        for path in ("/api/v4/dreambooth", "/api/v4/dreambooth/fetch/1"):
            response = client.post(path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["message"] == REDIS_DOWN
            assert response.headers["retry-after"] == "1"
