"""What a job asks a worker to do: the parameters the API stores on the record, typed.

The API validates a request and builds `JobParams`; the record keeps `to_dict()` (JSON); the
worker rebuilds it with `from_dict`, which refuses a malformed record with a ValueError whose
message is fit for clients. Torch-free: both sides import it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

JobKind = Literal["txt2img", "img2img", "inpaint", "text2video"]
JOB_KINDS: tuple[JobKind, ...] = ("txt2img", "img2img", "inpaint", "text2video")

OutputFormat = Literal["png", "mp4", "gif"]
SafetyAction = Literal["black", "blur", "pixelate", "sensitive_content_text"]
SAFETY_ACTIONS: tuple[SafetyAction, ...] = ("black", "blur", "pixelate", "sensitive_content_text")

DEFAULT_STRENGTH = 0.7
"""img2img and inpaint strength when a request gives none (the contract's default)."""

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "mp4": "video/mp4", "gif": "image/gif"}


@dataclass(frozen=True, slots=True)
class ImageInput:
    """Where an input image lives: a URL the worker fetches, or an object the API stored
    (base64 inputs are decoded by the API into the object store, never kept in Redis)."""

    url: str | None = None
    object_key: str | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.object_key is None):
            raise ValueError("an input image needs exactly one of url and object_key")


@dataclass(frozen=True, slots=True)
class LoraChoice:
    id: str
    strength: float = 1.0


@dataclass(frozen=True, slots=True)
class JobParams:
    kind: JobKind
    prompt: str
    negative_prompt: str | None = None
    # None for img2img and inpaint without a size: the init image's size, rounded down to 8.
    width: int | None = 512
    height: int | None = 512
    samples: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    scheduler: str | None = None
    use_karras_sigmas: bool = True
    algorithm_type: str | None = None
    loras: tuple[LoraChoice, ...] = ()
    embedding: str | None = None
    vae: str | None = None
    clip_skip: int = 1
    """The contract's value: 1 uses the last CLIP layer, 2 the penultimate, ..."""
    safety_checker: bool = False
    safety_checker_type: SafetyAction = "black"
    tomesd: bool = False
    panorama: bool = False
    self_attention: bool = False
    upscale: int = 1
    """Output scale factor; 1 is none."""
    highres_fix: bool = False
    multi_lingual: bool = False
    base64: bool = False
    temp: bool = False
    init_image: ImageInput | None = None
    mask_image: ImageInput | None = None
    strength: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    output_format: OutputFormat = "png"
    extras: dict[str, Any] = field(default_factory=dict)
    """Room for later fields; unknown keys of a stored record land here."""

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def outputs(self) -> int:
        """Files a job writes: one video, or one image per sample."""
        return 1 if self.kind == "text2video" else self.samples

    def batch_key(self) -> str | None:
        """What this job shares with every job it can be drawn with in one pipeline call of the
        same model, each keeping its own prompt, negative prompt text, seed and samples; None for
        a job that is never batched. Deterministic text (no ``hash()``), so that processes agree.

        Left out: panorama and self-attention guidance (their pipelines draw each sample alone),
        the highres fix (two calls), text-to-video, token merging (seeded per job), img2img or
        inpainting without an explicit size (each init image sets its own), and inpainting of
        several samples: alone, diffusers 0.42.1 encodes its one init image with the first
        sample's generator for all samples; batched, each sample's copy is encoded with its own
        generator, which changes every sample but the first. Everything that changes the shared
        call is in the key; what each job keeps (post-processing, output, inputs) is not.
        Whether a negative prompt is given is: SDXL zeroes the negative embeddings when it is
        None, so None and "" draw differently.
        """
        if self.width is None or self.height is None or self.tomesd:
            return None
        if self.kind == "text2video" or self.panorama or self.self_attention or self.highres_fix:
            return None
        if self.kind == "inpaint" and self.samples > 1:
            return None
        # dreamq.capabilities.effective_strength, which imports this module.
        strength = DEFAULT_STRENGTH if self.strength is None else self.strength
        shared = {
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            # float(): a record may hold 7 where another holds 7.0; the call is the same.
            "guidance_scale": float(self.guidance_scale),
            "scheduler": self.scheduler,
            "use_karras_sigmas": self.use_karras_sigmas,
            "algorithm_type": self.algorithm_type,
            "loras": [[lora.id, float(lora.strength)] for lora in self.loras],
            "embedding": self.embedding,
            "vae": self.vae,
            "clip_skip": self.clip_skip,
            "strength": None if self.kind == "txt2img" else float(strength),
            "negative_prompt": self.negative_prompt is not None,
        }
        return json.dumps(shared, sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        """`dataclasses.asdict(self)`, built directly: asdict deep-copies every value, which
        cost the API about 25 µs per submission."""
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["loras"] = tuple({"id": lora.id, "strength": lora.strength} for lora in self.loras)
        for name in ("init_image", "mask_image"):
            image = data[name]
            if image is not None:
                data[name] = {"url": image.url, "object_key": image.object_key}
        data["extras"] = copy.deepcopy(self.extras) if self.extras else {}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobParams:
        """Rebuild from a record; ValueError (client-safe message) when malformed."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extras = {**(known.pop("extras", None) or {})}
        extras.update((k, v) for k, v in data.items() if k not in names)
        try:
            for name in ("init_image", "mask_image"):
                if known.get(name) is not None:
                    known[name] = ImageInput(**known[name])
            known["loras"] = tuple(LoraChoice(**choice) for choice in known.get("loras") or ())
            params = cls(**known, extras=extras)
        except (TypeError, ValueError) as exc:
            if "kind" not in known or "prompt" not in known:
                raise ValueError("The job's parameters are incomplete.") from exc
            raise ValueError("The job's parameters are malformed.") from exc
        try:
            params.check()
        except TypeError as exc:  # a value of the wrong type, compared or counted
            raise ValueError("The job's parameters are malformed.") from exc
        return params

    def check(self) -> None:
        """Raise ValueError, with a message fit for clients, for values no pipeline can run."""
        if self.kind not in JOB_KINDS:
            raise ValueError(f"The job kind {self.kind} is unknown.")
        if not isinstance(self.prompt, str):
            raise ValueError("The job's parameters are malformed.")
        for name in ("width", "height"):
            size = getattr(self, name)
            # The VAE halves the size three times: latents are size / 8.
            if size is not None and (not isinstance(size, int) or size < 8 or size % 8):
                raise ValueError(f"The {name} must be a positive multiple of 8, got {size}.")
        if (self.width is None or self.height is None) and self.init_image is None:
            raise ValueError("The job has no size and no init image to take it from.")
        if self.samples < 1 or self.steps < 1:
            raise ValueError("The samples and steps must be at least 1.")
        if self.seed < 0:
            raise ValueError("The seed must not be negative.")
        if self.clip_skip < 1:
            raise ValueError("The clip skip must be at least 1.")
        if self.upscale < 1:
            raise ValueError("The upscale factor must be at least 1.")
        if self.safety_checker_type not in SAFETY_ACTIONS:
            raise ValueError(f"The safety checker type {self.safety_checker_type} is unknown.")
        if self.output_format not in CONTENT_TYPES:
            raise ValueError(f"The output type {self.output_format} is unknown.")
        if self.kind in ("img2img", "inpaint") and self.init_image is None:
            raise ValueError("The job has no init image.")
        if self.kind == "inpaint" and self.mask_image is None:
            raise ValueError("The job has no mask image.")
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise ValueError("The strength must lie in 0..1.")
        if self.kind == "text2video" and (not self.num_frames or not self.fps):
            raise ValueError("The video job has no frame count or frame rate.")


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(JobParams))
