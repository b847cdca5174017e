"""The GPU figures of docs/performance.md: Stable Diffusion 1.5 and SDXL, seconds per image and
images per second at batch 1, 2, 4 and 8, beside the FLOP floor.

    python -m ops.bench.gpu                 # on a CUDA machine: bf16, SDPA, channels_last, compile
    python -m ops.bench.gpu --tiny          # the same code at toy sizes on the CPU (the smoke test)
    options: --models sd15,sdxl  --batches 1,2,4,8  --repeats 3  --no-compile  --peak-tflops 790
             --json FILE (every figure, written after each row: a run cut short keeps its rows)

The architectures are the released models' own (the configs below: UNet, VAE and CLIP text
encoders of SD 1.5 and of SDXL base 1.0) with random weights, so each call does the released
models' compute; tests/unit/test_gpu_bench.py builds them on PyTorch's meta device and checks
their parameter counts against the released checkpoints'. Weights are drawn on the GPU (no
download: none is possible on these machines), the text goes through a byte-level tokenizer
(`workers/tiny_parts.py`) into the full-size encoders, and the denoising loop is diffusers' own
pipeline with Euler steps and guidance 7.5, so the batch of a call is twice the images.

A call makes `batch` images at the model's size (512² and 25 steps for SD 1.5, 1024² and 30 for
SDXL), ending with the VAE decode on the GPU (`output_type="pt"`: PNG encoding is the worker's
finisher's, on the CPU). Each batch size gets warm-up calls (compilation, cuDNN's choices), then
`--repeats` timed calls between `torch.cuda.synchronize()`; the table gives their median.

The floor is the FLOPs of one image (the UNet's steps on the guided pair, then the VAE decode),
counted by `torch.utils.flop_counter` on the meta device from these configs, over the device's
measured bf16 matrix rate (`--peak-tflops`, 790 by default: an 8192³ bf16 product on this
workplace's H100 and H200; docs/performance.md). `floor / measured` says how much of the
device's arithmetic a call uses.

On the device machine (`run` of the device tool), torch, transformers and safetensors are
installed; diffusers is not and travels as a wheel (its README, "a Python package missing
there"). No other part of dreamq is imported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from workers.tiny_parts import SD_SCHEDULE, tiny_tokenizer

PEAK_TFLOPS = 790.0
"""bf16 matrix rate measured on this workplace's H100 and H200 (798 and 788 TFLOP/s)."""

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
}
_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
"""The byte-level tokenizer's (the released vocabulary's are 49406 and 49407): the encoders pool
at its end-of-text token."""
CLIP_L: dict[str, Any] = {
    **_TOKEN_IDS,
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIG_G: dict[str, Any] = {
    **_TOKEN_IDS,
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


@dataclass(frozen=True)
class Arch:
    """One model's architecture and the call the figures are for."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: tuple[dict[str, Any], ...]
    """One text encoder (SD 1.5) or two, the second with a projection (SDXL)."""
    size: int
    steps: int

    @property
    def xl(self) -> bool:
        return len(self.text) == 2

    def latent(self) -> int:
        return self.size // 2 ** (len(self.vae["block_out_channels"]) - 1)


FULL = {
    "sd15": Arch("SD 1.5", SD15_UNET, {**VAE, "sample_size": 512}, (CLIP_L,), 512, 25),
    "sdxl": Arch(
        "SDXL",
        SDXL_UNET,
        {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": False},
        (CLIP_L, CLIP_BIG_G),
        1024,
        30,
    ),
}

_TINY_TEXT: dict[str, Any] = {
    **_TOKEN_IDS,
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
_TINY_VAE: dict[str, Any] = {
    **VAE,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
}
TINY = {
    "sd15": Arch(
        "SD 1.5 (tiny)",
        {
            **SD15_UNET,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
        },
        _TINY_VAE,
        (_TINY_TEXT,),
        64,
        2,
    ),
    "sdxl": Arch(
        "SDXL (tiny)",
        {
            **SDXL_UNET,
            "block_out_channels": (32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": 64,
            "addition_embed_type_num_heads": 8,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
        },
        _TINY_VAE,
        (_TINY_TEXT, _TINY_TEXT),
        64,
        2,
    ),
}
"""The same code at toy sizes (the smoke test's), from the same builders."""


def unet(arch: Arch) -> UNet2DConditionModel:
    return UNet2DConditionModel(**arch.unet)


def vae(arch: Arch) -> AutoencoderKL:
    return AutoencoderKL(**arch.vae)


def text_encoders(arch: Arch) -> list[torch.nn.Module]:
    first = CLIPTextModel(CLIPTextConfig(**arch.text[0]))
    if not arch.xl:
        return [first]
    return [first, CLIPTextModelWithProjection(CLIPTextConfig(**arch.text[1]))]


def image_flops(arch: Arch) -> float:
    """FLOPs of one image: the UNet on the guided pair at every step, then the VAE decode,
    counted on the meta device (no memory, no weights)."""
    latent = arch.latent()
    with torch.device("meta"):
        model, decoder = unet(arch), vae(arch)
        sample = torch.randn(2, 4, latent, latent)
        text = torch.randn(2, 77, arch.unet["cross_attention_dim"])
        kwargs: dict[str, Any] = {}
        if arch.xl:
            pooled = arch.text[1]["projection_dim"]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(2, pooled),
                "time_ids": torch.randn(2, 6),
            }
        with FlopCounterMode(display=False) as step:
            model(sample, torch.tensor([999, 999]), encoder_hidden_states=text, **kwargs)
        with FlopCounterMode(display=False) as decode:
            decoder.decode(torch.randn(1, 4, latent, latent))
    return float(step.get_total_flops() * arch.steps + decode.get_total_flops())


def build(arch: Arch, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """The pipeline with random weights, drawn on the device itself."""
    with torch.device(device):
        parts: dict[str, Any] = {"unet": unet(arch), "vae": vae(arch)}
        encoders = text_encoders(arch)
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE)
    if arch.xl:
        pipe: DiffusionPipeline = StableDiffusionXLPipeline(
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            scheduler=scheduler,
            **parts,
        )
    else:
        pipe = StableDiffusionPipeline(
            text_encoder=encoders[0],
            tokenizer=tiny_tokenizer(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def optimize(pipe: Any, *, compile_unet: bool) -> None:
    """channels_last for the convolutions (diffusers uses SDPA attention by itself), and the
    UNet, which does nearly all the work, compiled."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)


@dataclass
class Figure:
    model: str
    batch: int
    seconds: float
    """Median seconds of a call making `batch` images."""
    calls: list[float] = field(default_factory=list)
    peak_memory_gib: float | None = None
    floor_seconds: float | None = None
    """Seconds per image at the device's matrix rate."""

    @property
    def per_image(self) -> float:
        return self.seconds / self.batch

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds


@contextmanager
def _synchronized(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    pipe: Any, arch: Arch, batch: int, device: torch.device, *, warmup: int, repeats: int
) -> Figure:
    def call() -> None:
        pipe(
            prompt=[f"a photograph of a red fox in the snow, {i}" for i in range(batch)],
            negative_prompt=["blurry"] * batch,
            num_inference_steps=arch.steps,
            guidance_scale=7.5,
            height=arch.size,
            width=arch.size,
            output_type="pt",
            generator=torch.Generator(device="cpu").manual_seed(batch),
        )

    for _ in range(warmup):
        call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calls = []
    for _ in range(repeats):
        with _synchronized(device):
            started = time.perf_counter()
            call()
        calls.append(time.perf_counter() - started)
    memory = None
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    return Figure(arch.name, batch, statistics.median(calls), calls, memory)


def row(figure: Figure) -> str:
    floor = "—"
    if figure.floor_seconds is not None:
        share = figure.floor_seconds / figure.per_image
        floor = f"{figure.floor_seconds * 1000:,.0f} ms ({share:.0%} of the matrix rate)"
    memory = "—" if figure.peak_memory_gib is None else f"{figure.peak_memory_gib:.1f} GiB"
    return (
        f"| {figure.model} | {figure.batch} | {figure.seconds:.3f} s | "
        f"{figure.per_image * 1000:,.0f} ms | {figure.images_per_second:.2f} | {floor} | "
        f"{memory} |"
    )


HEADER = (
    "| model | batch | s per call | per image | images/s | floor per image | peak memory |\n"
    "|---|---|---|---|---|---|---|"
)


def run(
    archs: list[Arch],
    batches: list[int],
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile_unet: bool,
    repeats: int,
    peak_tflops: float | None,
    emit: Callable[[str], None] = print,
    record: Callable[[list[Figure]], None] = lambda figures: None,
) -> list[Figure]:
    """Every model at every batch size; `emit` gets the table line by line, `record` the
    figures so far after each row."""
    figures: list[Figure] = []
    emit(HEADER)
    for arch in archs:
        floor = None if peak_tflops is None else image_flops(arch) / (peak_tflops * 1e12)
        pipe = build(arch, device, dtype)
        optimize(pipe, compile_unet=compile_unet)
        for batch in batches:
            # A compiled UNet compiles again for each new batch size: two warm-up calls.
            figure = measure(
                pipe, arch, batch, device, warmup=2 if compile_unet else 1, repeats=repeats
            )
            figure.floor_seconds = floor
            figures.append(figure)
            emit(row(figure))
            record(figures)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.gpu", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batches", default=None, help="default 1,2,4,8 (tiny: 1,2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager UNet")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    # diffusers warns on every cast of a freshly built model to bf16; nothing here is loaded.
    diffusers_logging.set_verbosity_error()
    if args.tiny:
        device, dtype, table = torch.device("cpu"), torch.float32, TINY
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run it on a GPU machine, or --tiny on this one")
        device, dtype, table = torch.device("cuda"), torch.bfloat16, FULL
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,2,4,8")).split(",")]
    archs = [table[name] for name in args.models.split(",")]
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16")

    def record(figures: list[Figure]) -> None:
        if args.json is not None:
            rows = [{**asdict(f), "images_per_second": f.images_per_second} for f in figures]
            args.json.write_text(json.dumps(rows, indent=1))

    run(
        archs,
        batches,
        device,
        dtype,
        compile_unet=not args.no_compile and not args.tiny,
        repeats=args.repeats,
        peak_tflops=None if args.tiny else args.peak_tflops,
        record=record,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
