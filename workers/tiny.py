"""Tiny random-weight Stable Diffusion pipelines: the real SD 1.5 architecture at toy sizes.

No weights can be downloaded here, so tests, demos and ``dreamq tiny-model`` build these in code
(the way diffusers' own tests do) and load them back through the same ``from_pretrained`` /
``from_single_file`` paths a real model takes. This module holds SD 1.5 (plain, inpainting, and
as one LDM-layout file), the demo registry and the ``tiny-model`` entry point, and re-exports the
other writers (``workers.tiny_extra``: SDXL, video, adapters, helper models).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Concrete module paths: through the package root, mypy resolves the dummy placeholder classes.
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from safetensors.torch import save_file
from transformers import CLIPTextModel

from dreamq.registry import (
    EmbeddingEntry,
    HelperEntry,
    LoraEntry,
    ModelEntry,
    Registry,
    VaeEntry,
    write_registry,
)
from workers.tiny_extra import (
    build_tiny_sdxl,
    write_tiny_embedding,
    write_tiny_lora,
    write_tiny_safety_checker,
    write_tiny_sdxl,
    write_tiny_translator,
    write_tiny_upscaler,
    write_tiny_vae,
    write_tiny_video,
)
from workers.tiny_parts import (
    SD_SCHEDULE,
    seeded,
    tiny_text_config,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

__all__ = [
    "build_tiny_sd",
    "build_tiny_sd_inpaint",
    "build_tiny_sdxl",
    "main_tiny_model",
    "tiny_tokenizer",
    "to_ldm_checkpoint",
    "write_demo_registry",
    "write_tiny_embedding",
    "write_tiny_lora",
    "write_tiny_safety_checker",
    "write_tiny_sd",
    "write_tiny_sd_single_file",
    "write_tiny_sdxl",
    "write_tiny_translator",
    "write_tiny_upscaler",
    "write_tiny_vae",
    "write_tiny_video",
]

SINGLE_FILE_NAME = "tiny-sd.safetensors"
CONFIG_FOLDER_NAME = "config"


def _sd_components(seed: int, in_channels: int) -> dict[str, Any]:
    tokenizer = tiny_tokenizer()
    with seeded(seed):
        unet = tiny_unet(in_channels=in_channels)
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        # SD 1.5's own scheduler config (its model_index.json names PNDMScheduler).
        "scheduler": PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_tiny_sd(*, seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline in memory; the same seed gives the same weights."""
    return StableDiffusionPipeline(**_sd_components(seed, in_channels=4))


def build_tiny_sd_inpaint(*, seed: int = 0) -> StableDiffusionInpaintPipeline:
    """The tiny inpainting pipeline: a 9-channel UNet (latents, mask, masked-image latents), the
    layout of SD 1.5's inpainting checkpoint."""
    return StableDiffusionInpaintPipeline(**_sd_components(seed, in_channels=9))


def write_tiny_sd(directory: Path, *, seed: int = 0, inpaint: bool = False) -> Path:
    """Save the tiny pipeline as a diffusers folder that ``from_pretrained(directory)`` loads
    (``StableDiffusionInpaintPipeline`` for ``inpaint=True``)."""
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_sd_inpaint(seed=seed) if inpaint else build_tiny_sd(seed=seed)
    pipe.save_pretrained(directory, safe_serialization=True)
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


DEMO_EMBEDDING_TOKEN = "<demo-embedding>"
_DEMO_HEADER = """\
# The demo models of `dreamq dev`: tiny random-weight models written by
# `dreamq tiny-model DIR --kind demo` (workers.tiny.write_demo_registry). Their images are noise.
# The safety checker flags EVERY image as NSFW, so that `safety_checker: yes` visibly acts.
"""


def write_demo_registry(directory: Path) -> Path:
    """Write every tiny model under ``directory`` and a registry naming them; returns the
    ``models.yaml`` path (sources relative to it).

    Ids: models ``demo``, ``demo-xl``, ``demo-video``, ``demo-inpaint``; LoRAs ``demo-lora-a``,
    ``demo-lora-b``, ``demo-lora-xl``; embedding ``demo-embedding`` (token ``<demo-embedding>``);
    VAEs ``demo-vae``, ``demo-vae-xl``; and the safety checker (which flags every image, so the
    feature shows in a demo), upscaler and translator helpers. Rewriting gives the same files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    embedding = write_tiny_embedding(
        directory / "embeddings" / "demo-embedding", token=DEMO_EMBEDDING_TOKEN
    )
    sources = {
        "demo": write_tiny_sd(directory / "demo"),
        "demo-xl": write_tiny_sdxl(directory / "demo-xl"),
        "demo-video": write_tiny_video(directory / "demo-video"),
        "demo-inpaint": write_tiny_sd(directory / "demo-inpaint", inpaint=True),
        "demo-lora-a": write_tiny_lora(directory / "loras" / "demo-lora-a", seed=1),
        "demo-lora-b": write_tiny_lora(directory / "loras" / "demo-lora-b", seed=2),
        "demo-lora-xl": write_tiny_lora(directory / "loras" / "demo-lora-xl", family="sdxl"),
        # Both tiny pipelines share one VAE architecture, so one folder serves both families.
        "demo-vae": write_tiny_vae(directory / "vaes" / "demo-vae"),
        "safety_checker": write_tiny_safety_checker(
            directory / "safety-checker", flag_everything=True
        ),
        "upscaler": write_tiny_upscaler(directory / "upscaler"),
        "translator": write_tiny_translator(directory / "translator"),
    }
    rel = {name: str(path.relative_to(directory)) for name, path in sources.items()}
    registry = Registry(
        models={
            "demo": ModelEntry(source=rel["demo"]),
            "demo-xl": ModelEntry(source=rel["demo-xl"], family="sdxl"),
            "demo-video": ModelEntry(source=rel["demo-video"], kind="text2video"),
            "demo-inpaint": ModelEntry(source=rel["demo-inpaint"], kind="inpaint"),
        },
        loras={
            "demo-lora-a": LoraEntry(source=rel["demo-lora-a"]),
            "demo-lora-b": LoraEntry(source=rel["demo-lora-b"]),
            "demo-lora-xl": LoraEntry(source=rel["demo-lora-xl"], family="sdxl"),
        },
        embeddings={
            "demo-embedding": EmbeddingEntry(
                source=str(embedding.relative_to(directory)), token=DEMO_EMBEDDING_TOKEN
            )
        },
        vaes={
            "demo-vae": VaeEntry(source=rel["demo-vae"]),
            "demo-vae-xl": VaeEntry(source=rel["demo-vae"], family="sdxl"),
        },
        safety_checker=HelperEntry(source=rel["safety_checker"]),
        upscaler=HelperEntry(source=rel["upscaler"]),
        translator=HelperEntry(source=rel["translator"]),
    )
    path = directory / "models.yaml"
    write_registry(path, registry)
    path.write_text(_DEMO_HEADER + path.read_text())
    return path


TINY_KINDS: dict[str, Callable[[Path], Path]] = {
    "sd": write_tiny_sd,
    "sdxl": write_tiny_sdxl,
    "video": write_tiny_video,
    "inpaint": lambda directory: write_tiny_sd(directory, inpaint=True),
    "lora": write_tiny_lora,
    "lora-sdxl": lambda directory: write_tiny_lora(directory, family="sdxl"),
    "embedding": write_tiny_embedding,
    "vae": write_tiny_vae,
    "safety-checker": write_tiny_safety_checker,
    "upscaler": write_tiny_upscaler,
    "translator": write_tiny_translator,
    "demo": write_demo_registry,
}
"""``dreamq tiny-model --kind`` choices: each writes into a folder and returns what it wrote."""


def main_tiny_model(directory: Path, kind: str = "sd") -> Path:
    """Entry point of ``dreamq tiny-model DIR``: writes one tiny model (``demo``: all of them
    and their registry) and returns the path a loader takes (``demo``: the registry file)."""
    writer = TINY_KINDS.get(kind)
    if writer is None:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    return writer(directory)


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
