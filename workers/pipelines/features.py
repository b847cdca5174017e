"""Per-job features that change shared modules, each as a context manager that undoes itself.

A model's components are shared by all of its task pipelines and by every job, so whatever a job
switches on (LoRA adapters, a textual-inversion token, another VAE, token merging, a clip-skip
shim) is switched off again when the job ends, failed or not: the next job sees the base model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import tomesd  # type: ignore[import-untyped]
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from safetensors.torch import load_file

from dreamq.jobparams import LoraChoice
from dreamq.registry import EmbeddingEntry
from workers.models import LoadedModel, ModelLoadError, PipelineCache

log = logging.getLogger("dreamq.features")

TOME_RATIO = 0.5
"""Share of tokens merged in the patched attention blocks (tomesd's recommended maximum)."""


@contextmanager
def loras(
    cache: PipelineCache, loaded: LoadedModel, choices: Sequence[LoraChoice]
) -> Iterator[None]:
    """The job's LoRAs active at their strengths; none at all for a job without LoRA.

    Adapters stay loaded between jobs (loading costs far more than switching); disabled, peft's
    layers compute the base layer alone, so a job without LoRA gets the base model's output
    bit for bit. They are disabled between jobs: a job that loads or enables one disables them
    when it ends, however it ends (a load that fails included), so a job without LoRA touches
    nothing. Disabling walks every module of the model (0.8 ms on the tiny one); a job without
    LoRA on a model with adapters did it twice.
    """
    if not choices:
        yield
        return
    pipe = loaded.pipe
    try:
        names = [cache.lora_adapter(loaded, choice.id) for choice in choices]
        pipe.enable_lora()
        # Always set: after a load, only the adapter loaded last is active.
        pipe.set_adapters(names, adapter_weights=[choice.strength for choice in choices])
        yield
    finally:
        if loaded.adapters:
            pipe.disable_lora()


@contextmanager
def embedding(
    loaded: LoadedModel, embedding_id: str | None, entry: EmbeddingEntry | None
) -> Iterator[None]:
    """The textual-inversion embedding's token(s) known to the tokenizer for this job only."""
    if embedding_id is None:
        yield
        return
    if entry is None:
        raise ModelLoadError(f"The embedding {embedding_id} is not available.")
    pipe = loaded.pipe
    token = entry.token or embedding_id
    encoders = _text_encoders(pipe)
    before = [set(tokenizer.get_added_vocab()) for tokenizer, _ in encoders]
    try:
        try:
            _load_embedding(pipe, embedding_id, entry.source, token, loaded.family)
        except ModelLoadError:
            raise
        except Exception as exc:
            log.exception("embedding %s on model %s: loading failed", embedding_id, loaded.model_id)
            raise ModelLoadError(
                f"The embedding {embedding_id} could not be loaded for the model {loaded.model_id}."
            ) from exc
        yield
    finally:
        # Whatever the load added (a multi-vector embedding adds token, token_1, ...) goes.
        for (tokenizer, text_encoder), known in zip(encoders, before, strict=True):
            added = sorted(set(tokenizer.get_added_vocab()) - known)
            if added:
                pipe.unload_textual_inversion(
                    tokens=added, tokenizer=tokenizer, text_encoder=text_encoder
                )


def _text_encoders(pipe: DiffusionPipeline) -> list[tuple[Any, Any]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _load_embedding(
    pipe: DiffusionPipeline, embedding_id: str, source: str, token: str, family: str
) -> None:
    if family != "sdxl":
        pipe.load_textual_inversion(source, token=token)
        return
    # An SDXL embedding holds one vector set per text encoder (the layout of kohya's and
    # diffusers' SDXL textual-inversion trainers); load_textual_inversion fills one encoder
    # per call.
    vectors = load_file(source) if Path(source).is_file() else {}
    if not {"clip_l", "clip_g"} <= set(vectors):
        raise ModelLoadError(
            f"The embedding {embedding_id} has no SDXL vectors (clip_l and clip_g)."
        )
    pipe.load_textual_inversion(
        vectors["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        vectors["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


@contextmanager
def vae(pipes: Sequence[DiffusionPipeline], replacement: AutoencoderKL | None) -> Iterator[None]:
    """``replacement`` as the VAE of the pipelines the job calls, for this job only."""
    if replacement is None:
        yield
        return
    originals = [pipe.vae for pipe in pipes]
    try:
        for pipe in pipes:
            pipe.vae = replacement
        yield
    finally:
        for pipe, original in zip(pipes, originals, strict=True):
            pipe.vae = original


@contextmanager
def token_merging(unet: UNet2DConditionModel, enabled: bool, seed: int) -> Iterator[None]:
    """tomesd's token merging on ``unet`` for this job only.

    tomesd merges in blocks whose tokens are downsampled at most ``max_downsample`` times; its
    default 1 fits SD 1.x, whose first block has attention, but SDXL's (and the tiny models')
    first attention block is one level down, where the default merges nothing. The level here
    is the UNet's highest-resolution attention level: 1 for SD 1.x (tomesd's default), 2 for
    SDXL. The middle block is never merged (at SD's and SDXL's levels it is not anyway):
    self-attention guidance reads its attention map at full size.
    """
    if not enabled:
        yield
        return
    tomesd.apply_patch(unet, ratio=TOME_RATIO, max_downsample=_first_attention_level(unet))
    try:
        for module in unet.mid_block.modules() if unet.mid_block is not None else ():
            parent = getattr(type(module), "_parent", None)
            if type(module).__name__ == "ToMeBlock" and parent is not None:
                module.__class__ = parent
        # tomesd picks its merge partners at random, from a fork of the global RNG by default;
        # a generator seeded from the job keeps a seed's image reproducible.
        unet._tome_info["args"]["generator"] = torch.Generator(device=unet.device).manual_seed(seed)
        yield
    finally:
        tomesd.remove_patch(unet)


def _first_attention_level(unet: UNet2DConditionModel) -> int:
    for index, block in enumerate(unet.config.down_block_types):
        if "CrossAttn" in block:
            return int(2**index)
    return 1


@contextmanager
def clip_skip(pipe: DiffusionPipeline, enabled: bool) -> Iterator[None]:
    """[compat] diffusers 0.42.1's SD 1.x pipelines (txt2img, img2img, inpaint, panorama, SAG,
    text-to-video) apply clip skip through ``text_encoder.text_model.final_layer_norm``, which
    transformers >= 5.6 removed by flattening CLIPTextModel: every clip_skip raises
    AttributeError. For the job, the text encoder gets a ``text_model`` stand-in holding its
    final layer norm. Not kept: diffusers' LoRA loader reads that attribute's absence as the
    flattened layout."""
    text_encoder = getattr(pipe, "text_encoder", None)
    if (
        not enabled
        or text_encoder is None
        or hasattr(text_encoder, "text_model")
        or not hasattr(text_encoder, "final_layer_norm")
    ):
        yield
        return
    # object.__setattr__: a plain attribute, not a registered submodule (no state_dict entry).
    object.__setattr__(
        text_encoder, "text_model", SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    )
    try:
        yield
    finally:
        del text_encoder.text_model


@contextmanager
def attention_processors(unet: UNet2DConditionModel) -> Iterator[None]:
    """The UNet's attention processors as they were: SAG swaps one in and restores them only
    when its call ends normally."""
    processors = unet.attn_processors
    try:
        yield
    finally:
        unet.set_attn_processor(processors)
