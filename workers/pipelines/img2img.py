"""Image to image: redraw init images from ``strength`` of the way back to noise.

The pipeline is StableDiffusionImg2ImgPipeline or StableDiffusionXLImg2ImgPipeline, built by
``from_pipe`` on the model's weights. The caller (workers/generate.py) hands images already at
the output size (``common.fit``): these pipelines take their size from the image.
"""

from __future__ import annotations

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from dreamq.capabilities import denoising_steps
from workers.pipelines.common import JobCall


def check_inputs(steps: int, strength: float) -> None:
    """Raise ValueError, with a message fit for clients, for a strength that runs no step."""
    if not 0 <= strength <= 1:
        raise ValueError("The strength must lie in 0..1.")
    if denoising_steps(steps, strength) < 1:
        # diffusers fails deep inside the UNet on an empty timestep list.
        raise ValueError(
            f"The strength {strength} leaves no denoising step out of {steps}: raise the "
            "strength or num_inference_steps."
        )


def generate(
    pipe: DiffusionPipeline,
    job: JobCall,
    images: list[Image.Image],
    *,
    strength: float,
    steps: int | None = None,
) -> list[Image.Image]:
    """``job.samples`` redraws of one init image, or one redraw of each of several images (the
    highres fix's second pass); result i is seeded seed + i either way."""
    check_inputs(steps or job.steps, strength)
    arguments = job.common_arguments()
    if steps is not None:
        arguments["num_inference_steps"] = steps
    if len(images) == 1:
        batch: dict[str, object] = {"image": images[0], "num_images_per_prompt": job.samples}
        generators = job.generators()
    else:
        # One prompt per image: a single prompt string would make a batch of one.
        batch = {
            "image": images,
            "num_images_per_prompt": 1,
            "prompt": [job.prompt] * len(images),
            "negative_prompt": None
            if job.negative_prompt is None
            else [job.negative_prompt] * len(images),
        }
        generators = job.generators(len(images))
    result = job.invoke(
        pipe,
        **(arguments | batch),
        strength=strength,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)
