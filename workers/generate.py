"""The worker's one entry point for generation: a job's params in, images (or frames) out.

``Generator.check`` refuses what this deployment cannot run, before any model is loaded (the
rules live in dreamq/capabilities.py, which the API applies at submission too). ``Generator.run``
takes the model from the cache, switches the job's features on (LoRA, embedding, VAE, token
merging), picks the task pipeline and calls the kind module, then switches everything off again
so the next job sees the base model. The runner translates the prompt before and upscales,
safety-checks and encodes after.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from dreamq.capabilities import (
    SAG_SCHEDULERS,
    effective_strength,
    refusals,
    sag_scheduler_message,
)
from dreamq.jobparams import JobParams
from dreamq.registry import Registry
from dreamq.schedulers import ALGORITHM_TYPES, SchedulerChoice, resolve_scheduler_name
from workers.models import LoadedModel, PipelineCache
from workers.pipelines import features, img2img, inpaint, text2video, txt2img
from workers.pipelines.common import SEED_LIMIT, JobCall, OnStep, fit, output_size
from workers.schedulers import make_scheduler


class JobRefused(ValueError):
    """The job asks for something this deployment cannot run; ``fields`` in the vendor's shape,
    the message (all of them joined) fit for clients."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        super().__init__(" ".join(message for messages in fields.values() for message in messages))
        self.fields = fields


@dataclass(frozen=True, slots=True)
class Generation:
    images: list[Image.Image]
    """The samples, or the video's frames."""
    width: int
    height: int
    """The effective output size (the init image's, rounded down to 8, when the job gave none)."""
    pipeline_seconds: float
    """Wall time inside pipeline calls, for ETA statistics (no load, no adapter switching)."""


class Generator:
    def __init__(self, cache: PipelineCache, registry: Registry) -> None:
        self._cache = cache
        self._registry = registry

    def check(self, model_id: str, params: JobParams) -> None:
        """Raise ValueError (``JobRefused`` for field refusals), with a message fit for clients,
        for a job this worker cannot run. Loads nothing."""
        entry = self._registry.model(model_id)
        if entry is None:
            raise ValueError(f"The model {model_id} is not served by this worker.")
        params.check()
        if not math.isfinite(params.guidance_scale):
            raise ValueError("The guidance scale must be a finite number.")
        if params.seed + params.samples > SEED_LIMIT:
            raise ValueError(f"The seed must lie in 0..{SEED_LIMIT - 1 - params.samples}.")
        if params.scheduler is not None and resolve_scheduler_name(params.scheduler) is None:
            raise ValueError(f"The scheduler {params.scheduler} is not available.")
        algorithm = params.algorithm_type
        if algorithm is not None and algorithm.strip().lower() not in ALGORITHM_TYPES:
            raise ValueError(f"The algorithm type {algorithm} is not available.")
        refused = refusals(entry, params, self._registry)
        if refused:
            raise JobRefused(refused)

    def run(
        self,
        model_id: str,
        params: JobParams,
        *,
        init_image: Image.Image | None = None,
        mask_image: Image.Image | None = None,
        inputs: Callable[[], tuple[Image.Image | None, Image.Image | None]] | None = None,
        on_step: OnStep | None = None,
    ) -> Generation:
        """Generate the job's images (or video frames). Raises ValueError for inputs the job
        cannot run and ModelLoadError for weights that cannot be served, both fit for clients.

        `inputs`, when given, returns the (init, mask) images in their place: it is called once
        the model is loaded and its adapters are on, just before the pipeline needs them, so
        that downloads started earlier (workers/prefetch.py) overlap that preparation."""
        self.check(model_id, params)
        with self._cache.use(model_id) as loaded:
            scheduler = self._scheduler_choice(loaded, params)
            clip_skip = self._clip_skip(loaded, params)
            if params.self_attention and scheduler.class_name not in SAG_SCHEDULERS:
                raise JobRefused({"self_attention": [sag_scheduler_message(scheduler.class_name)]})
            job = JobCall(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                steps=params.steps,
                guidance_scale=params.guidance_scale,
                seed=params.seed,
                samples=params.samples,
                clip_skip=clip_skip,
                scheduler=partial(_make_scheduler, scheduler, loaded, params),
                on_step=on_step,
            )
            pipes = self._pipelines(loaded, params)
            vae = self._cache.vae(params.vae, loaded) if params.vae is not None else None
            with ExitStack() as scope:
                scope.enter_context(features.loras(self._cache, loaded, params.loras))
                embedding = self._registry.embeddings.get(params.embedding or "")
                scope.enter_context(features.embedding(loaded, params.embedding, embedding))
                scope.enter_context(features.vae(list(pipes.values()), vae))
                scope.enter_context(
                    features.token_merging(loaded.pipe.unet, params.tomesd, params.seed)
                )
                scope.enter_context(features.clip_skip(loaded.pipe, clip_skip is not None))
                if params.self_attention:
                    scope.enter_context(features.attention_processors(loaded.pipe.unet))
                if inputs is not None:
                    init_image, mask_image = inputs()
                width, height = output_size(params.width, params.height, init_image)
                images = self._generate(pipes, job, params, width, height, init_image, mask_image)
        return Generation(
            images=images, width=width, height=height, pipeline_seconds=job.pipeline_seconds
        )

    def _generate(
        self,
        pipes: dict[str, DiffusionPipeline],
        job: JobCall,
        params: JobParams,
        width: int,
        height: int,
        init_image: Image.Image | None,
        mask_image: Image.Image | None,
    ) -> list[Image.Image]:
        if params.kind == "text2video":
            assert params.num_frames is not None  # JobParams.check
            return text2video.generate(pipes["main"], job, width, height, params.num_frames)
        if params.kind == "txt2img":
            if params.panorama:
                return txt2img.generate_panorama(pipes["main"], job, width, height)
            if params.highres_fix:
                return txt2img.generate_highres(pipes["main"], pipes["second"], job, width, height)
            return txt2img.generate(pipes["main"], job, width, height)
        if init_image is None:
            raise ValueError("The job has no init image.")
        image = fit(init_image, (width, height))
        strength = effective_strength(params)
        if params.kind == "img2img":
            return img2img.generate(pipes["main"], job, [image], strength=strength)
        if mask_image is None:
            raise ValueError("The job has no mask image.")
        mask = fit(mask_image, (width, height), mask=True)
        return inpaint.generate(pipes["main"], job, image, mask, strength=strength)

    def _pipelines(self, loaded: LoadedModel, params: JobParams) -> dict[str, DiffusionPipeline]:
        """The pipelines the job calls: ``main``, and ``second`` for the highres fix."""
        if params.kind != "txt2img":
            return {"main": loaded.pipeline(params.kind)}
        if params.panorama:
            return {"main": loaded.pipeline("panorama")}
        main = loaded.pipeline("self_attention" if params.self_attention else "txt2img")
        if params.highres_fix:
            return {"main": main, "second": loaded.pipeline("img2img")}
        return {"main": main}

    def _scheduler_choice(self, loaded: LoadedModel, params: JobParams) -> SchedulerChoice:
        name = params.scheduler or loaded.default_scheduler
        if name is None:
            return SchedulerChoice(str(loaded.default_scheduler_config["_class_name"]))
        choice = resolve_scheduler_name(name)
        if choice is None:
            raise ValueError(f"The scheduler {name} is not available.")
        return choice

    def _clip_skip(self, loaded: LoadedModel, params: JobParams) -> int | None:
        """diffusers' clip_skip for the contract's value, refused beyond the text encoder.

        SD 1.x reads layer ``layers - clip_skip + 1`` (1 = the last); SDXL's default is already
        the penultimate layer, so it reads ``layers - clip_skip``. At least one transformer layer
        must remain: beyond that diffusers reads the token embeddings (or raises IndexError).
        """
        if params.clip_skip == 1:
            return None
        encoders = [loaded.pipe.text_encoder, getattr(loaded.pipe, "text_encoder_2", None)]
        layers = min(int(e.config.num_hidden_layers) for e in encoders if e is not None)
        most = layers - 1 if loaded.family == "sdxl" else layers
        if params.clip_skip > most:
            raise JobRefused(
                {
                    "clip_skip": [
                        f"The clip_skip {params.clip_skip} is beyond this model's text encoder "
                        f"({layers} layers): at most {most}."
                    ]
                }
            )
        return params.clip_skip - 1


def _make_scheduler(
    choice: SchedulerChoice, loaded: LoadedModel, params: JobParams
) -> SchedulerMixin:
    """A fresh scheduler for one pipeline call. Schedulers keep per-run state, so each call gets
    its own; it is a copy of one built once per model and settings, because building from the
    config (`from_config`) costs 0.4 ms on the project machine, a copy 0.07 ms, between jobs."""
    key = (choice, params.use_karras_sigmas, params.algorithm_type)
    prototype = loaded.schedulers.get(key)
    if prototype is None:
        prototype = make_scheduler(
            choice,
            dict(loaded.default_scheduler_config),
            use_karras_sigmas=params.use_karras_sigmas,
            algorithm_type=params.algorithm_type,
        )
        loaded.schedulers[key] = prototype
    scheduler: SchedulerMixin = copy.deepcopy(prototype)
    return scheduler
