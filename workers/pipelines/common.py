"""What every pipeline module shares: the job's call settings, seeding, progress, sizing.

A ``JobCall`` is built once per job (or once for jobs batched into one call) by
workers/generate.py and handed to the kind module, which only assembles its pipeline's arguments
and calls ``job.invoke(pipe, ...)``: the scheduler, seeding, progress reporting and timing are the
same for every kind.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from dreamq.capabilities import denoising_steps

OnStep = Callable[[int, int], None]
"""``on_step(done, total)``: denoising steps done so far in the job, of ``total``."""

# The largest seed torch.Generator.manual_seed takes; sample i is seeded seed + i.
SEED_LIMIT = 2**64

# The latent grid: every size handed to a pipeline is a multiple of this.
SIZE_MULTIPLE = 8


@dataclass(frozen=True, slots=True)
class BatchedJob:
    """What a job drawn in another job's pipeline call keeps its own (Generator.run_batch)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    samples: int


@dataclass(slots=True)
class JobCall:
    """One job's settings shared by all of its pipeline calls, and their running totals."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    seed: int
    samples: int
    clip_skip: int | None
    """diffusers' value: the contract's clip_skip minus one, None for no skip."""
    scheduler: Callable[[], SchedulerMixin]
    """A fresh scheduler for each call: schedulers keep per-run state."""
    on_step: OnStep | None = None
    batched: tuple[BatchedJob, ...] = ()
    """Jobs drawn in the same single call, after this job's samples: all with a negative prompt
    or all without, like this job. Read through ``sample_arguments`` and ``image_arguments``,
    which only the kinds' plain ``generate`` calls use: the other calls are never batched."""
    pipeline_seconds: float = 0.0
    _done: int = 0
    _total: int = 0
    _planned: list[int] = field(default_factory=list)

    def plan(self, *counts: int) -> None:
        """Announce the job's pipeline calls with their ``expected_steps``, so that ``total``
        covers the whole job from the first report (a call without a plan adds its own)."""
        self._planned = list(counts)
        self._total = self._done + sum(counts)

    def expected_steps(
        self, pipe: DiffusionPipeline, steps: int, strength: float | None = None
    ) -> int:
        """How many times ``pipe`` will call back for ``steps`` (at img2img ``strength``).

        Modern pipelines call back once per timestep: ``2 * steps - 1`` for second-order
        samplers, ``steps + 1`` for PLMS, and img2img drops the first ``1 - strength`` of the
        steps (diffusers' ``get_timesteps``). Older ones (SAG, text-to-video) call back once
        per progress-bar step: ``steps``.

        0 when the job has no ``on_step``: nobody reads the count, and building a scheduler to
        take it costs more (0.6 ms on the project machine) than a tiny model's denoising step.
        """
        if self.on_step is None:
            return 0
        if not _calls_back_per_timestep(pipe):
            return steps
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps)
        count = len(scheduler.timesteps)
        if strength is not None:
            skipped = max(steps - denoising_steps(steps, strength), 0)
            count -= skipped * int(getattr(scheduler, "order", 1))
        return count

    def generators(self, count: int | None = None, offset: int = 0) -> list[torch.Generator]:
        return [
            _generator(self.seed + offset + index)
            for index in range(self.samples if count is None else count)
        ]

    def sample_arguments(self) -> dict[str, Any]:
        """Prompts, images per prompt and generators of a call that draws all of the job's
        samples (and those of the jobs batched with it)."""
        if self.batched:
            return self.image_arguments()
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "num_images_per_prompt": self.samples,
            "generator": self.generators(),
        }

    def image_arguments(self) -> dict[str, Any]:
        """The same, one prompt and generator per image: each job's samples after the previous
        job's, sample i seeded with its job's seed + i, as when the job runs alone. diffusers
        repeats every prompt ``num_images_per_prompt`` times, so prompts that change from image
        to image take 1 (a single prompt string would make a batch of one)."""
        jobs = [
            BatchedJob(self.prompt, self.negative_prompt, self.seed, self.samples),
            *self.batched,
        ]
        return {
            "prompt": [job.prompt for job in jobs for _ in range(job.samples)],
            "negative_prompt": None
            if self.negative_prompt is None
            else [job.negative_prompt for job in jobs for _ in range(job.samples)],
            "num_images_per_prompt": 1,
            "generator": [
                _generator(job.seed + index) for job in jobs for index in range(job.samples)
            ],
        }

    def common_arguments(self) -> dict[str, Any]:
        """The arguments every text-conditioned pipeline call of the job takes."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "clip_skip": self.clip_skip,
        }

    def invoke(self, pipe: DiffusionPipeline, **arguments: Any) -> Any:
        """Run one pipeline call with a fresh scheduler, progress reports and timing."""
        pipe.scheduler = self.scheduler()
        if self._planned:
            expected = self._planned.pop(0)
        else:
            steps = arguments["num_inference_steps"]
            expected = self.expected_steps(pipe, steps, arguments.get("strength"))
            self._total += expected
        if self.on_step is not None:
            arguments |= self._callback(pipe, expected)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                return pipe(**arguments)
        finally:
            self.pipeline_seconds += time.perf_counter() - started

    def _report(self) -> None:
        assert self.on_step is not None
        self._done += 1
        self.on_step(self._done, max(self._total, self._done))

    def _callback(self, pipe: DiffusionPipeline, expected: int) -> dict[str, Any]:
        if _calls_back_per_timestep(pipe):
            corrected = False

            def on_step_end(
                pipe: DiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]
            ) -> dict[str, Any]:
                nonlocal corrected
                if not corrected:
                    # A safety net: expected_steps mirrors diffusers' own count.
                    self._total += int(pipe.num_timesteps) - expected
                    corrected = True
                self._report()
                return kwargs

            return {"callback_on_step_end": on_step_end}

        def legacy(step: int, timestep: Any, latents: torch.Tensor) -> None:
            self._report()

        return {"callback": legacy, "callback_steps": 1}


def _generator(seed: int) -> torch.Generator:
    # CPU generators draw the same starting noise on every device, so a seed reproduces an
    # image across CPU and GPU workers; drawing the latents on the CPU costs nothing.
    return torch.Generator(device="cpu").manual_seed(seed)


def _calls_back_per_timestep(pipe: DiffusionPipeline) -> bool:
    return "callback_on_step_end" in inspect.signature(pipe.__call__).parameters


MAX_SIDE = 1024
"""The contract's largest width or height; an init image's size is brought within it."""


def output_size(
    width: int | None, height: int | None, init_image: Image.Image | None
) -> tuple[int, int]:
    """The job's image size: as requested, else the init image's, scaled down (keeping its
    aspect ratio) to the contract's largest side, then rounded down to 8."""
    if width is not None and height is not None:
        return width, height
    if init_image is None:
        raise ValueError("The job has no size and no init image to take it from.")
    scale = min(1.0, MAX_SIDE / max(init_image.width, init_image.height))
    size = (
        width if width is not None else _round_down(int(init_image.width * scale)),
        height if height is not None else _round_down(int(init_image.height * scale)),
    )
    if min(size) < SIZE_MULTIPLE:
        raise ValueError(f"The init image is smaller than {SIZE_MULTIPLE} pixels.")
    return size


def fit(image: Image.Image, size: tuple[int, int], *, mask: bool = False) -> Image.Image:
    """``image`` in the pipeline's mode at ``size``: RGB with Lanczos for pictures; greyscale
    with nearest-neighbour for masks, which keeps their edges hard."""
    image = image.convert("L" if mask else "RGB")
    if image.size == size:
        return image
    resample = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def _round_down(size: int) -> int:
    return size - size % SIZE_MULTIPLE
