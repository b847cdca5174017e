"""ops/bench/gpu.py: the GPU figures' models are the released architectures (their parameter
counts, on the meta device), their FLOP floors are the known ones, and the measuring code runs
(at toy sizes on the CPU; the full sizes need a GPU)."""

from __future__ import annotations

import pytest
import torch

from ops.bench import gpu


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_models_are_the_released_architectures() -> None:
    """Parameter counts of the released checkpoints: SD 1.5's UNet, SDXL base 1.0's UNet, their
    VAE, CLIP ViT-L/14's text encoder and OpenCLIP ViT-bigG/14's (with its projection)."""
    with torch.device("meta"):
        counts = {
            "sd15 unet": _parameters(gpu.unet(gpu.FULL["sd15"])),
            "sdxl unet": _parameters(gpu.unet(gpu.FULL["sdxl"])),
            "vae": _parameters(gpu.vae(gpu.FULL["sdxl"])),
            "text": [_parameters(m) for m in gpu.text_encoders(gpu.FULL["sdxl"])],
        }
    assert counts == {
        "sd15 unet": 859_520_964,
        "sdxl unet": 2_567_463_684,
        "vae": 83_653_863,
        "text": [123_060_480, 694_659_840],
    }


@pytest.mark.parametrize(("model", "tflop"), [("sd15", 42.7), ("sdxl", 416.0)])
def test_an_images_flops_are_the_known_floor(model: str, tflop: float) -> None:
    """One image: SD 1.5 at 512², 25 guided steps, about 42.7 TFLOP (1.61 per step, 2.5 for the
    decode); SDXL at 1024², 30 steps, about 416 (../shared/guides/offline-stack.md)."""
    assert gpu.image_flops(gpu.FULL[model]) / 1e12 == pytest.approx(tflop, rel=0.005)


def test_the_measuring_code_runs_at_toy_sizes() -> None:
    lines: list[str] = []
    recorded: list[int] = []
    figures = gpu.run(
        list(gpu.TINY.values()),
        [1, 2],
        torch.device("cpu"),
        torch.float32,
        compile_unet=False,
        repeats=1,
        peak_tflops=0.001,
        emit=lines.append,
        record=lambda so_far: recorded.append(len(so_far)),
    )
    assert [(f.model, f.batch) for f in figures] == [
        ("SD 1.5 (tiny)", 1),
        ("SD 1.5 (tiny)", 2),
        ("SDXL (tiny)", 1),
        ("SDXL (tiny)", 2),
    ]
    assert recorded == [1, 2, 3, 4]
    for figure in figures:
        assert figure.seconds > 0 and len(figure.calls) == 1
        assert figure.images_per_second == pytest.approx(figure.batch / figure.seconds)
        assert figure.floor_seconds is not None and figure.floor_seconds > 0
    assert lines[0] == gpu.HEADER
    assert len(lines) == 5 and all("of the matrix rate" in line for line in lines[1:])
