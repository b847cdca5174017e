"""Inpainting: redraw the white part of a mask, keep the black part.

One pipeline per family serves both UNet layouts (diffusers 0.42.1): a 9-channel inpainting UNet
(registry kind ``inpaint``) sees the mask and the masked image as extra input channels; a
4-channel UNet (kind ``image``, through ``from_pipe``) is steered by blending the known region
back into the latents after every step, which keeps it but blends less seamlessly.
"""

from __future__ import annotations

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from workers.pipelines import img2img
from workers.pipelines.common import JobCall


def check_inputs(image: Image.Image, mask: Image.Image, steps: int, strength: float) -> None:
    """Raise ValueError, with a message fit for clients, for inputs the pipeline cannot use."""
    if image.size != mask.size:
        raise ValueError("The mask image must have the init image's size.")
    img2img.check_inputs(steps, strength)


def generate(
    pipe: DiffusionPipeline,
    job: JobCall,
    image: Image.Image,
    mask: Image.Image,
    *,
    strength: float,
) -> list[Image.Image]:
    """``job.samples`` inpaintings of ``image`` (both inputs already at the output size)."""
    check_inputs(image, mask, job.steps, strength)
    result = job.invoke(
        pipe,
        **job.common_arguments(),
        image=image,
        mask_image=mask,
        width=image.width,
        height=image.height,
        strength=strength,
        num_images_per_prompt=job.samples,
        generator=job.generators(),
        output_type="pil",
    )
    return list(result.images)
