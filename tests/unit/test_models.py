"""PipelineCache: loads each registry model once, from a diffusers folder or a single file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dreamq.registry import ModelEntry, Registry
from workers.models import ModelLoadError, PipelineCache, UnsupportedModelError
from workers.tiny import write_tiny_sd, write_tiny_sd_single_file


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    folder = write_tiny_sd(tmp_path_factory.mktemp("folder"))
    file, config = write_tiny_sd_single_file(tmp_path_factory.mktemp("single"))
    missing = tmp_path_factory.mktemp("gone") / "missing.safetensors"
    return Registry(
        models={
            "tiny": ModelEntry(source=str(folder)),
            "tiny-file": ModelEntry(source=str(file), config=str(config)),
            "gone": ModelEntry(source=str(missing), config=str(config)),
            "gone-folder": ModelEntry(source=str(missing.parent / "no-such-folder")),
            "xl": ModelEntry(source=str(folder), family="sdxl"),
            "bad-scheduler": ModelEntry(source=str(folder), default_scheduler="Nope"),
        }
    )


@pytest.fixture
def cache(registry: Registry) -> PipelineCache:
    return PipelineCache(registry, device="auto", dtype="auto")


def test_loads_once_and_reuses(cache: PipelineCache, registry: Registry) -> None:
    loaded = cache.get("tiny")
    assert cache.get("tiny") is loaded
    assert (cache.stats.loads, cache.stats.hits) == (1, 1)
    assert cache.loaded_ids() == ["tiny"]
    assert loaded.load_seconds > 0
    assert loaded.entry is registry.models["tiny"]
    assert loaded.default_scheduler_config["_class_name"] == "PNDMScheduler"
    assert loaded.pipe.safety_checker is None
    # A copy: a job swapping pipe.scheduler cannot change the default it restores from.
    assert loaded.default_scheduler_config is not loaded.pipe.scheduler.config


def test_concurrent_first_use_loads_once(cache: PipelineCache) -> None:
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("tiny"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(result) for result in results}) == 1
    assert cache.stats.loads == 1


def test_loads_a_single_file_entry(cache: PipelineCache) -> None:
    loaded = cache.get("tiny-file")
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"
    assert loaded.pipe.device.type == cache.device
    assert loaded.pipe.unet.dtype == cache.dtype


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("unknown", "The model unknown is not served by this worker."),
        ("gone", "The weights of model gone are missing on this worker."),
        ("gone-folder", "The weights of model gone-folder are missing on this worker."),
        ("bad-scheduler", "The model bad-scheduler is misconfigured on this worker."),
    ],
)
def test_unservable_models_raise_a_public_error(
    cache: PipelineCache, model_id: str, message: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        cache.get(model_id)
    assert caught.value.message == message
    assert cache.loaded_ids() == []


def test_sdxl_is_not_yet_supported(cache: PipelineCache) -> None:
    with pytest.raises(UnsupportedModelError, match="SDXL models arrive with a later release"):
        cache.get("xl")
    assert issubclass(UnsupportedModelError, NotImplementedError)


def test_explicit_device_and_dtype(registry: Registry) -> None:
    cache = PipelineCache(registry, device="cpu", dtype="bfloat16")
    assert (cache.device, str(cache.dtype)) == ("cpu", "torch.bfloat16")
    with pytest.raises(ValueError, match="unknown dtype"):
        PipelineCache(registry, dtype="float8")


def test_a_load_failure_is_not_cached(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    cache = PipelineCache(Registry(models={"broken": ModelEntry(source=str(broken))}))
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="could not be loaded"):
            cache.get("broken")
    assert cache.stats.loads == 0
