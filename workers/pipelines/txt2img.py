"""Text to image: plain, panorama (MultiDiffusion), self-attention guidance and highres fix.

``generate*`` are what workers/generate.py calls, with the pipeline it chose (StableDiffusion,
StableDiffusionXL, the panorama or the SAG pipeline, all sharing one model's weights) and the
job's ``JobCall``. ``Txt2ImgParams``/``check_inputs``/``run`` are the first release's interface on
a raw params dict, kept for callers that have not moved to ``workers.generate.Generator``.

Self-contained in the diffusers manner: the other pipeline kinds copy this shape rather than
inherit it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image

from dreamq.schedulers import ALGORITHM_TYPES, SchedulerChoice, resolve_scheduler_name
from workers.pipelines import img2img
from workers.pipelines.common import SEED_LIMIT, SIZE_MULTIPLE, JobCall, OnStep
from workers.schedulers import make_scheduler

_SEED_LIMIT = SEED_LIMIT

HIGHRES_STRENGTH = 0.5
"""The highres fix's second pass keeps half of the upscaled first image."""

HIGHRES_MIN_SIZE = 64
"""The highres fix's first pass is never smaller than this (a latent grid of 8 at SD's scale)."""


def generate(pipe: DiffusionPipeline, job: JobCall, width: int, height: int) -> list[Image.Image]:
    """``job.samples`` images in one batched call (StableDiffusion, StableDiffusionXL, SAG)."""
    result = job.invoke(
        pipe,
        **job.common_arguments(),
        width=width,
        height=height,
        num_images_per_prompt=job.samples,
        generator=job.generators(),
        output_type="pil",
    )
    return list(result.images)


def generate_panorama(
    pipe: DiffusionPipeline, job: JobCall, width: int, height: int
) -> list[Image.Image]:
    """MultiDiffusion panorama, one call per sample.

    [diffusers 0.42.1] StableDiffusionPanoramaPipeline stacks the guidance embeddings as
    [negatives..., positives...] but the latents as [l0, l0, l1, l1, ...]: with more than one
    image per call and guidance, sample 0 is denoised by the negative prompt alone. One sample
    per call sidesteps it; sample i still uses seed + i.
    """
    job.plan(*[job.expected_steps(pipe, job.steps)] * job.samples)
    images: list[Image.Image] = []
    for index in range(job.samples):
        result = job.invoke(
            pipe,
            **job.common_arguments(),
            width=width,
            height=height,
            num_images_per_prompt=1,
            generator=job.generators(1, offset=index),
            output_type="pil",
        )
        images.extend(result.images)
    return images


def highres_first_size(size: int) -> int:
    """The first pass's side: half the requested one, rounded down to a multiple of 8, at
    least 64 (never more than the requested side)."""
    half = size // 2 - (size // 2) % SIZE_MULTIPLE
    return min(size, max(HIGHRES_MIN_SIZE, half))


def generate_highres(
    first_pipe: DiffusionPipeline,
    second_pipe: DiffusionPipeline,
    job: JobCall,
    width: int,
    height: int,
) -> list[Image.Image]:
    """The highres fix: compose at half size, where the model's composition holds, then add
    detail at the full size.

    ``first_pipe`` (plain or SAG) draws the samples at half the size (see
    ``highres_first_size``); each is upscaled with Lanczos to the requested size and redrawn by
    ``second_pipe`` (img2img on the same weights) at strength 0.5 with the same seeds. The
    second pass runs at least 2 steps so that half of them is one step.
    """
    second_steps = max(job.steps, 2)
    job.plan(
        job.expected_steps(first_pipe, job.steps),
        job.expected_steps(second_pipe, second_steps, HIGHRES_STRENGTH),
    )
    small = generate(first_pipe, job, highres_first_size(width), highres_first_size(height))
    upscaled = [image.resize((width, height), Image.Resampling.LANCZOS) for image in small]
    return img2img.generate(
        second_pipe, job, upscaled, strength=HIGHRES_STRENGTH, steps=second_steps
    )


@dataclass(frozen=True, slots=True)
class Txt2ImgParams:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    use_karras_sigmas: bool
    algorithm_type: str | None

    @classmethod
    def from_job(cls, params: Mapping[str, Any]) -> Txt2ImgParams:
        """Typed parameters from a job record's params dict (already validated by the API)."""
        try:
            return cls(
                prompt=str(params["prompt"]),
                negative_prompt=_optional_str(params.get("negative_prompt")),
                width=int(params["width"]),
                height=int(params["height"]),
                samples=int(params["samples"]),
                steps=int(params["steps"]),
                guidance_scale=float(params["guidance_scale"]),
                seed=int(params["seed"]),
                scheduler=_optional_str(params.get("scheduler")),
                use_karras_sigmas=bool(params.get("use_karras_sigmas", False)),
                algorithm_type=_optional_str(params.get("algorithm_type")),
            )
        except KeyError as exc:
            raise ValueError(f"The job has no {exc.args[0]} parameter.") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError("The job's parameters are malformed.") from exc


def _optional_str(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def check_inputs(params: Txt2ImgParams) -> None:
    """Raise ValueError, with a message fit for clients, for anything this pipeline cannot do."""
    for name, size in (("width", params.width), ("height", params.height)):
        # The VAE halves the size three times: latents are size / 8.
        if size < 8 or size % 8:
            raise ValueError(f"The {name} must be a positive multiple of 8, got {size}.")
    if params.samples < 1:
        raise ValueError("The number of samples must be at least 1.")
    if params.steps < 1:
        raise ValueError("The number of inference steps must be at least 1.")
    if not math.isfinite(params.guidance_scale):
        raise ValueError("The guidance scale must be a finite number.")
    if params.seed < 0 or params.seed + params.samples > _SEED_LIMIT:
        raise ValueError(f"The seed must lie in 0..{_SEED_LIMIT - 1 - params.samples}.")
    if params.scheduler is not None and resolve_scheduler_name(params.scheduler) is None:
        raise ValueError(f"The scheduler {params.scheduler} is not available.")
    if params.algorithm_type is not None and params.algorithm_type.lower() not in ALGORITHM_TYPES:
        raise ValueError(f"The algorithm type {params.algorithm_type} is not available.")


def run(
    pipe: StableDiffusionPipeline,
    params: Txt2ImgParams,
    *,
    default_scheduler_config: Mapping[str, Any],
    default_scheduler: str | None = None,
    on_step: OnStep | None = None,
) -> list[Image.Image]:
    """Generate ``params.samples`` images of ``width`` x ``height``; sample i uses seed + i.

    ``default_scheduler_config`` is the model's own scheduler config, kept unmodified by the
    caller; ``default_scheduler`` (a registry setting) names the scheduler used when the request
    names none, else the model's own class is used. ``on_step(done, total)`` is called after each
    denoising step; ``total`` counts the scheduler's timesteps, not ``steps``: ``2 * steps - 1``
    for second-order samplers (Heun, DPM2), ``steps + 1`` for PLMS. The caller runs
    ``check_inputs`` first (the runner does, before it loads the model).
    """
    pipe.scheduler = make_scheduler(
        _choice(params.scheduler or default_scheduler, default_scheduler_config),
        dict(default_scheduler_config),
        use_karras_sigmas=params.use_karras_sigmas,
        algorithm_type=params.algorithm_type,
    )
    # CPU generators draw the same starting noise on every device, so a seed reproduces an
    # image across CPU and GPU workers; drawing 4 x H/8 x W/8 numbers on the CPU is negligible.
    generators = [
        torch.Generator(device="cpu").manual_seed(params.seed + index)
        for index in range(params.samples)
    ]
    callback = _step_callback(on_step) if on_step is not None else None
    with torch.inference_mode():
        result = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            num_images_per_prompt=params.samples,
            generator=generators,
            callback_on_step_end=callback,
            output_type="pil",
        )
    return list(result.images)


def _choice(name: str | None, default_config: Mapping[str, Any]) -> SchedulerChoice:
    if name is None:
        return SchedulerChoice(str(default_config["_class_name"]))
    choice = resolve_scheduler_name(name)
    if choice is None:
        raise ValueError(f"The scheduler {name} is not available.")
    return choice


def _step_callback(on_step: OnStep) -> Callable[..., dict[str, Any]]:
    def callback(
        pipe: StableDiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        on_step(step + 1, int(pipe.num_timesteps))
        return kwargs

    return callback
