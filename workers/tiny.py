"""Tiny random-weight Stable Diffusion pipelines: the real SD 1.5 architecture at toy sizes.

No weights can be downloaded here, so tests, demos and ``dreamq tiny-model`` build these in code
(the way diffusers' own tests do) and load them back through the same ``from_pretrained`` /
``from_single_file`` paths a real model takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

# Concrete module paths: through the package root, mypy resolves the dummy placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SINGLE_FILE_NAME = "tiny-sd.safetensors"
CONFIG_FOLDER_NAME = "config"


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 byte values (CLIP's byte-level BPE base)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in chars]


def tiny_tokenizer() -> CLIPTokenizer:
    # transformers ships no tokenizer files and CLIPTokenizer(vocab_file=...) returns garbage ids in
    # transformers 5; an in-memory byte-level vocabulary with no merges tokenizes any text.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _byte_alphabet():
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_tiny_sd(*, seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline in memory; the same seed gives the same weights."""
    tokenizer = tiny_tokenizer()
    # fork_rng keeps the caller's global RNG untouched while the weights are drawn from `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=77,
                vocab_size=len(tokenizer),
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    # SD 1.5's own scheduler config (its model_index.json names PNDMScheduler).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_sd(directory: Path, *, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder that ``from_pretrained(directory)`` loads."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_sd(seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_sd_single_file(directory: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Save the tiny pipeline as one LDM-layout ``.safetensors`` file plus a config-only folder.

    Returns ``(file, config_folder)`` for
    ``StableDiffusionPipeline.from_single_file(str(file), config=str(config_folder),
    local_files_only=True)``. The folder holds no weights, like the hub config a real
    single-file checkpoint is paired with, so every weight provably comes from the file.
    """
    pipe = build_tiny_sd(seed=seed)
    config_folder = directory / CONFIG_FOLDER_NAME
    config_folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(config_folder)
    pipe.unet.save_config(config_folder / "unet")
    pipe.vae.save_config(config_folder / "vae")
    pipe.scheduler.save_config(config_folder / "scheduler")
    pipe.text_encoder.config.save_pretrained(config_folder / "text_encoder")
    pipe.tokenizer.save_pretrained(config_folder / "tokenizer")
    file = directory / SINGLE_FILE_NAME
    save_file(to_ldm_checkpoint(pipe), str(file))
    return file, config_folder


def main_tiny_model(directory: Path, kind: str = "sd") -> Path:
    """Entry point of ``dreamq tiny-model DIR``: writes a tiny model folder and returns it."""
    if kind != "sd":
        raise ValueError(f"unknown tiny model kind {kind!r}; supported: 'sd'")
    return write_tiny_sd(directory)


# --- diffusers -> original CompVis/LDM layout -------------------------------------------------
# The inverse of diffusers.loaders.single_file_utils (convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) for SD 1.x. Unknown keys raise rather
# than pass through, so a silently unconverted weight cannot hide behind a lenient loader.

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    **{
        name: name
        for name in (
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        )
    },
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _convert(key: str, rules: list[Rule], fixed: dict[str, str], what: str) -> str:
    prefix, _, param = key.rpartition(".")
    if prefix in fixed:
        return f"{fixed[prefix]}.{param}"
    for pattern, build in rules:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    raise ValueError(f"no LDM name for {what} weight {key!r}")


def _unet_rules(config: dict[str, object]) -> list[Rule]:
    per_down = int(config["layers_per_block"])  # type: ignore[call-overload]
    per_up = per_down + 1
    up_types = list(config["up_block_types"])  # type: ignore[call-overload]

    def down(m: re.Match[str]) -> str:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (per_down + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"

    def up(m: re.Match[str]) -> str:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_up + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"

    def upsampler(m: re.Match[str]) -> str:
        block = int(m[1])
        # LDM appends the upsampler after the last layer's modules: slot 2 behind an attention.
        slot = 2 if "CrossAttn" in up_types[block] else 1
        return f"output_blocks.{block * per_up + per_up - 1}.{slot}.conv.{m[2]}"

    return [
        (re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)"), down),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"input_blocks.{(int(m[1]) + 1) * (per_down + 1)}.0.op.{m[2]}",
        ),
        (
            re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
        (re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)"), up),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"), upsampler),
    ]


def _vae_rules(config: dict[str, object]) -> list[Rule]:
    num_up = len(config["up_block_types"])  # type: ignore[arg-type]
    shortcut = {"conv_shortcut": "nin_shortcut"}
    return [
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], shortcut)}",
        ),
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        # LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], shortcut)}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
            lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], shortcut)}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)"),
            lambda m: f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTENTION)}",
        ),
    ]


def to_ldm_checkpoint(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original Stable Diffusion checkpoint key names."""
    out: dict[str, torch.Tensor] = {}
    unet_rules = _unet_rules(dict(pipe.unet.config))
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + _convert(key, unet_rules, _UNET_FIXED, "UNet")] = value
    vae_rules = _vae_rules(dict(pipe.vae.config))
    for key, value in pipe.vae.state_dict().items():
        name = _convert(key, vae_rules, _VAE_FIXED, "VAE")
        # LDM's VAE attention projections are 1x1 convolutions, not linear layers.
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the LDM names keep the text_model level.
        name = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + name] = value
    return {key: value.detach().contiguous() for key, value in out.items()}
