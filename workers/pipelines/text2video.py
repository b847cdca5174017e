"""Text to video on TextToVideoSDPipeline (ModelScope's UNet3D layout): the frames as images.

Encoding the frames to mp4 or gif is the runner's job (workers/encode.py).
"""

from __future__ import annotations

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from workers.pipelines.common import JobCall


def check_inputs(num_frames: int | None) -> None:
    """Raise ValueError, with a message fit for clients, for a video the pipeline cannot make."""
    if num_frames is None or num_frames < 1:
        raise ValueError("The number of frames must be at least 1.")


def generate(
    pipe: DiffusionPipeline, job: JobCall, width: int, height: int, num_frames: int
) -> list[Image.Image]:
    """One video of ``num_frames`` frames; the starting noise of all frames comes from one
    generator seeded with the job's seed."""
    check_inputs(num_frames)
    result = job.invoke(
        pipe,
        **job.common_arguments(),
        width=width,
        height=height,
        num_frames=num_frames,
        generator=job.generators(1)[0],
        output_type="pil",
    )
    # frames: one list of PIL images per prompt.
    return list(result.frames[0])
