"""The per-process pipeline cache: one weight load per registry model, shared by every task.

``get`` loads a model's base pipeline once (the class follows the registry's family and kind);
the task pipelines a job needs (img2img, inpainting on a 4-channel UNet, panorama,
self-attention guidance) are built from it with ``from_pipe``, which hands over the very same
component objects, so a model's weights live in memory once whatever mix of jobs it serves.
LoRA adapters load once per (model, LoRA) and VAEs once per process; idle models are unloaded
by ``unload_idle``.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

# Concrete module paths: through the package root, mypy resolves the dummy placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline,
)
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_synth import (
    TextToVideoSDPipeline,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)

from dreamq.registry import ModelEntry, ModelFamily, ModelKind, Registry
from dreamq.schedulers import resolve_scheduler_name
from workers.pipelines.panorama import PanoramaPipeline

log = logging.getLogger("dreamq.models")

Task = Literal["txt2img", "img2img", "inpaint", "panorama", "self_attention", "text2video"]

# The pipeline a registry entry is loaded as, by (family, kind).
BASE_PIPELINES: dict[tuple[ModelFamily, ModelKind], type[DiffusionPipeline]] = {
    ("sd15", "image"): StableDiffusionPipeline,
    ("sd15", "inpaint"): StableDiffusionInpaintPipeline,
    ("sd15", "text2video"): TextToVideoSDPipeline,
    ("sdxl", "image"): StableDiffusionXLPipeline,
    ("sdxl", "inpaint"): StableDiffusionXLInpaintPipeline,
}

# The pipeline each task runs on, by family; one that is not the base is built with from_pipe.
TASK_PIPELINES: dict[tuple[ModelFamily, Task], type[DiffusionPipeline]] = {
    ("sd15", "txt2img"): StableDiffusionPipeline,
    ("sd15", "img2img"): StableDiffusionImg2ImgPipeline,
    # Handles both UNets: 9 channels natively, 4 by blending the known region back each step.
    ("sd15", "inpaint"): StableDiffusionInpaintPipeline,
    ("sd15", "panorama"): PanoramaPipeline,
    ("sd15", "self_attention"): StableDiffusionSAGPipeline,
    ("sd15", "text2video"): TextToVideoSDPipeline,
    ("sdxl", "txt2img"): StableDiffusionXLPipeline,
    ("sdxl", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", "inpaint"): StableDiffusionXLInpaintPipeline,
}

# UNet input channels per kind: latents (4), or latents + mask + masked-image latents (9).
_UNET_CHANNELS: dict[ModelKind, int] = {"image": 4, "inpaint": 9, "text2video": 4}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelLoadError(Exception):
    """A model could not be served; ``message`` is safe to show clients (details go to logs)."""

    def __init__(self, public_message: str) -> None:
        super().__init__(public_message)
        self.message = public_message


@dataclass(slots=True, eq=False)
class LoadedModel:
    model_id: str
    entry: ModelEntry
    pipe: DiffusionPipeline
    # The scheduler config the model shipped with, copied before any job swaps schedulers.
    default_scheduler_config: dict[str, Any]
    load_seconds: float
    dtype: torch.dtype
    variants: dict[Task, DiffusionPipeline] = field(default_factory=dict)
    # LoRA id -> the adapter name it was loaded under (kept until the model is unloaded).
    adapters: dict[str, str] = field(default_factory=dict)
    # Never-used schedulers built from default_scheduler_config, by the job settings that chose
    # them: each pipeline call runs a copy (workers/generate.py).
    schedulers: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    # Held while a job uses the model: adapters, embeddings and patches are per-job state on
    # shared modules, and an unload must not pull the weights from under a running job.
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def default_scheduler(self) -> str | None:
        """The registry's scheduler for requests that name none (None: the model's own)."""
        return self.entry.default_scheduler

    @property
    def family(self) -> ModelFamily:
        return self.entry.family

    def pipeline(self, task: Task) -> DiffusionPipeline:
        """The pipeline for ``task``, sharing this model's components (built once, then kept)."""
        cls = TASK_PIPELINES.get((self.entry.family, task))
        if cls is None:
            raise ModelLoadError(f"The model {self.model_id} cannot run {task}.")
        if type(self.pipe) is cls:
            return self.pipe
        variant = self.variants.get(task)
        if variant is None:
            # from_pipe casts the components to its dtype argument, float32 when none is given:
            # without it, a half-precision model would be converted in place for every task.
            variant = cls.from_pipe(self.pipe, dtype=self.dtype)
            variant.set_progress_bar_config(disable=True)
            self.variants[task] = variant
        return variant


@dataclass(slots=True)
class CacheStats:
    loads: int = 0
    hits: int = 0
    load_seconds: float = 0.0
    unloads: int = 0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # Half precision is the norm for SD inference on GPUs; CPUs lack fast float16 kernels.
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(_DTYPES)}") from None


def adapter_name(lora_id: str) -> str:
    """A peft adapter name for a registry LoRA id: peft names become module attribute names,
    so only word characters; the digest keeps ids that differ in punctuation apart."""
    digest = hashlib.sha1(lora_id.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', lora_id)}_{digest}"


class PipelineCache:
    """Created once per worker process; ``get`` loads a model on first use and keeps it until
    ``unload_idle`` finds it unused for longer than ``idle_seconds``."""

    def __init__(
        self,
        registry: Registry,
        *,
        device: str = "auto",
        dtype: str = "auto",
        idle_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_load: Callable[[str, float], None] | None = None,
        on_lookup: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_load(model_id, seconds)`` is told of every load (the ETA of a reload uses it);
        ``on_lookup(hit)`` of every ``get``: the model was loaded already (hit) or not."""
        self._registry = registry
        self._on_load = on_load
        self._on_lookup = on_lookup
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.idle_seconds = idle_seconds
        self._clock = clock
        self.stats = CacheStats()
        self._loaded: dict[str, LoadedModel] = {}
        self._vaes: dict[str, AutoencoderKL] = {}
        self._last_used: dict[str, float] = {}
        self._vae_last_used: dict[str, float] = {}
        # One lock for loading: a worker runs one job at a time, and two threads loading the
        # same multi-GB model at once would only double the memory.
        self._lock = threading.RLock()

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            loaded = self._loaded.get(model_id)
            if self._on_lookup is not None:
                self._on_lookup(loaded is not None)
            if loaded is not None:
                self.stats.hits += 1
            else:
                entry = self._registry.model(model_id)
                if entry is None:
                    raise ModelLoadError(f"The model {model_id} is not served by this worker.")
                loaded = self._load(model_id, entry)
                self._loaded[model_id] = loaded
                self.stats.loads += 1
                self.stats.load_seconds += loaded.load_seconds
                if self._on_load is not None:
                    self._on_load(model_id, loaded.load_seconds)
            self._last_used[model_id] = self._clock()
            return loaded

    def warm(self, model_id: str) -> float:
        """Load ``model_id`` unless it is loaded; the seconds the load took (0 when warm)."""
        with self._lock:
            if model_id in self._loaded:
                self._last_used[model_id] = self._clock()
                return 0.0
            return self.get(model_id).load_seconds

    @contextmanager
    def use(self, model_id: str) -> Iterator[LoadedModel]:
        """The loaded model, held for one job: ``unload_idle`` leaves it alone meanwhile and
        counts its idle time from the job's end."""
        loaded = self.get(model_id)
        with loaded.lock:
            try:
                yield loaded
            finally:
                with self._lock:
                    self._last_used[model_id] = self._clock()

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def unload_idle(self) -> list[str]:
        """Drop the models (with their task pipelines and adapters) and VAEs unused for longer
        than ``idle_seconds``; the ids of the models dropped. A model in use is kept."""
        if self.idle_seconds is None:
            return []
        dropped: list[str] = []
        with self._lock:
            now = self._clock()
            for model_id, loaded in list(self._loaded.items()):
                if now - self._last_used[model_id] <= self.idle_seconds:
                    continue
                if not loaded.lock.acquire(blocking=False):
                    continue
                try:
                    del self._loaded[model_id]
                    loaded.variants.clear()
                    loaded.adapters.clear()
                finally:
                    loaded.lock.release()
                dropped.append(model_id)
                del self._last_used[model_id]
            for vae_id, used in list(self._vae_last_used.items()):
                if now - used > self.idle_seconds:
                    del self._vaes[vae_id], self._vae_last_used[vae_id]
                    log.info("unloaded idle VAE %s", vae_id)
            self.stats.unloads += len(dropped)
        if dropped:
            # Other references (a finished job's pipeline) are gone by now; collect the cycles
            # torch modules form, then hand the freed blocks back to the CUDA driver.
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            log.info("unloaded idle models: %s", ", ".join(dropped))
        return dropped

    def lora_adapter(self, loaded: LoadedModel, lora_id: str) -> str:
        """The adapter name of ``lora_id`` on ``loaded``, loading it on first use."""
        name = loaded.adapters.get(lora_id)
        if name is not None:
            return name
        entry = self._registry.loras.get(lora_id)
        if entry is None:
            raise ModelLoadError(f"The LoRA {lora_id} is not available.")
        name = adapter_name(lora_id)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # peft warns that a second adapter makes a model hold several: that is the design.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                loaded.pipe.load_lora_weights(entry.source, adapter_name=name)
        except Exception as exc:
            log.exception(
                "LoRA %s on model %s: loading %s failed", lora_id, loaded.model_id, entry.source
            )
            _forget_adapter(loaded.pipe, name)
            raise ModelLoadError(
                f"The LoRA {lora_id} could not be loaded for the model {loaded.model_id}."
            ) from exc
        loaded.adapters[lora_id] = name
        log.info(
            "LoRA %s loaded on model %s in %.2f s",
            lora_id,
            loaded.model_id,
            time.perf_counter() - started,
        )
        return name

    def vae(self, vae_id: str, like: LoadedModel) -> AutoencoderKL:
        """The registry VAE ``vae_id`` on this cache's device and dtype, loaded once.

        A single-file VAE takes its architecture from ``like``, the model it is first used with
        (the registry's family check guarantees the same VAE layout).
        """
        with self._lock:
            vae = self._vaes.get(vae_id)
            if vae is None:
                entry = self._registry.vaes.get(vae_id)
                if entry is None:
                    raise ModelLoadError(f"The VAE {vae_id} is not available.")
                vae = self._load_vae(vae_id, entry.source, like)
                self._vaes[vae_id] = vae
            self._vae_last_used[vae_id] = self._clock()
            return vae

    def _load_vae(self, vae_id: str, source: str, like: LoadedModel) -> AutoencoderKL:
        try:
            if source.endswith((".safetensors", ".ckpt")):
                model = like.entry
                config = model.config if model.is_single_file else model.source
                vae = AutoencoderKL.from_single_file(
                    source, config=config, subfolder="vae", local_files_only=True
                )
            else:
                vae = AutoencoderKL.from_pretrained(source, local_files_only=Path(source).exists())
            vae = vae.to(device=self.device, dtype=self.dtype)
        except Exception as exc:
            log.exception("VAE %s: loading %s failed", vae_id, source)
            raise ModelLoadError(f"The VAE {vae_id} could not be loaded.") from exc
        vae.eval()
        return vae

    def _load(self, model_id: str, entry: ModelEntry) -> LoadedModel:
        misconfigured = ModelLoadError(f"The model {model_id} is misconfigured on this worker.")
        if entry.default_scheduler and resolve_scheduler_name(entry.default_scheduler) is None:
            log.error("model %s: unknown default_scheduler %r", model_id, entry.default_scheduler)
            raise misconfigured
        pipeline_class = BASE_PIPELINES.get((entry.family, entry.kind))
        if pipeline_class is None:
            log.error("model %s: no %s pipeline for family %s", model_id, entry.kind, entry.family)
            raise misconfigured
        started = time.perf_counter()
        pipe = self._from_source(model_id, entry, pipeline_class)
        channels = pipe.unet.config.in_channels
        if channels != _UNET_CHANNELS[entry.kind]:
            # A 9-channel UNet cannot draw from noise alone, and a 4-channel one takes no mask
            # input: a wrong kind would fail every job, so it fails the load instead.
            log.error("model %s: kind %s but a %d-channel UNet", model_id, entry.kind, channels)
            raise misconfigured
        try:
            pipe.to(self.device)
        except Exception as exc:
            log.exception("model %s: could not move to %s", model_id, self.device)
            raise ModelLoadError(f"The model {model_id} could not be loaded.") from exc
        pipe.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - started
        log.info("model %s loaded in %.2f s on %s/%s", model_id, seconds, self.device, self.dtype)
        return LoadedModel(
            model_id=model_id,
            entry=entry,
            pipe=pipe,
            default_scheduler_config=dict(pipe.scheduler.config),
            load_seconds=seconds,
            dtype=self.dtype,
        )

    def _from_source(
        self, model_id: str, entry: ModelEntry, pipeline_class: type[DiffusionPipeline]
    ) -> DiffusionPipeline:
        local = Path(entry.source).exists()
        if not local and _looks_like_path(entry.source, entry.is_single_file):
            log.error("model %s: source %s does not exist", model_id, entry.source)
            raise ModelLoadError(f"The weights of model {model_id} are missing on this worker.")
        common: dict[str, Any] = {"dtype": self.dtype}
        if entry.family == "sd15" and entry.kind != "text2video":
            # The runner checks safety with the registry's checker; SDXL and video have none.
            common |= {"safety_checker": None, "requires_safety_checker": False}
        try:
            if entry.is_single_file:
                from_single_file = getattr(pipeline_class, "from_single_file", None)
                if from_single_file is None:
                    log.error("model %s: %s has no single-file loader", model_id, pipeline_class)
                    raise ModelLoadError(f"The model {model_id} is misconfigured on this worker.")
                config = entry.config
                # Offline, the architecture must come from a local diffusers folder; without one
                # diffusers guesses a hub repo from the checkpoint's keys.
                local_config = config is not None and Path(config).is_dir()
                pipe: DiffusionPipeline = from_single_file(
                    entry.source, config=config, local_files_only=local_config, **common
                )
                return pipe
            return pipeline_class.from_pretrained(entry.source, local_files_only=local, **common)
        except ModelLoadError:
            raise
        except Exception as exc:
            log.exception("model %s: loading %s failed", model_id, entry.source)
            raise ModelLoadError(f"The model {model_id} could not be loaded.") from exc


def _forget_adapter(pipe: DiffusionPipeline, name: str) -> None:
    # A load that failed halfway can leave layers injected under `name`; remove them so that a
    # later attempt starts clean. Nothing to do when nothing was injected.
    try:
        pipe.delete_adapters(name)
    except Exception:
        log.debug("adapter %s: nothing to remove after a failed load", name, exc_info=True)


def _looks_like_path(source: str, single_file: bool) -> bool:
    # Anything that is not "owner/name" is meant as a local path; a hub id is fetched (or read
    # from the local hub cache) by diffusers.
    return single_file or source.startswith(("/", "~", ".")) or source.count("/") != 1
