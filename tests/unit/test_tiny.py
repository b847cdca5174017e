"""The tiny model writers: deterministic weights, a single-file checkpoint in the original LDM
layout that diffusers' own from_single_file loads back to the same pipeline, and every artefact of
the demo registry (SDXL, video, inpainting, LoRAs, embedding, VAE, helper models) working through
the loader a real one takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionInpaintPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, CLIPImageProcessor

from dreamq.cli import parser
from dreamq.registry import load_registry
from workers.tiny import (
    TINY_KINDS,
    build_tiny_sd,
    main_tiny_model,
    write_tiny_embedding,
    write_tiny_lora,
    write_tiny_sd,
    write_tiny_sd_single_file,
    write_tiny_translator,
)


@pytest.fixture(scope="module")
def folder_and_single_file(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[StableDiffusionPipeline, StableDiffusionPipeline, Path]:
    folder = write_tiny_sd(tmp_path_factory.mktemp("folder"), seed=3)
    file, config = write_tiny_sd_single_file(tmp_path_factory.mktemp("single"), seed=3)
    from_folder = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    from_file = StableDiffusionPipeline.from_single_file(
        str(file), config=str(config), local_files_only=True
    )
    for pipe in (from_folder, from_file):
        pipe.set_progress_bar_config(disable=True)
    return from_folder, from_file, file


def _generate(pipe: StableDiffusionPipeline) -> torch.Tensor:
    images: torch.Tensor = pipe(
        "a red bicycle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(11),
        output_type="pt",
    ).images
    return images


def test_single_file_loads_the_same_weights(
    folder_and_single_file: tuple[StableDiffusionPipeline, StableDiffusionPipeline, Path],
) -> None:
    from_folder, from_file, _ = folder_and_single_file
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(from_folder, name).state_dict()
        loaded = getattr(from_file, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        unequal = [key for key in expected if not torch.equal(expected[key], loaded[key])]
        assert unequal == [], name
    assert from_file.scheduler.config == from_folder.scheduler.config
    assert from_file.safety_checker is None


def test_single_file_generates_the_same_image(
    folder_and_single_file: tuple[StableDiffusionPipeline, StableDiffusionPipeline, Path],
) -> None:
    from_folder, from_file, _ = folder_and_single_file
    expected = _generate(from_folder)
    assert expected.shape == (1, 3, 64, 64)
    assert torch.equal(_generate(from_file), expected)


def test_single_file_uses_the_original_key_layout(
    folder_and_single_file: tuple[StableDiffusionPipeline, StableDiffusionPipeline, Path],
) -> None:
    keys = load_file(str(folder_and_single_file[2])).keys()
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."}
    assert all(any(key.startswith(prefix) for prefix in prefixes) for key in keys)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys


def test_weights_follow_the_seed() -> None:
    first, again, other = (build_tiny_sd(seed=seed).unet.conv_in.weight for seed in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_tokenizer_round_trips_through_the_folder(
    folder_and_single_file: tuple[StableDiffusionPipeline, StableDiffusionPipeline, Path],
) -> None:
    tokenizer = folder_and_single_file[0].tokenizer
    ids = tokenizer("a cat, é", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < folder_and_single_file[0].text_encoder.config.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "acat,é"


# --- the demo registry and everything in it ---------------------------------------------------

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def demo(demo_registry_file: Path) -> Path:
    """The folder of the demo registry (written once per session by tests/conftest.py)."""
    return demo_registry_file.parent


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe: Any, prompt: str = PROMPT, **kwargs: Any) -> np.ndarray:
    """A 64x64, 2-step image batch as floats in [0, 1], with a fixed noise seed."""
    settings: dict[str, Any] = {"num_inference_steps": 2, "height": 64, "width": 64}
    images: np.ndarray = pipe(
        prompt,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **(settings | kwargs),
    ).images
    return images


def _levels(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference between two images in 8-bit pixel levels."""
    return float(np.abs(a - b).max() * 255)


@pytest.fixture(scope="module")
def sd(demo: Path) -> StableDiffusionPipeline:
    return _quiet(StableDiffusionPipeline.from_pretrained(demo / "demo", local_files_only=True))


@pytest.fixture(scope="module")
def sdxl(demo: Path) -> StableDiffusionXLPipeline:
    return _quiet(
        StableDiffusionXLPipeline.from_pretrained(demo / "demo-xl", local_files_only=True)
    )


@pytest.fixture(scope="module")
def init_image_and_mask() -> tuple[Image.Image, Image.Image]:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return Image.fromarray(pixels), mask


def test_demo_registry_names_every_artefact(demo_registry_file: Path) -> None:
    registry = load_registry(demo_registry_file)
    assert set(registry.models) == {"demo", "demo-xl", "demo-video", "demo-inpaint"}
    assert set(registry.loras) == {"demo-lora-a", "demo-lora-b", "demo-lora-xl"}
    assert set(registry.embeddings) == {"demo-embedding"}
    assert set(registry.vaes) == {"demo-vae", "demo-vae-xl"}
    assert (registry.models["demo-xl"].family, registry.loras["demo-lora-xl"].family) == (
        "sdxl",
        "sdxl",
    )
    assert registry.vaes["demo-vae-xl"].family == "sdxl"
    assert registry.models["demo-video"].kind == "text2video"
    assert registry.models["demo-inpaint"].kind == "inpaint"
    assert registry.embeddings["demo-embedding"].token == "<demo-embedding>"
    entries = [
        *registry.models.values(),
        *registry.loras.values(),
        *registry.embeddings.values(),
        *registry.vaes.values(),
        registry.safety_checker,
        registry.upscaler,
        registry.translator,
    ]
    for entry in entries:
        assert entry is not None
        assert Path(entry.source).is_absolute(), entry
        assert Path(entry.source).exists(), entry
    # Relative sources: the folder can move.
    assert not Path(demo_registry_file.read_text().split("source: ")[1].split()[0]).is_absolute()
    assert "NSFW" in demo_registry_file.read_text()


def test_inpaint_model_has_a_nine_channel_unet(
    demo: Path, init_image_and_mask: tuple[Image.Image, Image.Image]
) -> None:
    pipe = _quiet(
        StableDiffusionInpaintPipeline.from_pretrained(demo / "demo-inpaint", local_files_only=True)
    )
    assert pipe.unet.config.in_channels == 9
    image, mask = init_image_and_mask
    assert _images(pipe, image=image, mask_image=mask).shape == (1, 64, 64, 3)


def test_sdxl_generates_and_serves_img2img_and_inpaint(
    sdxl: StableDiffusionXLPipeline, init_image_and_mask: tuple[Image.Image, Image.Image]
) -> None:
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == (
        sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    )
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert _images(sdxl).shape == (1, 64, 64, 3)
    image, mask = init_image_and_mask
    img2img = _quiet(StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl))
    assert _images(img2img, image=image, strength=0.8).shape == (1, 64, 64, 3)
    inpaint = _quiet(StableDiffusionXLInpaintPipeline.from_pipe(sdxl))
    assert _images(inpaint, image=image, mask_image=mask).shape == (1, 64, 64, 3)


def test_video_model_generates_eight_frames(demo: Path) -> None:
    pipe = _quiet(TextToVideoSDPipeline.from_pretrained(demo / "demo-video", local_files_only=True))
    frames = pipe(
        PROMPT,
        num_frames=8,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).frames
    assert np.asarray(frames).shape == (1, 8, 64, 64, 3)


@pytest.mark.parametrize(
    ("family", "model", "lora_a", "lora_b"),
    [
        ("sd15", "sd", "demo-lora-a", "demo-lora-b"),
        ("sdxl", "sdxl", "demo-lora-xl", None),
    ],
)
def test_lora_changes_the_image_by_its_weight(
    request: pytest.FixtureRequest,
    demo: Path,
    tmp_path: Path,
    family: str,
    model: str,
    lora_a: str,
    lora_b: str | None,
) -> None:
    pipe = request.getfixturevalue(model)
    base = _images(pipe)
    other = demo / "loras" / lora_b if lora_b else write_tiny_lora(tmp_path, family=family, seed=9)
    pipe.load_lora_weights(demo / "loras" / lora_a, adapter_name="a")
    pipe.load_lora_weights(other, adapter_name="b")
    try:
        pipe.set_adapters(["a"], [1.0])
        with_a = _images(pipe)
        pipe.set_adapters(["a"], [0.0])
        assert _levels(_images(pipe), base) <= 1
        pipe.set_adapters(["b"], [1.0])
        with_b = _images(pipe)
    finally:
        pipe.unload_lora_weights()
    assert _levels(with_a, base) > 20
    assert float(np.abs(with_a - base).mean() * 255) > 2
    assert _levels(with_a, with_b) > 20
    assert _levels(_images(pipe), base) <= 1


def test_embedding_changes_the_prompt_and_unloads(demo: Path, sd: StableDiffusionPipeline) -> None:
    prompt = "a <demo-embedding> fox"
    without = _images(sd, prompt)
    vocab_size = len(sd.tokenizer)
    sd.load_textual_inversion(
        demo / "embeddings" / "demo-embedding" / "learned_embeds.safetensors",
        token="<demo-embedding>",
    )
    try:
        assert len(sd.tokenizer) == vocab_size + 1
        assert float(np.abs(_images(sd, prompt) - without).mean() * 255) > 1
    finally:
        sd.unload_textual_inversion()
    assert len(sd.tokenizer) == vocab_size
    assert sd.text_encoder.get_input_embeddings().weight.shape[0] == vocab_size
    assert np.array_equal(_images(sd, prompt), without)


def test_embedding_file_layout(tmp_path: Path) -> None:
    first = load_file(str(write_tiny_embedding(tmp_path / "a", token="<t>", seed=1)))
    again = load_file(str(write_tiny_embedding(tmp_path / "b", token="<t>", seed=1)))
    other = load_file(str(write_tiny_embedding(tmp_path / "c", token="<t>", seed=2)))
    assert list(first) == ["<t>"]
    assert first["<t>"].shape == (1, 32)
    assert torch.equal(first["<t>"], again["<t>"])
    assert not torch.equal(first["<t>"], other["<t>"])


def test_vae_swap_changes_sd_and_sdxl_images(
    demo: Path, sd: StableDiffusionPipeline, sdxl: StableDiffusionXLPipeline
) -> None:
    vae = AutoencoderKL.from_pretrained(demo / "vaes" / "demo-vae")
    assert vae.config.block_out_channels == sd.vae.config.block_out_channels
    assert vae.config.latent_channels == sdxl.vae.config.latent_channels
    own = sd.vae.state_dict()
    assert not all(torch.equal(own[key], value) for key, value in vae.state_dict().items())
    for pipe in (sd, sdxl):
        swapped = _quiet(type(pipe).from_pipe(pipe, vae=vae))
        assert float(np.abs(_images(swapped) - _images(pipe)).mean() * 255) > 5


@pytest.mark.parametrize("flag_everything", [True, False])
def test_safety_checker_verdict_is_fixed(
    demo: Path, sd: StableDiffusionPipeline, tmp_path: Path, flag_everything: bool
) -> None:
    from workers.tiny import write_tiny_safety_checker

    folder = (
        demo / "safety-checker"
        if flag_everything
        else write_tiny_safety_checker(tmp_path, flag_everything=False)
    )
    checker = StableDiffusionSafetyChecker.from_pretrained(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    images = np.concatenate([_images(sd), np.zeros((1, 64, 64, 3)), np.ones((1, 64, 64, 3))])
    pil = [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
    clip_input = processor(pil, return_tensors="pt").pixel_values
    checked, flagged = checker(images=images.copy(), clip_input=clip_input)
    assert flagged == [flag_everything] * 3
    if flag_everything:
        assert not checked.any()  # flagged images come back black
    else:
        assert np.array_equal(checked, images)


def test_upscaler_makes_an_image_four_times_larger(
    demo: Path, init_image_and_mask: tuple[Image.Image, Image.Image]
) -> None:
    pipe = _quiet(
        StableDiffusionUpscalePipeline.from_pretrained(demo / "upscaler", local_files_only=True)
    )
    small = init_image_and_mask[0].resize((32, 32))
    result = pipe(
        PROMPT,
        image=small,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        output_type="pil",
    ).images
    assert result[0].size == (128, 128)


def _translate(folder: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    output = model.generate(
        **tokenizer(["ein roter Fuchs"], return_tensors="pt"), max_new_tokens=16
    )
    text: str = tokenizer.batch_decode(output, skip_special_tokens=True)[0]
    return text


def test_translator_is_deterministic_and_not_empty(demo: Path, tmp_path: Path) -> None:
    text = _translate(demo / "translator")
    assert text.strip()
    assert _translate(demo / "translator") == text
    assert _translate(write_tiny_translator(tmp_path / "again")) == text
    assert _translate(write_tiny_translator(tmp_path / "other", seed=1)) != text


def test_main_tiny_model_writes_every_kind(demo: Path, tmp_path: Path) -> None:
    rng_state = torch.random.get_rng_state()
    written = {kind: main_tiny_model(tmp_path / kind, kind) for kind in TINY_KINDS}
    # The writers draw from their own seed and leave the caller's random stream alone.
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert written["sd"] == tmp_path / "sd"
    assert (written["sd"] / "model_index.json").is_file()
    assert written["demo"] == tmp_path / "demo" / "models.yaml"
    assert written["embedding"].suffix == ".safetensors"
    assert all(path.exists() for path in written.values())
    # Same default seed: the same weights as the demo registry's artefacts.
    counterparts = {
        "sdxl": "demo-xl",
        "video": "demo-video",
        "inpaint": "demo-inpaint",
        "lora-sdxl": "loras/demo-lora-xl",
        "vae": "vaes/demo-vae",
        "upscaler": "upscaler",
        "translator": "translator",
    }
    for kind, name in counterparts.items():
        files = sorted(
            path.relative_to(written[kind]) for path in written[kind].rglob("*.safetensors")
        )
        assert files, kind
        for file in files:
            expected, actual = (
                load_file(str(demo / name / file)),
                load_file(str(written[kind] / file)),
            )
            assert expected.keys() == actual.keys(), (kind, file)
            assert all(torch.equal(expected[key], actual[key]) for key in expected), (kind, file)
    with pytest.raises(ValueError, match="sd, sdxl, video"):
        main_tiny_model(tmp_path / "other", kind="sd3")


def test_cli_offers_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    for kind in TINY_KINDS:
        assert parser().parse_args(["tiny-model", "folder", "--kind", kind]).kind == kind
    with pytest.raises(SystemExit):
        parser().parse_args(["tiny-model", "folder", "--kind", "sd3"])
    assert "invalid choice" in capsys.readouterr().err
