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
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

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
from workers.pipelines.common import (
    SEED_LIMIT,
    BatchedJob,
    JobCall,
    OnStep,
    fit,
    output_size,
)
from workers.schedulers import make_scheduler

_Input = TypeVar("_Input")


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
            job = self._job_call(loaded, params, on_step)
            pipes = self._pipelines(loaded, params)
            with self._features(loaded, params, pipes):
                if inputs is not None:
                    init_image, mask_image = inputs()
                width, height = output_size(params.width, params.height, init_image)
                fitted = (
                    []
                    if params.kind in ("txt2img", "text2video")
                    else [_fit_inputs(params, (width, height), init_image, mask_image)]
                )
                images = self._generate(pipes, job, params, width, height, fitted)
        return Generation(
            images=images, width=width, height=height, pipeline_seconds=job.pipeline_seconds
        )

    def run_batch(
        self,
        model_id: str,
        batch: Sequence[JobParams],
        *,
        inputs: Sequence[Callable[[], tuple[Image.Image | None, Image.Image | None]] | None],
    ) -> list[Generation | Exception]:
        """Generate the images of jobs with one batch key (``JobParams.batch_key``) in a single
        pipeline call: on a GPU with room to spare, several small jobs take little longer than
        one.

        ``inputs[i]`` takes job i's (init, mask) images as ``run``'s ``inputs`` does (None for
        txt2img). Slot i of the result holds job i's Generation, or the exception that failed
        it: its check, its inputs (the job is then left out of the call, the others still run),
        or the shared call's, which fails every job in it. Each job's images equal its images
        alone up to float noise (batched convolutions add in another order); its
        ``pipeline_seconds`` is its share of the call, by samples. Raises ValueError only for a
        batch not formed by key, a caller's bug.
        """
        if len(inputs) != len(batch):
            raise ValueError("A batch needs one inputs entry per job.")
        keys = {params.batch_key() for params in batch}
        if len(keys) != 1 or None in keys:
            raise ValueError("The jobs of a batch must share one batch key.")
        if len(batch) == 1:
            try:
                return [self.run(model_id, batch[0], inputs=inputs[0])]
            except Exception as exc:
                return [exc]
        results: dict[int, Generation | Exception] = {}
        checked: list[int] = []
        for index, params in enumerate(batch):
            try:
                self.check(model_id, params)
            except Exception as exc:
                results[index] = exc
            else:
                checked.append(index)
        if checked:
            try:
                self._run_together(model_id, batch, inputs, checked, results)
            except Exception as exc:
                for index in checked:
                    results.setdefault(index, exc)
        return [results[index] for index in range(len(batch))]

    def _run_together(
        self,
        model_id: str,
        batch: Sequence[JobParams],
        inputs: Sequence[Callable[[], tuple[Image.Image | None, Image.Image | None]] | None],
        checked: list[int],
        results: dict[int, Generation | Exception],
    ) -> None:
        """``run_batch``'s one call for the jobs at ``checked``: a Generation into ``results``
        for each, or the exception of its inputs; the call's own failure propagates."""
        lead = batch[checked[0]]
        width, height = output_size(lead.width, lead.height, None)
        with self._cache.use(model_id) as loaded:
            pipes = self._pipelines(loaded, lead)
            # The key makes every job's features the same: the first job's stand for all.
            with self._features(loaded, lead, pipes):
                drawn: list[int] = []
                fitted: list[tuple[Image.Image, Image.Image | None]] = []
                for index in checked:
                    take = inputs[index]
                    try:
                        init_image, mask_image = (None, None) if take is None else take()
                        if batch[index].kind != "txt2img":
                            fitted.append(
                                _fit_inputs(batch[index], (width, height), init_image, mask_image)
                            )
                    except Exception as exc:
                        results[index] = exc
                    else:
                        drawn.append(index)
                if not drawn:
                    return
                first, *others = (batch[index] for index in drawn)
                job = self._job_call(loaded, first, batched=others)
                images = iter(self._generate(pipes, job, first, width, height, fitted))
        samples = sum(batch[index].samples for index in drawn)
        for index in drawn:
            share = batch[index].samples
            results[index] = Generation(
                images=list(itertools.islice(images, share)),
                width=width,
                height=height,
                pipeline_seconds=job.pipeline_seconds * share / samples,
            )

    def _job_call(
        self,
        loaded: LoadedModel,
        params: JobParams,
        on_step: OnStep | None = None,
        *,
        batched: Sequence[JobParams] = (),
    ) -> JobCall:
        """The call settings of ``params`` (and of the jobs batched with it, which share them
        but for their prompts, seeds and samples)."""
        scheduler = self._scheduler_choice(loaded, params)
        clip_skip = self._clip_skip(loaded, params)
        if params.self_attention and scheduler.class_name not in SAG_SCHEDULERS:
            raise JobRefused({"self_attention": [sag_scheduler_message(scheduler.class_name)]})
        return JobCall(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            seed=params.seed,
            samples=params.samples,
            clip_skip=clip_skip,
            scheduler=partial(_make_scheduler, scheduler, loaded, params),
            on_step=on_step,
            batched=tuple(
                BatchedJob(other.prompt, other.negative_prompt, other.seed, other.samples)
                for other in batched
            ),
        )

    @contextmanager
    def _features(
        self, loaded: LoadedModel, params: JobParams, pipes: dict[str, DiffusionPipeline]
    ) -> Iterator[None]:
        """The job's features on the model's shared modules, switched off again at the end."""
        vae = self._cache.vae(params.vae, loaded) if params.vae is not None else None
        with ExitStack() as scope:
            scope.enter_context(features.loras(self._cache, loaded, params.loras))
            embedding = self._registry.embeddings.get(params.embedding or "")
            scope.enter_context(features.embedding(loaded, params.embedding, embedding))
            scope.enter_context(features.vae(list(pipes.values()), vae))
            scope.enter_context(
                features.token_merging(loaded.pipe.unet, params.tomesd, params.seed)
            )
            # _clip_skip (in _job_call) has refused a skip beyond the text encoder.
            scope.enter_context(features.clip_skip(loaded.pipe, params.clip_skip != 1))
            if params.self_attention:
                scope.enter_context(features.attention_processors(loaded.pipe.unet))
            yield

    def _generate(
        self,
        pipes: dict[str, DiffusionPipeline],
        job: JobCall,
        params: JobParams,
        width: int,
        height: int,
        fitted: Sequence[tuple[Image.Image, Image.Image | None]],
    ) -> list[Image.Image]:
        """The images of ``job`` (and of the jobs batched with it); ``fitted`` holds each job's
        (init, mask) images from ``_fit_inputs``, none for text-only kinds."""
        if params.kind == "text2video":
            assert params.num_frames is not None  # JobParams.check
            return text2video.generate(pipes["main"], job, width, height, params.num_frames)
        if params.kind == "txt2img":
            if params.panorama:
                return txt2img.generate_panorama(pipes["main"], job, width, height)
            if params.highres_fix:
                return txt2img.generate_highres(pipes["main"], pipes["second"], job, width, height)
            return txt2img.generate(pipes["main"], job, width, height)
        strength = effective_strength(params)
        images = _per_image(job, [image for image, _ in fitted])
        if params.kind == "img2img":
            return img2img.generate(pipes["main"], job, images, strength=strength)
        # _fit_inputs gives every inpainting job its mask.
        masks = _per_image(job, [mask for _, mask in fitted if mask is not None])
        return inpaint.generate(pipes["main"], job, images, masks, strength=strength)

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


def _fit_inputs(
    params: JobParams,
    size: tuple[int, int],
    init_image: Image.Image | None,
    mask_image: Image.Image | None,
) -> tuple[Image.Image, Image.Image | None]:
    """The init image (and the mask, for inpainting) at the output size; ValueError, fit for
    clients, when the job lacks one."""
    if init_image is None:
        raise ValueError("The job has no init image.")
    if params.kind != "inpaint":
        return fit(init_image, size), None
    if mask_image is None:
        raise ValueError("The job has no mask image.")
    return fit(init_image, size), fit(mask_image, size, mask=True)


def _per_image(job: JobCall, per_job: list[_Input]) -> list[_Input]:
    """Inputs given one per job, as the kind modules take them: a single job's one input serves
    all of its samples; jobs batched together give one per image, each job's repeated for its
    samples."""
    if not job.batched:
        return per_job
    counts = [job.samples, *(other.samples for other in job.batched)]
    return [item for item, count in zip(per_job, counts, strict=True) for _ in range(count)]


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
