"""The tiny model writers: deterministic weights, and a single-file checkpoint in the original
LDM layout that diffusers' own from_single_file loads back to the same pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors.torch import load_file

from workers.tiny import build_tiny_sd, main_tiny_model, write_tiny_sd, write_tiny_sd_single_file


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


def test_main_tiny_model(tmp_path: Path) -> None:
    folder = main_tiny_model(tmp_path / "demo")
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ValueError, match="sdxl"):
        main_tiny_model(tmp_path / "other", kind="sdxl")
