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
    images: list[Image.Image],
    masks: list[Image.Image],
    *,
    strength: float,
) -> list[Image.Image]:
    """``job.samples`` inpaintings of one image with its mask; or one of each image, which come
    one per image of the call (jobs batched together, each job's inputs repeated for its
    samples). All inputs are already at the output size."""
    for image, mask in zip(images, masks, strict=True):
        check_inputs(image, mask, job.steps, strength)
    if len(images) == 1:
        per_image = {"image": images[0], "mask_image": masks[0]} | job.sample_arguments()
    else:
        per_image = {"image": images, "mask_image": masks} | job.image_arguments()
    result = job.invoke(
        pipe,
        **(job.common_arguments() | per_image),
        width=images[0].width,
        height=images[0].height,
        strength=strength,
        output_type="pil",
    )
    return list(result.images)
