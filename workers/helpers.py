"""The optional helper models: safety checker, upscaler, translator.

Each comes from its registry entry (`dreamq.registry.HelperEntry`), is loaded on first use by
`HelperModels` (one per worker process) and kept. A request field whose helper is not configured
fails with a `PublicJobError` naming the field and the missing registry entry: the contract
forbids ignoring it silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale import (
    StableDiffusionUpscalePipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from dreamq.errors import PublicJobError
from dreamq.jobparams import SafetyAction
from dreamq.registry import HelperEntry, Registry
from workers.models import resolve_device, resolve_dtype

try:
    # transformers >= 5 backs CLIPImageProcessor with torchvision, which must never be installed
    # beside CPU torch here (offline-stack guide); it falls back to this class with a warning.
    # Same preprocessing as the original (PIL/numpy) processor the checker was trained with.
    from transformers import CLIPImageProcessorPil as _ClipImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor as _ClipImageProcessor  # type: ignore[assignment]

log = logging.getLogger("dreamq.helpers")

DEFAULT_UPSCALE_STEPS = 20
"""The x4 upscaler's steps: it refines an image that already exists, so far fewer than the
75 of diffusers' default suffice, and each step at 4x the pixels is the dearest of the job."""

DEFAULT_TRANSLATION_TOKENS = 256
"""Bound on generated tokens: a prompt is short, and CLIP reads only 77 tokens of it anyway."""

SENSITIVE_CONTENT_TEXT = "Sensitive content"

_Helper = TypeVar("_Helper")


# --- safety checker ---------------------------------------------------------------------------


class SafetyChecker:
    """The CLIP safety checker of Stable Diffusion (the layout of
    CompVis/stable-diffusion-safety-checker: weights and preprocessor config in one folder)."""

    def __init__(self, entry: HelperEntry, device: str, dtype: torch.dtype) -> None:
        self._device = device
        self._dtype = dtype
        local = Path(entry.source).exists()
        self._processor = _ClipImageProcessor.from_pretrained(entry.source, local_files_only=local)
        model = StableDiffusionSafetyChecker.from_pretrained(
            entry.source, dtype=dtype, local_files_only=local
        )
        self._model = model.to(device).eval()
        # The checker logs "a black image will be returned" for every hit; dreamq applies the
        # action the request chose and logs the verdicts itself.
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """The checker's verdict per image: True = NSFW."""
        if not images:
            return []
        pixels = self._processor([image.convert("RGB") for image in images], return_tensors="pt")
        clip_input = pixels["pixel_values"].to(device=self._device, dtype=self._dtype)
        # forward() also blacks out flagged entries of `images`; it gets throwaway arrays, since
        # the replacement is the request's choice (safety_checker_type), not always black.
        placeholders = [np.zeros(1) for _ in images]
        _, flagged = self._model(clip_input=clip_input, images=placeholders)
        return [bool(verdict) for verdict in flagged]

    def apply(
        self, images: Sequence[Image.Image], action: SafetyAction
    ) -> tuple[list[Image.Image], list[bool]]:
        """Replace each flagged image per ``action``; unflagged images pass unchanged.

        Returns the images and the verdicts (True = NSFW, replaced).
        """
        flagged = self.check(images)
        if any(flagged):
            log.info("safety checker flagged %d of %d images", sum(flagged), len(flagged))
        out = [
            replace_flagged(image, action) if verdict else image
            for image, verdict in zip(images, flagged, strict=True)
        ]
        return out, flagged


def replace_flagged(image: Image.Image, action: SafetyAction) -> Image.Image:
    """The stand-in for a flagged image, of its size and mode."""
    width, height = image.size
    if action == "black":
        return Image.new(image.mode, image.size)
    if action == "blur":
        # Relative to the size, so a 1024 image is as unrecognisable as a 256 one.
        radius = max(2.0, max(width, height) / 16)
        return image.filter(ImageFilter.GaussianBlur(radius))
    if action == "pixelate":
        small = (max(1, width // 16), max(1, height // 16))
        # BOX averages each block; NEAREST scales back up without smoothing the blocks away.
        blocks = image.resize(small, Image.Resampling.BOX)
        return blocks.resize(image.size, Image.Resampling.NEAREST)
    if action == "sensitive_content_text":
        return _text_card(image)
    raise ValueError(f"unknown safety checker action {action!r}")


def _text_card(image: Image.Image) -> Image.Image:
    card = Image.new("RGB", image.size, (40, 40, 40))
    draw = ImageDraw.Draw(card)
    # Aileron at a size that lets the 17 characters fill about 3/4 of the width (Pillow's
    # bitmap fallback without FreeType ignores the size).
    font = ImageFont.load_default(size=max(8, image.width // 12))
    left, top, right, bottom = draw.textbbox((0, 0), SENSITIVE_CONTENT_TEXT, font=font)
    origin = ((image.width - (right - left)) / 2 - left, (image.height - (bottom - top)) / 2 - top)
    draw.text(origin, SENSITIVE_CONTENT_TEXT, fill=(230, 230, 230), font=font)
    return card.convert(image.mode)


# --- upscaler ---------------------------------------------------------------------------------


class Upscaler:
    """Stable Diffusion's x4 upscaler (StableDiffusionUpscalePipeline, the layout of
    stabilityai/stable-diffusion-x4-upscaler), text-guided by the job's prompt."""

    FACTORS = (2, 3, 4)

    def __init__(
        self,
        entry: HelperEntry,
        device: str,
        dtype: torch.dtype,
        *,
        steps: int = DEFAULT_UPSCALE_STEPS,
    ) -> None:
        self.steps = steps
        pipe = StableDiffusionUpscalePipeline.from_pretrained(
            entry.source, dtype=dtype, local_files_only=Path(entry.source).exists()
        )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe

    def upscale(
        self,
        images: Sequence[Image.Image],
        *,
        factor: int,
        prompt: str,
        seed: int,
        steps: int | None = None,
    ) -> list[Image.Image]:
        """Each image ``factor`` times larger; image i is seeded ``seed + i``, like samples.

        diffusers' upscaler is x4 only: for 2 and 3 its x4 result is scaled down with Lanczos,
        which keeps more of its added detail than upscaling the original by 2 or 3 directly.
        """
        if factor == 1:
            return list(images)
        if factor not in self.FACTORS:
            raise PublicJobError(f"The upscale factor {factor} is not supported; use 2, 3 or 4.")
        out: list[Image.Image] = []
        # One image per call: four 2048x2048 decodes at once would not fit most GPUs.
        for index, image in enumerate(images):
            # A CPU generator: the same seed gives the same noise on every device.
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            result: Image.Image = self._pipe(
                prompt=prompt,
                image=image.convert("RGB"),
                num_inference_steps=steps or self.steps,
                generator=generator,
            ).images[0]
            target = (image.width * factor, image.height * factor)
            # Also for 4: the pipeline rounds sizes its VAE cannot take, the output may not.
            if result.size != target:
                result = result.resize(target, Image.Resampling.LANCZOS)
            out.append(result)
        return out


# --- translator -------------------------------------------------------------------------------


class Translator:
    """A transformers sequence-to-sequence model that translates prompts into English (e.g.
    Helsinki-NLP/opus-mt-mul-en). Float32 always: such models are small (about 300 MB), so
    half precision would save little for a risk to their output."""

    def __init__(
        self,
        entry: HelperEntry,
        device: str,
        *,
        max_new_tokens: int = DEFAULT_TRANSLATION_TOKENS,
    ) -> None:
        self._device = device
        local = Path(entry.source).exists()
        self._tokenizer = AutoTokenizer.from_pretrained(entry.source, local_files_only=local)
        model = AutoModelForSeq2SeqLM.from_pretrained(entry.source, local_files_only=local)
        self._model = model.to(device).eval()
        # A decoder with learned positions cannot go past its table (IndexError), which a model
        # that never emits its end token would reach; the start token takes position 0.
        positions = getattr(model.config, "max_position_embeddings", None)
        limit = positions - 1 if isinstance(positions, int) else max_new_tokens
        self.max_new_tokens = min(max_new_tokens, limit)

    def translate(self, text: str) -> str:
        """English for ``text``: greedy decoding, so the same text always gives the same words.

        An empty translation (a model that only emitted special tokens) returns ``text``
        unchanged: a prompt in the wrong language still beats no prompt.
        """
        if not text.strip():
            return text
        inputs = self._tokenizer(text, return_tensors="pt", truncation=True).to(self._device)
        with torch.inference_mode():
            tokens = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        english = str(self._tokenizer.decode(tokens[0], skip_special_tokens=True)).strip()
        if not english:
            log.warning("translator returned nothing; the prompt is kept as given")
            return text
        return english


# --- the per-process cache --------------------------------------------------------------------


class HelperModels:
    """Created once per worker process; each helper is loaded on first use, at most once."""

    def __init__(
        self,
        registry: Registry,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        upscale_steps: int = DEFAULT_UPSCALE_STEPS,
    ) -> None:
        self._registry = registry
        self.device = resolve_device(device)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, self.device)
        self._upscale_steps = upscale_steps
        self._loaded: dict[str, Any] = {}
        # One lock for all: a second thread asking for a helper being loaded waits for it
        # rather than loading a second copy.
        self._lock = threading.Lock()

    def safety_checker(self) -> SafetyChecker:
        return self._get(
            "safety_checker",
            field="safety_checker",
            build=lambda entry: SafetyChecker(entry, self.device, self.dtype),
        )

    def upscaler(self) -> Upscaler:
        return self._get(
            "upscaler",
            field="upscale",
            build=lambda entry: Upscaler(entry, self.device, self.dtype, steps=self._upscale_steps),
        )

    def translator(self) -> Translator:
        return self._get(
            "translator", field="multi_lingual", build=lambda entry: Translator(entry, self.device)
        )

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _get(self, name: str, *, field: str, build: Callable[[HelperEntry], _Helper]) -> _Helper:
        with self._lock:
            helper: _Helper | None = self._loaded.get(name)
            if helper is not None:
                return helper
            entry: HelperEntry | None = getattr(self._registry, name)
            if entry is None:
                raise PublicJobError(
                    f"The {field} option is not available on this server: its model registry "
                    f"has no {name} entry."
                )
            started = time.perf_counter()
            try:
                helper = build(entry)
            except Exception as exc:
                log.exception("helper %s: loading %s failed", name, entry.source)
                raise PublicJobError(
                    f"The {field} option is not available on this server: its {name} model "
                    "could not be loaded."
                ) from exc
            log.info("helper %s loaded in %.2f s", name, time.perf_counter() - started)
            self._loaded[name] = helper
            return helper
