"""The per-process pipeline cache: each registry model is loaded once, on first use, and kept."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from dreamq.registry import ModelEntry, Registry
from dreamq.schedulers import resolve_scheduler_name

log = logging.getLogger("dreamq.models")

# Pipeline class per registry `kind`; only "image" is served by a pipeline module so far.
PIPELINE_CLASSES = {
    "image": "StableDiffusionPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "text2video": "TextToVideoSDPipeline",
}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelLoadError(Exception):
    """A model could not be served; ``message`` is safe to show clients (details go to logs)."""

    def __init__(self, public_message: str) -> None:
        super().__init__(public_message)
        self.message = public_message


class UnsupportedModelError(ModelLoadError, NotImplementedError):
    """The registry names a model family this release cannot run yet."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    entry: ModelEntry
    pipe: DiffusionPipeline
    # The scheduler config the model shipped with, copied before any job swaps schedulers.
    default_scheduler_config: dict[str, Any]
    load_seconds: float

    @property
    def default_scheduler(self) -> str | None:
        """The registry's scheduler for requests that name none (None: the model's own)."""
        return self.entry.default_scheduler


@dataclass(slots=True)
class CacheStats:
    loads: int = 0
    hits: int = 0
    load_seconds: float = 0.0


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


class PipelineCache:
    """Created once per worker process; ``get`` loads a model on first use and keeps it."""

    def __init__(self, registry: Registry, *, device: str = "auto", dtype: str = "auto") -> None:
        self._registry = registry
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.stats = CacheStats()
        self._loaded: dict[str, LoadedModel] = {}
        # One lock for all models: a worker runs one job at a time, and two threads loading the
        # same multi-GB model at once would only double the memory.
        self._lock = threading.Lock()

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            loaded = self._loaded.get(model_id)
            if loaded is not None:
                self.stats.hits += 1
                return loaded
            entry = self._registry.model(model_id)
            if entry is None:
                raise ModelLoadError(f"The model {model_id} is not served by this worker.")
            loaded = self._load(model_id, entry)
            self._loaded[model_id] = loaded
            self.stats.loads += 1
            self.stats.load_seconds += loaded.load_seconds
            return loaded

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _load(self, model_id: str, entry: ModelEntry) -> LoadedModel:
        if entry.family == "sdxl":
            raise UnsupportedModelError(
                f"The model {model_id} is an SDXL model; SDXL models arrive with a later release."
            )
        if entry.default_scheduler and resolve_scheduler_name(entry.default_scheduler) is None:
            log.error("model %s: unknown default_scheduler %r", model_id, entry.default_scheduler)
            raise ModelLoadError(f"The model {model_id} is misconfigured on this worker.")
        started = time.perf_counter()
        pipe = self._from_source(model_id, entry)
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
        )

    def _from_source(self, model_id: str, entry: ModelEntry) -> DiffusionPipeline:
        pipeline_class = getattr(diffusers, PIPELINE_CLASSES[entry.kind])
        local = Path(entry.source).exists()
        if not local and _looks_like_path(entry.source, entry.is_single_file):
            log.error("model %s: source %s does not exist", model_id, entry.source)
            raise ModelLoadError(f"The weights of model {model_id} are missing on this worker.")
        common: dict[str, Any] = {
            "dtype": self.dtype,
            "safety_checker": None,
            "requires_safety_checker": False,
        }
        try:
            if entry.is_single_file:
                config = entry.config
                # Offline, the architecture must come from a local diffusers folder; without one
                # diffusers guesses a hub repo from the checkpoint's keys.
                local_config = config is not None and Path(config).is_dir()
                return pipeline_class.from_single_file(
                    entry.source, config=config, local_files_only=local_config, **common
                )
            return pipeline_class.from_pretrained(entry.source, local_files_only=local, **common)
        except Exception as exc:
            log.exception("model %s: loading %s failed", model_id, entry.source)
            raise ModelLoadError(f"The model {model_id} could not be loaded.") from exc


def _looks_like_path(source: str, single_file: bool) -> bool:
    # Anything that is not "owner/name" is meant as a local path; a hub id is fetched (or read
    # from the local hub cache) by diffusers.
    return single_file or source.startswith(("/", "~", ".")) or source.count("/") != 1
