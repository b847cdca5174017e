"""Text to image: plain, panorama (MultiDiffusion), self-attention guidance and highres fix.

``generate*`` are what workers/generate.py calls, with the pipeline it chose (StableDiffusion,
StableDiffusionXL, the panorama or the SAG pipeline, all sharing one model's weights) and the
job's ``JobCall``.

Self-contained in the diffusers manner: the other pipeline kinds copy this shape rather than
inherit it.
"""

from __future__ import annotations

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from workers.pipelines import img2img
from workers.pipelines.common import SIZE_MULTIPLE, JobCall

HIGHRES_STRENGTH = 0.5
"""The highres fix's second pass keeps half of the upscaled first image."""

HIGHRES_MIN_SIZE = 64
"""The highres fix's first pass is never smaller than this (a latent grid of 8 at SD's scale)."""


def generate(pipe: DiffusionPipeline, job: JobCall, width: int, height: int) -> list[Image.Image]:
    """``job.samples`` images, and those of the jobs batched with it, in one call
    (StableDiffusion, StableDiffusionXL, SAG)."""
    result = job.invoke(
        pipe,
        **(job.common_arguments() | job.sample_arguments()),
        width=width,
        height=height,
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
