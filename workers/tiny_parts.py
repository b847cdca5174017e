"""Building blocks shared by the tiny model writers: the byte-level tokenizer, the text encoder
config and the SD 1.5-shaped UNet and VAE at toy sizes.

Every tiny model uses these sizes, so a tiny LoRA, embedding or VAE fits every tiny pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Concrete module paths: through the package root, mypy resolves the dummy placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

TEXT_HIDDEN_SIZE = 32
"""Width of every tiny text encoder: an SD 1.5 embedding file holds vectors of this size."""


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw weights from ``seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def byte_alphabet() -> list[str]:
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
        for char in byte_alphabet():
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


def tiny_text_config(vocab_size: int, **overrides: Any) -> CLIPTextConfig:
    """The tiny CLIP text encoder (hidden 32, 2 layers, 4 heads) for the byte tokenizer."""
    settings: dict[str, Any] = {
        "hidden_size": TEXT_HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "max_position_embeddings": 77,
        "vocab_size": vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    return CLIPTextConfig(**(settings | overrides))


def tiny_unet(*, in_channels: int = 4) -> UNet2DConditionModel:
    """SD 1.5's UNet layout at toy width; ``in_channels=9`` is the inpainting variant."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
    )


def tiny_vae() -> AutoencoderKL:
    """The tiny VAE shared by the SD 1.5 and SDXL tiny pipelines (4 latent channels, factor 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )


# SD 1.5's own noise schedule (its scheduler config); other schedulers derive from it.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
