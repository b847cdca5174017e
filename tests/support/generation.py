"""Job parameters and pixel access shared by the generation unit tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from dreamq.jobparams import ImageInput, JobParams
from workers.generate import Generation

IMAGE = ImageInput(url="https://example.com/a.png")
"""A stand-in reference: the generation tests hand the images to the Generator themselves."""


def params(kind: str = "txt2img", **changes: Any) -> JobParams:
    fields: dict[str, Any] = {
        "kind": kind,
        "prompt": "a watercolor fox",
        # Small: the tiny VAE's attention runs over every latent (its factor is 2, not 8).
        "width": 32,
        "height": 32,
        "steps": 2,
        "seed": 1234,
    }
    if kind in ("img2img", "inpaint"):
        fields |= {"init_image": IMAGE, "width": None, "height": None}
    if kind == "inpaint":
        fields["mask_image"] = IMAGE
    if kind == "text2video":
        fields |= {"num_frames": 2, "fps": 8}
    return JobParams(**(fields | changes))


def pixels(generation: Generation, index: int = 0) -> np.ndarray:
    return np.asarray(generation.images[index]).astype(int)
