"""PipelineCache: one weight load per model shared by every task, adapters and VAEs loaded once,
idle models unloaded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreamq.registry import LoraEntry, ModelEntry, Registry, VaeEntry, load_registry
from workers.models import ModelLoadError, PipelineCache, adapter_name
from workers.pipelines.panorama import PanoramaPipeline
from workers.tiny import build_tiny_sd, to_ldm_checkpoint, write_tiny_sd, write_tiny_sd_single_file

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def demo(demo_registry_file: Path) -> Registry:
    return load_registry(demo_registry_file)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, demo: Registry) -> Registry:
    folder = write_tiny_sd(tmp_path_factory.mktemp("folder"))
    file, config = write_tiny_sd_single_file(tmp_path_factory.mktemp("single"))
    missing = tmp_path_factory.mktemp("gone") / "missing.safetensors"
    broken_lora = tmp_path_factory.mktemp("broken-lora") / "lora.safetensors"
    save_file({"unet.nothing.lora_A.weight": torch.zeros(4, 4)}, str(broken_lora))
    # The tiny VAE in the original LDM layout, as community VAE files come.
    vae_file = tmp_path_factory.mktemp("vae-file") / "vae.safetensors"
    weights = to_ldm_checkpoint(build_tiny_sd(seed=5))
    save_file({k: v for k, v in weights.items() if k.startswith("first_stage_model.")}, vae_file)
    return Registry(
        models={
            "tiny": ModelEntry(source=str(folder)),
            "tiny-file": ModelEntry(source=str(file), config=str(config)),
            "gone": ModelEntry(source=str(missing), config=str(config)),
            "gone-folder": ModelEntry(source=str(missing.parent / "no-such-folder")),
            "bad-scheduler": ModelEntry(source=str(folder), default_scheduler="Nope"),
            # A 4-channel UNet registered as an inpainting model, and the reverse.
            "wrong-kind": ModelEntry(source=str(folder), kind="inpaint"),
            "wrong-kind-9": ModelEntry(source=demo.models["demo-inpaint"].source),
            "video-file": ModelEntry(source=str(file), config=str(config), kind="text2video"),
            "video-xl": ModelEntry(source=str(folder), kind="text2video", family="sdxl"),
            **demo.models,
        },
        loras={**demo.loras, "broken": LoraEntry(source=str(broken_lora))},
        vaes={**demo.vaes, "vae-file": VaeEntry(source=str(vae_file))},
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(registry: Registry, clock: FakeClock) -> PipelineCache:
    return PipelineCache(registry, device="cpu", dtype="auto", idle_seconds=60, clock=clock)


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
    ("model_id", "pipeline"),
    [
        ("demo", "StableDiffusionPipeline"),
        ("demo-inpaint", "StableDiffusionInpaintPipeline"),
        ("demo-xl", "StableDiffusionXLPipeline"),
        ("demo-video", "TextToVideoSDPipeline"),
    ],
)
def test_each_family_and_kind_loads_its_pipeline(
    cache: PipelineCache, model_id: str, pipeline: str
) -> None:
    assert type(cache.get(model_id).pipe).__name__ == pipeline


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("unknown", "The model unknown is not served by this worker."),
        ("gone", "The weights of model gone are missing on this worker."),
        ("gone-folder", "The weights of model gone-folder are missing on this worker."),
        ("bad-scheduler", "The model bad-scheduler is misconfigured on this worker."),
        ("wrong-kind", "The model wrong-kind is misconfigured on this worker."),
        ("wrong-kind-9", "The model wrong-kind-9 is misconfigured on this worker."),
        ("video-file", "The model video-file is misconfigured on this worker."),
        ("video-xl", "The model video-xl is misconfigured on this worker."),
    ],
)
def test_unservable_models_raise_a_public_error(
    cache: PipelineCache, model_id: str, message: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        cache.get(model_id)
    assert caught.value.message == message
    assert cache.loaded_ids() == []


@pytest.mark.parametrize(
    ("model_id", "tasks"),
    [
        ("demo", ("img2img", "inpaint", "panorama", "self_attention")),
        ("demo-xl", ("img2img", "inpaint")),
    ],
)
def test_task_pipelines_share_the_weights(
    cache: PipelineCache, model_id: str, tasks: tuple[str, ...]
) -> None:
    loaded = cache.get(model_id)
    base = loaded.pipe
    for task in tasks:
        variant = loaded.pipeline(task)  # type: ignore[arg-type]
        assert variant is not base
        assert loaded.pipeline(task) is variant  # type: ignore[arg-type]
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            assert getattr(variant, name) is getattr(base, name), (task, name)
    if model_id == "demo":
        assert isinstance(loaded.pipeline("panorama"), PanoramaPipeline)
    assert loaded.pipeline("txt2img") is base
    assert cache.stats.loads == 1


def test_kind_inpaint_serves_inpainting_from_its_base(cache: PipelineCache) -> None:
    loaded = cache.get("demo-inpaint")
    assert loaded.pipeline("inpaint") is loaded.pipe
    with pytest.raises(ModelLoadError, match="cannot run panorama"):
        cache.get("demo-xl").pipeline("panorama")


def test_task_pipelines_keep_the_model_dtype(registry: Registry) -> None:
    # from_pipe casts the shared components to float32 unless told the dtype.
    cache = PipelineCache(registry, device="cpu", dtype="bfloat16")
    loaded = cache.get("demo")
    loaded.pipeline("img2img")
    loaded.pipeline("self_attention")
    assert loaded.pipe.unet.dtype == torch.bfloat16
    assert loaded.pipe.text_encoder.dtype == torch.bfloat16


def test_warm_reports_the_load_once(registry: Registry, clock: FakeClock) -> None:
    loads: list[tuple[str, float]] = []
    cache = PipelineCache(registry, device="cpu", clock=clock, on_load=lambda *a: loads.append(a))
    seconds = cache.warm("tiny")
    assert seconds > 0
    assert cache.warm("tiny") == 0.0
    assert cache.stats.loads == 1
    assert loads == [("tiny", seconds)]
    with pytest.raises(ModelLoadError, match="not served"):
        cache.warm("unknown")


def test_idle_models_are_unloaded(cache: PipelineCache, clock: FakeClock) -> None:
    loaded = cache.get("demo")
    loaded.pipeline("img2img")
    cache.lora_adapter(loaded, "demo-lora-a")
    clock.now += 30
    cache.get("tiny")
    clock.now += 45  # demo idle 75 s, tiny 45 s
    assert cache.unload_idle() == ["demo"]
    assert cache.loaded_ids() == ["tiny"]
    assert cache.stats.unloads == 1
    assert loaded.variants == {} and loaded.adapters == {}
    clock.now += 61
    assert cache.unload_idle() == ["tiny"]
    assert cache.unload_idle() == []
    # Back on next use, a fresh load.
    assert cache.get("demo") is not loaded
    assert cache.stats.loads == 3


def test_no_idle_limit_keeps_everything(registry: Registry, clock: FakeClock) -> None:
    cache = PipelineCache(registry, device="cpu", clock=clock)
    cache.get("tiny")
    clock.now += 10**9
    assert cache.unload_idle() == []
    assert cache.loaded_ids() == ["tiny"]


def test_a_model_in_use_is_not_unloaded(cache: PipelineCache, clock: FakeClock) -> None:
    unloaded: list[list[str]] = []
    with cache.use("tiny"):
        clock.now += 600
        # The idle sweep runs on another thread (a timer) while the job holds the model.
        sweep = threading.Thread(target=lambda: unloaded.append(cache.unload_idle()))
        sweep.start()
        sweep.join()
    assert unloaded == [[]]
    # Idle time counts from the job's end.
    clock.now += 59
    assert cache.unload_idle() == []
    clock.now += 2
    assert cache.unload_idle() == ["tiny"]


def test_unloading_frees_cuda_memory(
    cache: PipelineCache, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    cache.get("tiny")
    clock.now += 61
    cache.device = "cuda"  # as if loaded on a GPU; only the unload path reads it
    assert cache.unload_idle() == ["tiny"]
    assert emptied == [True]


def test_a_lora_loads_once_per_model(cache: PipelineCache) -> None:
    loaded = cache.get("demo")
    name = cache.lora_adapter(loaded, "demo-lora-a")
    assert cache.lora_adapter(loaded, "demo-lora-a") == name
    assert loaded.pipe.get_list_adapters() == {"unet": [name]}
    assert loaded.adapters == {"demo-lora-a": name}


@pytest.mark.parametrize(
    ("lora_id", "message"),
    [
        ("nope", "The LoRA nope is not available."),
        ("broken", "The LoRA broken could not be loaded for the model demo."),
    ],
)
def test_unusable_loras_raise_a_public_error(
    cache: PipelineCache, lora_id: str, message: str
) -> None:
    loaded = cache.get("demo")
    with pytest.raises(ModelLoadError) as caught:
        cache.lora_adapter(loaded, lora_id)
    assert caught.value.message == message
    assert loaded.adapters == {}


def test_adapter_names_are_safe_and_distinct() -> None:
    assert adapter_name("more_details").startswith("more_details_")
    assert "." not in adapter_name("v1.5-style") and "-" not in adapter_name("v1.5-style")
    assert adapter_name("a-b") != adapter_name("a.b")


def test_a_vae_loads_once_on_the_cache_device(cache: PipelineCache, clock: FakeClock) -> None:
    loaded = cache.get("demo")
    vae = cache.vae("demo-vae", loaded)
    assert cache.vae("demo-vae", loaded) is vae
    assert vae is not loaded.pipe.vae
    assert (vae.device.type, vae.dtype) == ("cpu", cache.dtype)
    clock.now += 61
    cache.unload_idle()
    assert cache.vae("demo-vae", cache.get("demo")) is not vae
    with pytest.raises(ModelLoadError, match="The VAE nope is not available"):
        cache.vae("nope", loaded)


def test_a_single_file_vae_takes_the_model_architecture(cache: PipelineCache) -> None:
    loaded = cache.get("tiny")
    vae = cache.vae("vae-file", loaded)
    expected = build_tiny_sd(seed=5).vae.state_dict()
    assert torch.equal(
        vae.state_dict()["decoder.conv_out.weight"], expected["decoder.conv_out.weight"]
    )


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
