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
    """``job.samples`` redraws of one init image; or one redraw of each image, which come one
    per image of the call (the highres fix's second pass, or jobs batched together, each job's
    image repeated for its samples). Result i is seeded as ``JobCall.image_arguments`` says
    either way."""
    check_inputs(steps or job.steps, strength)
    arguments = job.common_arguments()
    if steps is not None:
        arguments["num_inference_steps"] = steps
    if len(images) == 1:
        per_image = {"image": images[0]} | job.sample_arguments()
    else:
        per_image = {"image": images} | job.image_arguments()
    result = job.invoke(
        pipe,
        **(arguments | per_image),
        strength=strength,
        output_type="pil",
    )
    return list(result.images)
