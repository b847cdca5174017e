"""dreamq/capabilities.py: the refusals, and evidence that each refused combination really fails
(or cannot be built) in diffusers 0.42.1 on the tiny models. That every allowed combination
runs is shown through the Generator in tests/unit/test_generate*.py."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dreamq.capabilities import (
    KIND_JOBS,
    PANORAMA_WINDOW,
    SAG_SCHEDULERS,
    job_kinds,
    refusals,
)
from dreamq.jobparams import ImageInput, JobParams, LoraChoice
from dreamq.registry import (
    EmbeddingEntry,
    HelperEntry,
    LoraEntry,
    ModelEntry,
    Registry,
    VaeEntry,
)
from dreamq.schedulers import SCHEDULER_NAMES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SD = ModelEntry(source="/m/sd")
XL = ModelEntry(source="/m/xl", family="sdxl")
FILL = ModelEntry(source="/m/fill", kind="inpaint")
VIDEO = ModelEntry(source="/m/video", kind="text2video")
REGISTRY = Registry(
    models={"sd": SD, "xl": XL, "fill": FILL, "video": VIDEO},
    loras={"a": LoraEntry(source="/l/a"), "x": LoraEntry(source="/l/x", family="sdxl")},
    embeddings={
        "e": EmbeddingEntry(source="/e/e"),
        "ex": EmbeddingEntry(source="/e", family="sdxl"),
    },
    vaes={"v": VaeEntry(source="/v/v"), "vx": VaeEntry(source="/v/x", family="sdxl")},
)
IMAGE = ImageInput(url="https://example.com/a.png")


def _params(kind: str = "txt2img", **changes: Any) -> JobParams:
    fields: dict[str, Any] = {"kind": kind, "prompt": "a fox", "steps": 4}
    if kind in ("img2img", "inpaint"):
        fields["init_image"] = IMAGE
    if kind == "inpaint":
        fields["mask_image"] = IMAGE
    if kind == "text2video":
        fields |= {"num_frames": 8, "fps": 8}
    return JobParams(**(fields | changes))


def test_capabilities_is_torch_free() -> None:
    # The API imports it; a stray import of the worker stack would pull torch into the API.
    import dreamq.capabilities

    tree = ast.parse(Path(dreamq.capabilities.__file__).read_text())
    imported = {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported <= {"__future__", "collections", "dreamq", "typing"}


def test_job_kinds_per_model_kind() -> None:
    assert KIND_JOBS == {
        "image": ("txt2img", "img2img", "inpaint"),
        "inpaint": ("inpaint",),
        "text2video": ("text2video",),
    }
    assert job_kinds(XL) == ("txt2img", "img2img", "inpaint")
    assert job_kinds(ModelEntry(source="/m", kind="text2video", family="sdxl")) == ()


@pytest.mark.parametrize(
    ("entry", "params"),
    [
        (SD, _params()),
        (SD, _params("img2img")),
        (SD, _params("inpaint")),
        (XL, _params("inpaint", loras=(LoraChoice("x"),), vae="vx", embedding="ex")),
        (FILL, _params("inpaint", loras=(LoraChoice("a", 0.5),), embedding="e", vae="v")),
        (VIDEO, _params("text2video", embedding="e", vae="v", clip_skip=2)),
        (SD, _params(panorama=True, width=1024, tomesd=True, loras=(LoraChoice("a"),))),
        (SD, _params(self_attention=True, highres_fix=True, tomesd=True, scheduler="DDIM")),
        (XL, _params(highres_fix=True, tomesd=True, clip_skip=2)),
        (SD, _params("img2img", strength=0.25)),  # one step of four
    ],
)
def test_runnable_jobs_are_not_refused(entry: ModelEntry, params: JobParams) -> None:
    assert refusals(entry, params, REGISTRY) == {}


@pytest.mark.parametrize(
    ("entry", "params", "field", "message"),
    [
        (FILL, _params(), "model_id", "The model serves inpaint jobs, not txt2img."),
        (FILL, _params("img2img"), "model_id", "The model serves inpaint jobs, not img2img."),
        (VIDEO, _params(), "model_id", "The model serves text2video jobs, not txt2img."),
        (SD, _params("text2video"), "model_id", "not text2video."),
        (
            ModelEntry(source="/m", kind="text2video", family="sdxl"),
            _params("text2video"),
            "model_id",
            "No text-to-video pipeline exists for sdxl models.",
        ),
        (SD, _params(loras=(LoraChoice("nope"),)), "lora_model", "The LoRA is not available."),
        (SD, _params(loras=(LoraChoice("x"),)), "lora_model", "is for sdxl models, not sd15."),
        (SD, _params(loras=(LoraChoice("a"),) * 2), "lora_model", "A LoRA is given twice."),
        (
            VIDEO,
            _params("text2video", loras=(LoraChoice("a"),)),
            "lora_model",
            "The lora_model field is not served for text2video models.",
        ),
        (SD, _params(embedding="nope"), "embeddings_model", "The embedding is not available."),
        (XL, _params(embedding="e"), "embeddings_model", "The embedding e is for sd15 models"),
        (SD, _params(vae="nope"), "vae", "The VAE is not available."),
        (XL, _params(vae="v"), "vae", "The VAE v is for sd15 models, not sdxl."),
        (
            VIDEO,
            _params("text2video", tomesd=True),
            "tomesd",
            "The tomesd field is not served for text2video models.",
        ),
        (XL, _params(panorama=True, width=1024), "panorama", "not served for sdxl models."),
        (SD, _params("img2img", panorama=True), "panorama", "not served for img2img jobs."),
        (SD, _params(panorama=True), "panorama", "needs a width or height above 512"),
        (XL, _params(self_attention=True), "self_attention", "not served for sdxl models."),
        (SD, _params("inpaint", self_attention=True), "self_attention", "for inpaint jobs."),
        (
            SD,
            _params(self_attention=True, panorama=True, width=1024),
            "self_attention",
            "The self_attention field is not served with panorama.",
        ),
        (
            SD,
            _params(self_attention=True, scheduler="Euler a"),
            "self_attention",
            "not served with EulerAncestralDiscreteScheduler",
        ),
        (SD, _params("img2img", highres_fix=True), "highres_fix", "not served for img2img jobs."),
        (
            SD,
            _params(highres_fix=True, panorama=True, width=1024),
            "highres_fix",
            "The highres_fix field is not served with panorama.",
        ),
        (SD, _params("img2img", steps=1), "strength", "The strength 0.7 leaves no denoising step"),
        (SD, _params("inpaint", steps=4, strength=0.2), "strength", "leaves no denoising step"),
        (SD, _params(upscale=2), "upscale", "no upscaler model is configured."),
        (SD, _params(safety_checker=True), "safety_checker", "no safety checker model"),
        (SD, _params(multi_lingual=True), "multi_lingual", "no translation model"),
    ],
)
def test_refusals_name_the_field(
    entry: ModelEntry, params: JobParams, field: str, message: str
) -> None:
    errors = refusals(entry, params, REGISTRY)
    assert list(errors) == [field]
    assert any(message in text for text in errors[field]), errors


def test_the_model_default_scheduler_counts_for_sag() -> None:
    euler = ModelEntry(source="/m/sd", default_scheduler="Euler")
    assert "self_attention" in refusals(euler, _params(self_attention=True), REGISTRY)
    # A request's own scheduler wins over the registry's default.
    assert refusals(euler, _params(self_attention=True, scheduler="UniPC"), REGISTRY) == {}


def test_helpers_in_the_registry_serve_their_fields() -> None:
    helper = HelperEntry(source="/h")
    registry = REGISTRY.model_copy(
        update={"upscaler": helper, "safety_checker": helper, "translator": helper}
    )
    params = _params(upscale=2, safety_checker=True, multi_lingual=True)
    assert refusals(SD, params, registry) == {}


def test_all_refusals_of_a_job_are_reported_together() -> None:
    params = _params(loras=(LoraChoice("nope"),), vae="nope", panorama=True)
    assert set(refusals(XL, params, REGISTRY)) == {"lora_model", "vae", "panorama"}


def test_panorama_threshold_is_one_window() -> None:
    assert PANORAMA_WINDOW == 512
    assert "panorama" in refusals(SD, _params(panorama=True, width=512, height=512), REGISTRY)
    assert refusals(SD, _params(panorama=True, width=520, height=64), REGISTRY) == {}
    assert refusals(SD, _params(panorama=True, width=64, height=576), REGISTRY) == {}


# --- evidence: what is refused really fails in diffusers 0.42.1 -------------------------------


@pytest.fixture(scope="module")
def demo(demo_registry_file: Path) -> Registry:
    from dreamq.registry import load_registry

    return load_registry(demo_registry_file)


@pytest.fixture(scope="module")
def sd(demo: Registry) -> Any:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    pipe = StableDiffusionPipeline.from_pretrained(demo.models["demo"].source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def video(demo: Registry) -> Any:
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_synth import (  # noqa: E501
        TextToVideoSDPipeline,
    )

    pipe = TextToVideoSDPipeline.from_pretrained(demo.models["demo-video"].source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded(seed: int = 0) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(set(SCHEDULER_NAMES) - SAG_SCHEDULERS))
def test_sag_refuses_schedulers_with_fractional_timesteps(sd: Any, name: str) -> None:
    import diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    sag = StableDiffusionSAGPipeline.from_pipe(sd)
    sag.scheduler = getattr(diffusers, name).from_config(sd.scheduler.config)
    with pytest.raises(ValueError, match="does not support using a scheduler"):
        sag("a fox", width=64, height=64, num_inference_steps=1, generator=_seeded())


def test_no_sdxl_panorama_sag_or_text_to_video_pipeline_exists() -> None:
    import diffusers

    names = set(dir(diffusers))
    assert "StableDiffusionPanoramaPipeline" in names
    assert "StableDiffusionSAGPipeline" in names
    assert not {name for name in names if "XL" in name and ("Panorama" in name or "SAG" in name)}
    # The SDXL text-to-video class is Text2Video-Zero: an image model animated zero-shot, not a
    # text-to-video UNet like ModelScope's.
    assert {name for name in names if "Video" in name and "XL" in name} <= {
        "TextToVideoZeroSDXLPipeline"
    }


def test_video_unet_has_no_lora_loader(video: Any, demo: Registry) -> None:
    with pytest.raises(AttributeError, match="load_lora_adapter"):
        video.load_lora_weights(demo.loras["demo-lora-a"].source, adapter_name="a")


def test_tomesd_breaks_on_video_latents(video: Any) -> None:
    import tomesd

    tomesd.apply_patch(video, ratio=0.5)
    try:
        with pytest.raises(ZeroDivisionError):
            video("a fox", width=64, height=64, num_frames=2, num_inference_steps=1)
    finally:
        tomesd.remove_patch(video)


def test_a_single_panorama_window_is_the_plain_image(sd: Any) -> None:
    from workers.pipelines.panorama import PanoramaPipeline

    panorama = PanoramaPipeline.from_pipe(sd)
    panorama.set_progress_bar_config(disable=True)
    arguments: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 2}
    plain = sd("a fox", generator=_seeded(), **arguments).images[0]
    tiled = panorama("a fox", generator=_seeded(), **arguments).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(tiled))


def test_img2img_without_a_denoising_step_fails(sd: Any) -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        StableDiffusionImg2ImgPipeline,
    )
    from PIL import Image

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(sd)
    img2img.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), "white")
    with pytest.raises(RuntimeError):
        img2img("a fox", image=image, strength=0.7, num_inference_steps=1, generator=_seeded())


def test_a_nine_channel_unet_cannot_draw_from_noise(demo: Registry) -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    pipe = StableDiffusionPipeline.from_pretrained(demo.models["demo-inpaint"].source)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="must match"):
        pipe("a fox", width=64, height=64, num_inference_steps=1)
