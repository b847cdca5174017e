"""Per-job features on the tiny demo models: each changes the image at the same seed, and none
leaks into the next job (a plain job afterwards is bit-equal to one from a worker that never ran
the feature)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dreamq.jobparams import LoraChoice
from dreamq.registry import EmbeddingEntry, LoraEntry, Registry, load_registry
from tests.support.generation import params, pixels
from workers.generate import Generator, JobRefused
from workers.models import ModelLoadError, PipelineCache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOKEN = "<demo-embedding>"


@pytest.fixture(scope="module")
def demo(demo_registry_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    registry = load_registry(demo_registry_file)
    # An SDXL embedding: one vector set per text encoder, as SDXL textual-inversion files hold.
    file = tmp_path_factory.mktemp("xl-embedding") / "xl.safetensors"
    generator = torch.Generator().manual_seed(3)
    save_file(
        {
            "clip_l": torch.randn(1, 32, generator=generator),
            "clip_g": torch.randn(1, 32, generator=generator),
        },
        str(file),
    )
    # A LoRA on the text encoder alone, keyed as kohya/diffusers files are ("text_model."
    # included, which diffusers strips for transformers 5's flattened CLIPTextModel).
    lora: dict[str, torch.Tensor] = {}
    for layer in range(2):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{projection}"
            lora[f"{key}.lora_A.weight"] = 0.2 * torch.randn(4, 32, generator=generator)
            lora[f"{key}.lora_B.weight"] = 0.5 * torch.randn(32, 4, generator=generator)
    lora_file = tmp_path_factory.mktemp("te-lora") / "te.safetensors"
    save_file(lora, str(lora_file))
    broken = tmp_path_factory.mktemp("broken-lora") / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    loras = {
        **registry.loras,
        "te-lora": LoraEntry(source=str(lora_file)),
        "broken": LoraEntry(source=str(broken)),
    }
    embeddings = {
        **registry.embeddings,
        "xl-embedding": EmbeddingEntry(source=str(file), family="sdxl", token=TOKEN),
        "untokened": EmbeddingEntry(source=registry.embeddings["demo-embedding"].source),
    }
    return registry.model_copy(update={"embeddings": embeddings, "loras": loras})


@pytest.fixture(scope="module")
def generator(demo: Registry) -> Generator:
    return Generator(PipelineCache(demo, device="cpu"), demo)


@pytest.fixture(scope="module")
def reference(demo: Registry) -> dict[str, np.ndarray]:
    """Plain images from a worker that never ran any feature."""
    clean = Generator(PipelineCache(demo, device="cpu"), demo)
    return {
        "demo": pixels(clean.run("demo", params())),
        "demo-xl": pixels(clean.run("demo-xl", params())),
        "embedding-prompt": pixels(clean.run("demo", params(prompt=f"a {TOKEN} fox"))),
    }


def assert_plain(generator: Generator, reference: dict[str, np.ndarray], model_id: str) -> None:
    assert np.array_equal(pixels(generator.run(model_id, params())), reference[model_id])


# --- LoRA --------------------------------------------------------------------------------------


def test_lora_changes_the_image_and_leaves_no_trace(
    generator: Generator, reference: dict[str, np.ndarray]
) -> None:
    a = pixels(generator.run("demo", params(loras=(LoraChoice("demo-lora-a"),))))
    b = pixels(generator.run("demo", params(loras=(LoraChoice("demo-lora-b"),))))
    both = pixels(
        generator.run(
            "demo", params(loras=(LoraChoice("demo-lora-a"), LoraChoice("demo-lora-b", 0.5)))
        )
    )
    assert not np.array_equal(a, reference["demo"])
    assert not np.array_equal(a, b)
    assert not np.array_equal(both, a) and not np.array_equal(both, b)
    again = pixels(generator.run("demo", params(loras=(LoraChoice("demo-lora-a"),))))
    assert np.array_equal(a, again)
    # Disabled peft layers compute the base layer alone: bit-equal to a worker without LoRAs.
    assert_plain(generator, reference, "demo")


def test_a_lora_that_fails_to_load_leaves_no_trace(
    generator: Generator, reference: dict[str, np.ndarray]
) -> None:
    """The first LoRA loads (and peft makes it active), the second fails: the job fails, and
    the next job without LoRA, which switches nothing itself, still gets the plain image."""
    with pytest.raises(ModelLoadError, match="The LoRA broken could not be loaded"):
        generator.run("demo", params(loras=(LoraChoice("demo-lora-b"), LoraChoice("broken"))))
    assert_plain(generator, reference, "demo")


def test_text_encoder_lora(generator: Generator, reference: dict[str, np.ndarray]) -> None:
    encoded = generator.run(
        "demo", params(loras=(LoraChoice("te-lora"), LoraChoice("demo-lora-a")))
    )
    unet_only = generator.run("demo", params(loras=(LoraChoice("demo-lora-a"),)))
    assert not np.array_equal(pixels(encoded), pixels(unet_only))
    assert_plain(generator, reference, "demo")


def test_lora_strength_zero_is_the_base_image(
    generator: Generator, reference: dict[str, np.ndarray]
) -> None:
    zero = generator.run("demo", params(loras=(LoraChoice("demo-lora-a", 0.0),)))
    assert np.array_equal(pixels(zero), reference["demo"])


def test_loras_apply_to_task_pipelines(generator: Generator) -> None:
    plain = pixels(generator.run("demo", params(self_attention=True)))
    lora = pixels(
        generator.run("demo", params(self_attention=True, loras=(LoraChoice("demo-lora-a"),)))
    )
    assert not np.array_equal(plain, lora)


def test_sdxl_lora(generator: Generator, reference: dict[str, np.ndarray]) -> None:
    lora = generator.run("demo-xl", params(loras=(LoraChoice("demo-lora-xl"),)))
    assert not np.array_equal(pixels(lora), reference["demo-xl"])
    assert_plain(generator, reference, "demo-xl")


# --- embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["demo", "demo-xl"])
def test_embedding_is_known_for_its_job_only(
    generator: Generator, model_id: str, reference: dict[str, np.ndarray]
) -> None:
    embedding = "demo-embedding" if model_id == "demo" else "xl-embedding"
    prompt = f"a {TOKEN} fox"
    loaded = generator._cache.get(model_id)
    vocabulary = len(loaded.pipe.tokenizer)
    without = pixels(generator.run(model_id, params(prompt=prompt)))
    with_embedding = pixels(generator.run(model_id, params(prompt=prompt, embedding=embedding)))
    after = pixels(generator.run(model_id, params(prompt=prompt)))
    assert not np.array_equal(without, with_embedding)
    assert np.array_equal(without, after)
    assert len(loaded.pipe.tokenizer) == vocabulary
    assert TOKEN not in loaded.pipe.tokenizer.get_added_vocab()
    assert loaded.pipe.text_encoder.get_input_embeddings().num_embeddings == vocabulary
    if model_id == "demo":
        assert np.array_equal(without, reference["embedding-prompt"])
    assert_plain(generator, reference, model_id)


def test_embedding_token_defaults_to_its_id(generator: Generator) -> None:
    without = pixels(generator.run("demo", params(prompt="a untokened fox")))
    used = pixels(generator.run("demo", params(prompt="a untokened fox", embedding="untokened")))
    assert not np.array_equal(without, used)


def test_an_sd_embedding_file_is_refused_for_sdxl(demo: Registry) -> None:
    embeddings = {
        "wrong": EmbeddingEntry(source=demo.embeddings["demo-embedding"].source, family="sdxl")
    }
    registry = demo.model_copy(update={"embeddings": embeddings})
    generator = Generator(PipelineCache(registry, device="cpu"), registry)
    with pytest.raises(Exception, match="The embedding wrong has no SDXL vectors") as caught:
        generator.run("demo-xl", params(embedding="wrong"))
    assert type(caught.value).__name__ == "ModelLoadError"


# --- VAE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_id", "vae"), [("demo", "demo-vae"), ("demo-xl", "demo-vae-xl")])
def test_vae_is_used_for_its_job_only(
    generator: Generator, reference: dict[str, np.ndarray], model_id: str, vae: str
) -> None:
    loaded = generator._cache.get(model_id)
    own = loaded.pipe.vae
    replaced = generator.run(model_id, params(vae=vae))
    assert not np.array_equal(pixels(replaced), reference[model_id])
    assert loaded.pipe.vae is own
    assert all(variant.vae is own for variant in loaded.variants.values())
    assert_plain(generator, reference, model_id)


def test_vae_applies_to_both_highres_passes(generator: Generator) -> None:
    job = params(width=128, highres_fix=True)
    assert not np.array_equal(
        pixels(generator.run("demo", job)),
        pixels(generator.run("demo", job.__class__(**{**job.to_dict(), "vae": "demo-vae"}))),
    )
    loaded = generator._cache.get("demo")
    assert loaded.pipeline("img2img").vae is loaded.pipe.vae


# --- clip skip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["demo", "demo-video"])
def test_clip_skip_changes_the_image(
    generator: Generator, reference: dict[str, np.ndarray], model_id: str
) -> None:
    kind = "text2video" if model_id == "demo-video" else "txt2img"
    skipped = pixels(generator.run(model_id, params(kind, clip_skip=2)))
    plain = pixels(generator.run(model_id, params(kind)))
    assert not np.array_equal(skipped, plain)
    # The compat shim is gone after the job.
    assert not hasattr(generator._cache.get(model_id).pipe.text_encoder, "text_model")
    assert_plain(generator, reference, "demo")


@pytest.mark.parametrize(
    ("model_id", "clip_skip", "message"),
    [
        # 2 layers: clip_skip 2 reads the first; SDXL already reads the penultimate.
        ("demo", 3, "The clip_skip 3 is beyond this model's text encoder (2 layers): at most 2."),
        (
            "demo-xl",
            2,
            "The clip_skip 2 is beyond this model's text encoder (2 layers): at most 1.",
        ),
    ],
)
def test_clip_skip_beyond_the_encoder_is_refused(
    generator: Generator, model_id: str, clip_skip: int, message: str
) -> None:
    with pytest.raises(JobRefused) as caught:
        generator.run(model_id, params(clip_skip=clip_skip))
    assert caught.value.fields == {"clip_skip": [message]}


def test_clip_skip_beyond_the_encoder_fails_in_diffusers(generator: Generator) -> None:
    # What the refusal spares clients: one layer further still runs on the token embeddings,
    # two further raise.
    sd = generator._cache.get("demo").pipe
    xl = generator._cache.get("demo-xl").pipe
    with pytest.raises(IndexError):
        xl("a fox", width=64, height=64, num_inference_steps=1, clip_skip=2)
    from workers.pipelines import features

    with features.clip_skip(sd, True), pytest.raises(IndexError):
        sd("a fox", width=64, height=64, num_inference_steps=1, clip_skip=3)


# --- token merging -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["demo", "demo-xl"])
def test_tomesd_changes_the_image_reproducibly(
    generator: Generator, reference: dict[str, np.ndarray], model_id: str
) -> None:
    merged = pixels(generator.run(model_id, params(tomesd=True)))
    again = pixels(generator.run(model_id, params(tomesd=True)))
    assert not np.array_equal(merged, reference[model_id])
    assert np.array_equal(merged, again)
    unet = generator._cache.get(model_id).pipe.unet
    assert not any(type(m).__name__ == "ToMeBlock" for m in unet.modules())
    assert_plain(generator, reference, model_id)


# --- panorama ----------------------------------------------------------------------------------


def test_panorama_changes_the_image(generator: Generator, reference: dict[str, np.ndarray]) -> None:
    # One step without guidance keeps the wide tiny image cheap.
    # A side just over one window; one step without guidance, 16 pixels high: a wide image
    # is costly on the tiny models. Sample i is seeded seed + i, one call per sample.
    base: dict[str, Any] = {"width": 520, "height": 16, "steps": 1, "guidance_scale": 1.0}
    pair = generator.run("demo", params(samples=2, seed=5, panorama=True, **base))
    single = generator.run("demo", params(seed=6, panorama=True, **base))
    plain = generator.run("demo", params(seed=6, **base))
    assert [image.size for image in pair.images] == [(520, 16)] * 2
    assert np.array_equal(pixels(pair, 1), pixels(single))
    assert not np.array_equal(pixels(single), pixels(plain))
    assert_plain(generator, reference, "demo")


def test_diffusers_panorama_mixes_up_batched_samples(generator: Generator) -> None:
    # The reason for one call per sample: with guidance, the batched pipeline denoises sample 0
    # with the negative prompt alone (a single window shows it as well as a panorama).
    from workers.pipelines.panorama import PanoramaPipeline

    pipe = generator._cache.get("demo").pipeline("panorama")
    assert isinstance(pipe, PanoramaPipeline)
    arguments: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 2}
    with torch.inference_mode():
        batched = pipe(
            "a fox",
            negative_prompt="blurry",
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
            **arguments,
        ).images
        single = pipe(
            "a fox",
            negative_prompt="blurry",
            generator=torch.Generator().manual_seed(0),
            **arguments,
        ).images
    assert np.abs(np.asarray(batched[0]).astype(int) - np.asarray(single[0]).astype(int)).max() > 1


@pytest.mark.parametrize(
    ("width", "factor", "expected"),
    [
        # diffusers' own grid for SD: 64-latent windows every 8 latents.
        (576, 8, [0, 8]),
        (1024, 8, [0, 8, 16, 24, 32, 40, 48, 56, 64]),
        # diffusers leaves latents 64..65 uncovered here; a flush last window covers them.
        (528, 8, [0, 2]),
        (512, 8, [0]),
        (64, 8, [0]),
        # The tiny VAE's factor 2: the same 512-pixel windows are 256 latents.
        (576, 2, [0, 32]),
    ],
)
def test_panorama_windows_cover_the_image(width: int, factor: int, expected: list[int]) -> None:
    from workers.pipelines.panorama import PanoramaPipeline

    pipe = PanoramaPipeline.__new__(PanoramaPipeline)
    pipe.vae_scale_factor = factor
    views = pipe.get_views(64, width)
    assert [left for _, _, left, _ in views] == expected
    window = 512 // factor
    covered = np.zeros(width // factor, dtype=bool)
    for _, _, left, right in views:
        assert right - left == window
        covered[left:right] = True
    assert covered.all()


# --- self-attention guidance --------------------------------------------------------------------


def test_self_attention_changes_the_image(
    generator: Generator, reference: dict[str, np.ndarray]
) -> None:
    unet = generator._cache.get("demo").pipe.unet
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    guided = generator.run("demo", params(self_attention=True))
    assert not np.array_equal(pixels(guided), reference["demo"])
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    assert_plain(generator, reference, "demo")


def test_a_failed_sag_job_restores_the_attention_processors(
    generator: Generator, reference: dict[str, np.ndarray]
) -> None:
    def fail(done: int, total: int) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        generator.run("demo", params(self_attention=True, tomesd=True), on_step=fail)
    assert_plain(generator, reference, "demo")


def test_self_attention_refuses_the_model_own_sigma_scheduler(demo: Registry) -> None:
    # A model whose own scheduler is Euler (common for community SD 1.5 models): only the worker
    # knows, after loading.
    cache = PipelineCache(demo, device="cpu")
    cache.get("demo").default_scheduler_config["_class_name"] = "EulerDiscreteScheduler"
    with pytest.raises(JobRefused, match="not served with EulerDiscreteScheduler"):
        Generator(cache, demo).run("demo", params(self_attention=True))


# --- highres fix --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["demo", "demo-xl"])
def test_highres_fix_is_two_passes(
    generator: Generator, reference: dict[str, np.ndarray], model_id: str
) -> None:
    job = params(width=128, steps=2)
    fixed = generator.run(model_id, job.__class__(**{**job.to_dict(), "highres_fix": True}))
    plain = generator.run(model_id, job)
    assert fixed.images[0].size == (128, 32)
    assert not np.array_equal(pixels(fixed), pixels(plain))
    assert_plain(generator, reference, model_id)


def test_highres_first_pass_size() -> None:
    from workers.pipelines.txt2img import highres_first_size

    assert [highres_first_size(size) for size in (1024, 512, 200, 128, 96, 64, 56)] == [
        512,
        256,
        96,
        64,
        64,
        64,
        56,
    ]


def test_features_combine(generator: Generator, reference: dict[str, np.ndarray]) -> None:
    job = params(
        width=128,
        self_attention=True,
        highres_fix=True,
        tomesd=True,
        clip_skip=2,
        loras=(LoraChoice("demo-lora-a", 0.7),),
        embedding="demo-embedding",
        prompt=f"a {TOKEN} fox",
        vae="demo-vae",
        samples=2,
    )
    result = generator.run("demo", job)
    assert [image.size for image in result.images] == [(128, 32)] * 2
    assert_plain(generator, reference, "demo")


@pytest.mark.parametrize(
    ("model_id", "kind", "changes"),
    [
        (
            "demo",
            "img2img",
            {"loras": (LoraChoice("demo-lora-b"),), "tomesd": True, "clip_skip": 2},
        ),
        (
            "demo-inpaint",
            "inpaint",
            {
                "loras": (LoraChoice("demo-lora-a"),),
                "embedding": "demo-embedding",
                "vae": "demo-vae",
                "tomesd": True,
                "clip_skip": 2,
            },
        ),
        (
            "demo-xl",
            "inpaint",
            {
                "loras": (LoraChoice("demo-lora-xl"),),
                "embedding": "xl-embedding",
                "vae": "demo-vae-xl",
                "tomesd": True,
            },
        ),
        ("demo-xl", "img2img", {"loras": (LoraChoice("demo-lora-xl", 0.3),), "tomesd": True}),
        ("demo-video", "text2video", {"embedding": "demo-embedding", "vae": "demo-vae"}),
        (
            "demo",
            "txt2img",
            {
                "panorama": True,
                "width": 520,
                "height": 16,
                "steps": 1,
                "loras": (LoraChoice("demo-lora-a"),),
                "tomesd": True,
                "clip_skip": 2,
                "embedding": "demo-embedding",
                "vae": "demo-vae",
            },
        ),
    ],
)
def test_allowed_combinations_run(
    generator: Generator,
    demo: Registry,
    reference: dict[str, np.ndarray],
    model_id: str,
    kind: str,
    changes: dict[str, Any],
) -> None:
    from PIL import Image

    from dreamq.capabilities import refusals
    from dreamq.jobparams import ImageInput

    image = ImageInput(url="https://example.com/a.png")
    inputs: dict[str, Any] = {}
    if kind in ("img2img", "inpaint"):
        changes = changes | {"init_image": image}
        inputs["init_image"] = Image.new("RGB", (32, 32), "orange")
    if kind == "inpaint":
        changes = changes | {"mask_image": image}
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (8, 8, 24, 24))
        inputs["mask_image"] = mask
    job = params(kind, prompt=f"a {TOKEN} fox", **changes)
    assert refusals(demo.models[model_id], job, demo) == {}
    result = generator.run(model_id, job, **inputs)
    assert result.images and all(
        image.size == (result.width, result.height) for image in result.images
    )
    assert_plain(generator, reference, "demo" if model_id != "demo-xl" else "demo-xl")
