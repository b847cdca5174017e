"""Every endpoint and field of the contract through the real stack: API -> Redis -> Celery worker
-> diffusers on the tiny demo models -> S3 -> fetch. Each test asserts what its field does."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import imageio.v3 as iio
import pytest
from PIL import Image

from storage import keys
from tests.integration.conftest import BUCKET, Stack
from tests.support.processes import JobEvents

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture
def events(stack: Stack) -> Any:
    events = stack.events()
    yield events
    events.close()


def submit(stack: Stack, path: str = "/api/v4/dreambooth", **fields: Any) -> dict[str, Any]:
    body = {"key": stack.key, "model_id": "demo", "prompt": "a red fox", **SMALL, **fields}
    response = stack.api.post(path, json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["status"] == "processing"
    return answer


def done(stack: Stack, events: JobEvents, answer: dict[str, Any]) -> dict[str, Any]:
    """Wait for the job to end and return its fetch body, which must be a success."""
    job_id = answer["id"]
    events.wait_for(job_id)
    body: dict[str, Any] = stack.api.post(
        f"/api/v4/dreambooth/fetch/{job_id}", json={"key": stack.key}
    ).json()
    assert body["status"] == "success", body
    return body


def run(stack: Stack, events: JobEvents, path: str = "/api/v4/dreambooth", **fields: Any) -> Any:
    return done(stack, events, submit(stack, path, **fields))


def download(url: str) -> httpx.Response:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, url
    return response


def image(url: str) -> Image.Image:
    picture = Image.open(io.BytesIO(download(url).content))
    picture.load()
    return picture


def pixels(body: dict[str, Any], index: int = 0) -> bytes:
    return image(body["output"][index]).convert("RGB").tobytes()


def max_difference(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def png_base64(
    size: tuple[int, int], color: tuple[int, int, int], *, data_url: bool = False
) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


@pytest.fixture(scope="module")
def base(stack: Stack) -> bytes:
    """The plain image every feature test compares against: demo, seed 5, 64x64, 2 steps."""
    events = stack.events()
    try:
        return pixels(run(stack, events, seed=5))
    finally:
        events.close()


@pytest.fixture(scope="module")
def init_url(stack: Stack) -> str:
    """An init image on a real HTTP server (moto's S3, on loopback: allowed by the stack)."""
    buffer = io.BytesIO()
    Image.new("RGB", (72, 64), (200, 40, 40)).save(buffer, format="PNG")
    stack.s3.client().put_object(Bucket=BUCKET, Key="fixtures/init.png", Body=buffer.getvalue())
    return f"{stack.s3.endpoint_url}/{BUCKET}/fixtures/init.png"


@pytest.fixture(scope="module")
def mask_url(stack: Stack) -> str:
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    stack.s3.client().put_object(Bucket=BUCKET, Key="fixtures/mask.png", Body=buffer.getvalue())
    return f"{stack.s3.endpoint_url}/{BUCKET}/fixtures/mask.png"


# ---------------------------------------------------------------- text to image fields


def test_same_seed_same_image_on_every_text2img_path(stack: Stack, events: JobEvents, base: bytes):
    for path in ("/api/v4/dreambooth", "/api/v6/images/text2img"):
        assert max_difference(pixels(run(stack, events, path, seed=5)), base) == 0


def test_lora_changes_the_image_and_strength_zero_does_not(
    stack: Stack, events: JobEvents, base: bytes
) -> None:
    one = run(stack, events, seed=5, lora_model="demo-lora-a")
    assert (one["meta"]["lora"], one["meta"]["lora_strength"]) == ("demo-lora-a", "1")
    assert max_difference(pixels(one), base) > 1
    zero = run(stack, events, seed=5, lora_model="demo-lora-a", lora_strength="0")
    assert max_difference(pixels(zero), base) <= 1
    both = run(stack, events, seed=5, lora_model="demo-lora-a,demo-lora-b", lora_strength="0.6,0.4")
    assert (both["meta"]["lora"], both["meta"]["lora_strength"]) == (
        "demo-lora-a,demo-lora-b",
        "0.6,0.4",
    )
    assert max_difference(pixels(both), pixels(one)) > 1
    # A job without LoRA after LoRA jobs runs the base weights.
    assert max_difference(pixels(run(stack, events, seed=5)), base) <= 1


def test_embedding_token_changes_the_image_only_when_asked(stack: Stack, events: JobEvents) -> None:
    prompt = "a <demo-embedding> fox"
    plain = pixels(run(stack, events, seed=5, prompt=prompt))
    embedded = run(stack, events, seed=5, prompt=prompt, embeddings_model="demo-embedding")
    assert embedded["meta"]["embeddings"] == "demo-embedding"
    assert max_difference(pixels(embedded), plain) > 1
    assert max_difference(pixels(run(stack, events, seed=5, prompt=prompt)), plain) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"negative_prompt": "blurry"},
        {"guidance_scale": 3},
        {"num_inference_steps": 3},
        {"vae": "demo-vae"},
        {"clip_skip": 2},
        {"scheduler": "DPM++ 2M Karras"},
        {"scheduler": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver+++"},
        {"scheduler": "EulerDiscreteScheduler", "use_karras_sigmas": "no"},
        {"enhance_prompt": "yes"},
        {"tomesd": "yes"},
        {"self_attention": "yes"},
        {"highres_fix": "yes"},
    ],
    ids=lambda fields: ",".join(fields),
)
def test_each_field_changes_the_image(
    stack: Stack, events: JobEvents, base: bytes, fields: dict[str, Any]
) -> None:
    body = run(stack, events, seed=5, **fields)
    assert max_difference(pixels(body), base) > 1
    # And leaves nothing behind for the next job.
    assert max_difference(pixels(run(stack, events, seed=5)), base) <= 1


def test_karras_flag_changes_a_scheduler_that_takes_it(stack: Stack, events: JobEvents) -> None:
    fields = {"seed": 5, "scheduler": "EulerDiscreteScheduler", "num_inference_steps": 6}
    karras = run(stack, events, use_karras_sigmas="yes", **fields)
    plain = run(stack, events, use_karras_sigmas="no", **fields)
    assert max_difference(pixels(karras), pixels(plain)) > 1


def test_enhance_prompt_is_echoed(stack: Stack, events: JobEvents) -> None:
    answer = submit(stack, seed=5, enhance_prompt="yes", negative_prompt="dull")
    assert answer["meta"]["prompt"].startswith("a red fox, ")
    assert answer["meta"]["negative_prompt"].startswith("dull, ")
    assert answer["meta"]["enhance_prompt"] == "yes"
    done(stack, events, answer)


def test_panorama_runs_multidiffusion(stack: Stack, events: JobEvents) -> None:
    # Above one 512-pixel window, MultiDiffusion blends overlapping views.
    wide = {"seed": 5, "width": 520, "height": 64}
    panorama = run(stack, events, panorama="yes", **wide)
    plain = run(stack, events, **wide)
    assert image(panorama["output"][0]).size == (520, 64)
    assert max_difference(pixels(panorama), pixels(plain)) > 1


@pytest.mark.parametrize("action", ["black", "blur", "pixelate", "sensitive_content_text"])
def test_safety_checker_replaces_flagged_images(
    stack: Stack, events: JobEvents, base: bytes, action: str
) -> None:
    # The demo safety checker flags every image, so the replacement is always visible.
    body = run(stack, events, seed=5, safety_checker="yes", safety_checker_type=action)
    assert body["meta"]["nsfw_content_detected"] == [True]
    checked = pixels(body)
    assert max_difference(checked, base) > 1
    if action == "black":
        assert set(checked) == {0}


@pytest.mark.parametrize(("upscale", "factor"), [("yes", 2), ("3", 3)])
def test_upscale_multiplies_the_size(
    stack: Stack, events: JobEvents, upscale: str, factor: int
) -> None:
    body = run(stack, events, seed=5, upscale=upscale)
    assert image(body["output"][0]).size == (64 * factor, 64 * factor)
    assert (body["meta"]["W"], body["meta"]["H"]) == (64 * factor, 64 * factor)


def test_multi_lingual_generates_from_the_translation(stack: Stack, events: JobEvents) -> None:
    body = run(stack, events, seed=5, prompt="ein roter Fuchs", multi_lingual="yes")
    english = body["meta"]["translated_prompt"]
    assert english and english != "ein roter Fuchs"
    assert max_difference(pixels(body), pixels(run(stack, events, seed=5, prompt=english))) == 0


def test_base64_output_decodes_to_the_stored_images(stack: Stack, events: JobEvents) -> None:
    answer = submit(stack, seed=5, samples=2, base64="yes")
    body = done(stack, events, answer)
    assert len(body["output"]) == 2
    for encoded, link in zip(body["output"], answer["future_links"], strict=True):
        decoded = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        assert decoded.format == "PNG"
        assert decoded.tobytes() == image(link).tobytes()


def test_temp_links_expire_through_a_bucket_lifecycle_rule(stack: Stack, events: JobEvents) -> None:
    body = run(stack, events, seed=5, temp="yes")
    assert all("/dq/temp/generations/" in link for link in body["output"])
    image(body["output"][0])
    rules = stack.s3.client().get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert any(
        rule["Filter"]["Prefix"] == "dq/temp/" and rule["Expiration"]["Days"] == 1 for rule in rules
    )


# ---------------------------------------------------------------- image to image, inpainting


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/img2img", "/api/v6/images/img2img"])
def test_img2img_from_a_url_takes_the_init_image_size(
    stack: Stack, events: JobEvents, init_url: str, path: str
) -> None:
    answer = submit(stack, path, seed=5, init_image=init_url, width=None, height=None)
    assert answer["meta"]["init_image"] == init_url
    body = done(stack, events, answer)
    assert image(body["output"][0]).size == (72, 64)
    assert (body["meta"]["W"], body["meta"]["H"]) == (72, 64)


def test_img2img_strength_and_base64_input(stack: Stack, events: JobEvents) -> None:
    init = png_base64((64, 64), (10, 200, 30))
    # Ten steps: strength 0.2 then runs two (strength x steps, as diffusers counts).
    fields = {"seed": 5, "init_image": init, "base64": "yes", "num_inference_steps": 10}
    low = run(stack, events, "/api/v4/dreambooth/img2img", strength=0.2, **fields)
    high = run(stack, events, "/api/v4/dreambooth/img2img", strength=0.9, **fields)
    assert (
        max_difference(
            Image.open(io.BytesIO(base64.b64decode(low["output"][0]))).tobytes(),
            Image.open(io.BytesIO(base64.b64decode(high["output"][0]))).tobytes(),
        )
        > 1
    )
    data_url = png_base64((64, 64), (10, 200, 30), data_url=True)
    same = run(stack, events, "/api/v4/dreambooth/img2img", seed=5, init_image=data_url,
               strength=0.2, num_inference_steps=10)  # fmt: skip
    assert (
        max_difference(
            pixels(same), Image.open(io.BytesIO(base64.b64decode(low["output"][0]))).tobytes()
        )
        == 0
    )


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/inpaint", "/api/v6/images/inpaint"])
def test_inpaint_repaints_only_where_the_mask_is_white(
    stack: Stack, events: JobEvents, init_url: str, mask_url: str, path: str
) -> None:
    def inpaint(mask: str) -> Image.Image:
        body = run(stack, events, path, seed=5, init_image=init_url, mask_image=mask,
                   width=None, height=None, num_inference_steps=None, steps=2)  # fmt: skip
        assert body["meta"]["steps"] == 2
        return image(body["output"][0]).convert("L")

    # Same seed, a white box versus nothing to repaint: the box is where the images differ.
    # (Outside it they differ a little too: the VAE decoder's attention mixes all latents.)
    black = "data:image/png;base64," + png_base64((72, 64), (0, 0, 0))
    boxed, kept = inpaint(mask_url), inpaint(black)
    assert boxed.size == kept.size == (72, 64)
    inside, outside = _mean_differences(boxed, kept, (16, 16, 48, 48))
    assert inside > 2 * outside, (inside, outside)


def _mean_differences(
    a: Image.Image, b: Image.Image, box: tuple[int, int, int, int]
) -> tuple[float, float]:
    left, top, right, bottom = box
    inside: list[int] = []
    outside: list[int] = []
    for y in range(a.height):
        for x in range(a.width):
            diff = abs(int(a.getpixel((x, y))) - int(b.getpixel((x, y))))  # type: ignore[arg-type]
            (inside if left <= x < right and top <= y < bottom else outside).append(diff)
    return sum(inside) / len(inside), sum(outside) / len(outside)


def test_one_weight_load_serves_text2img_img2img_and_inpaint(
    stack: Stack, events: JobEvents, init_url: str, mask_url: str
) -> None:
    before = stack.worker.count(r"model demo loaded in")
    run(stack, events, seed=1)
    run(stack, events, "/api/v4/dreambooth/img2img", seed=1, init_image=init_url)
    run(stack, events, "/api/v4/dreambooth/inpaint", seed=1, init_image=init_url,
        mask_image=mask_url)  # fmt: skip
    assert stack.worker.count(r"model demo loaded in") == max(before, 1) == 1


def test_nine_channel_inpainting_model(
    stack: Stack, events: JobEvents, init_url: str, mask_url: str
) -> None:
    body = run(stack, events, "/api/v4/dreambooth/inpaint", model_id="demo-inpaint", seed=5,
               init_image=init_url, mask_image=mask_url)  # fmt: skip
    assert image(body["output"][0]).size == (64, 64)


# ---------------------------------------------------------------- SDXL


def test_sdxl_text2img_img2img_inpaint_and_lora(
    stack: Stack, events: JobEvents, init_url: str, mask_url: str
) -> None:
    xl = {"model_id": "demo-xl", "seed": 5}
    plain = run(stack, events, **xl)
    again = run(stack, events, **xl)
    assert max_difference(pixels(plain), pixels(again)) == 0
    lora = run(stack, events, lora_model="demo-lora-xl", **xl)
    assert max_difference(pixels(lora), pixels(plain)) > 1
    from_init = {"init_image": init_url, "width": None, "height": None, **xl}
    img2img = run(stack, events, "/api/v4/dreambooth/img2img", **from_init)
    assert image(img2img["output"][0]).size == (72, 64)
    inpaint = run(stack, events, "/api/v4/dreambooth/inpaint", mask_image=mask_url, **from_init)
    assert image(inpaint["output"][0]).size == (72, 64)
    assert stack.worker.count(r"model demo-xl loaded in") == 1


# ---------------------------------------------------------------- text to video


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/text2video", "/api/v6/video/text2video"])
def test_text2video_serves_an_mp4(stack: Stack, events: JobEvents, path: str) -> None:
    answer = submit(stack, path, model_id="demo-video", seed=5, num_frames=8, fps=4)
    assert len(answer["future_links"]) == 1 and answer["future_links"][0].endswith(".mp4")
    body = done(stack, events, answer)
    response = download(body["output"][0])
    assert response.headers["content-type"] == "video/mp4"
    assert response.content[4:8] == b"ftyp"
    frames = iio.imread(response.content, extension=".mp4")
    assert frames.shape[0] == 8 and frames.shape[1:3] == (64, 64)
    assert (body["meta"]["num_frames"], body["meta"]["fps"]) == (8, 4)


def test_text2video_gif_from_seconds(stack: Stack, events: JobEvents) -> None:
    body = run(stack, events, "/api/v4/dreambooth/text2video", model_id="demo-video", seed=5,
               seconds=1, fps=6, output_type="gif")  # fmt: skip
    response = download(body["output"][0])
    assert response.headers["content-type"] == "image/gif"
    gif = Image.open(io.BytesIO(response.content))
    assert gif.n_frames == 6


# ---------------------------------------------------------------- models


def test_model_list_names_the_registry(stack: Stack) -> None:
    response = stack.api.post("/api/v4/dreambooth/model_list", json={"key": stack.key})
    assert response.status_code == 200
    ids = {item["model_id"] for item in response.json()}
    assert {"demo", "demo-xl", "demo-video", "demo-inpaint"} <= ids


@pytest.mark.parametrize("path", ["/api/v4/dreambooth/model_reload", "/api/v6/images/model_reload"])
def test_model_reload_warms_the_model_on_the_worker(stack: Stack, path: str) -> None:
    client = stack.redis.client()
    start = len(stack.worker.lines)
    response = stack.api.post(path, json={"key": stack.key, "model_id": "demo-video"})
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["message"]) == ("success", "model reload started")
    assert body["eta"] > 0
    stack.worker.wait_for(r"model demo-video warm on request", timeout=60, start=start)
    held = [json.loads(models) for models in client.hvals(keys.WORKER_MODELS)]
    assert any("demo-video" in models for models in held)
    unknown = stack.api.post(path, json={"key": stack.key, "model_id": "nope"})
    assert unknown.json()["message"] == "Model id not found"
