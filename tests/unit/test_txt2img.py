"""workers/pipelines/txt2img.py on the tiny model: parameters, seeding, schedulers, progress."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image

from workers.encode import encode_png
from workers.pipelines.txt2img import Txt2ImgParams, check_inputs, run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def default_config(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    return dict(pipe.scheduler.config)


def _params(**changes: Any) -> Txt2ImgParams:
    job: dict[str, Any] = {
        "prompt": "a watercolor fox",
        "negative_prompt": None,
        "width": 64,
        "height": 64,
        "samples": 1,
        "steps": 2,
        "guidance_scale": 7.5,
        "seed": 1234,
        "scheduler": None,
        "use_karras_sigmas": True,
        "algorithm_type": None,
    }
    return Txt2ImgParams.from_job(job | changes)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_sample_i_is_seeded_seed_plus_i(
    pipe: StableDiffusionPipeline,
    default_config: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    noise: list[torch.Tensor] = []
    prepare = pipe.prepare_latents

    def recording_prepare(*args: Any, **kwargs: Any) -> torch.Tensor:
        latents: torch.Tensor = prepare(*args, **kwargs)
        noise.append(latents.clone())
        return latents

    monkeypatch.setattr(pipe, "prepare_latents", recording_prepare)
    pair = run(pipe, _params(samples=2, seed=40), default_scheduler_config=default_config)
    first = run(pipe, _params(samples=1, seed=40), default_scheduler_config=default_config)
    second = run(pipe, _params(samples=1, seed=41), default_scheduler_config=default_config)
    assert len(pair) == 2
    # The seeding contract itself is exact: sample i starts from the noise of seed + i.
    assert torch.equal(noise[0][0], noise[1][0])
    assert torch.equal(noise[0][1], noise[2][0])
    assert not torch.equal(noise[0][0], noise[0][1])
    # The pixels can differ by one grey level in a handful of values: convolutions over a batch
    # of 2 add in another order than over a batch of 1 (measured: at most 5 of 122,880 values).
    for batched, single in ((pair[0], first[0]), (pair[1], second[0])):
        difference = np.abs(_pixels(batched).astype(int) - _pixels(single).astype(int))
        assert difference.max() <= 1
        assert np.count_nonzero(difference) <= difference.size // 1000
    assert not np.array_equal(_pixels(pair[0]), _pixels(pair[1]))


def test_images_have_the_requested_size(
    pipe: StableDiffusionPipeline, default_config: dict[str, Any]
) -> None:
    images = run(
        pipe,
        _params(width=96, height=56, negative_prompt="blurry", guidance_scale=1.0),
        default_scheduler_config=default_config,
    )
    assert [image.size for image in images] == [(96, 56)]
    assert images[0].mode == "RGB"
    assert encode_png(images[0]).startswith(b"\x89PNG\r\n\x1a\n")


def test_scheduler_is_set_per_job_and_never_leaks(
    pipe: StableDiffusionPipeline, default_config: dict[str, Any]
) -> None:
    run(pipe, _params(scheduler="DPM++ 2M SDE Karras"), default_scheduler_config=default_config)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "sde-dpmsolver++"
    run(pipe, _params(scheduler=None), default_scheduler_config=default_config)
    assert type(pipe.scheduler).__name__ == default_config["_class_name"]
    run(
        pipe,
        _params(scheduler=None),
        default_scheduler_config=default_config,
        default_scheduler="Euler",
    )
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.use_karras_sigmas is False


def test_same_job_twice_gives_the_same_image(
    pipe: StableDiffusionPipeline, default_config: dict[str, Any]
) -> None:
    # Ancestral samplers draw fresh noise each step: it must come from the job's generators.
    params = _params(scheduler="Euler a", seed=7)
    once = run(pipe, params, default_scheduler_config=default_config)
    run(pipe, _params(scheduler="Euler a", seed=8), default_scheduler_config=default_config)
    again = run(pipe, params, default_scheduler_config=default_config)
    assert np.array_equal(_pixels(once[0]), _pixels(again[0]))


@pytest.mark.parametrize(
    ("scheduler", "total"),
    [
        ("Euler", 3),
        # A second-order sampler evaluates the UNet twice per step but the last.
        ("Heun", 5),
        # PLMS repeats one timestep to warm up its multistep history.
        (None, 4),
    ],
)
def test_on_step_reports_every_denoising_step(
    pipe: StableDiffusionPipeline,
    default_config: dict[str, Any],
    scheduler: str | None,
    total: int,
) -> None:
    calls: list[tuple[int, int]] = []
    run(
        pipe,
        _params(steps=3, scheduler=scheduler),
        default_scheduler_config=default_config,
        on_step=lambda done, of: calls.append((done, of)),
    )
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_from_job_reads_the_params_dict() -> None:
    params = _params(width="512", guidance_scale=7, scheduler="", algorithm_type="dpmsolver+++")
    assert params.width == 512
    assert params.guidance_scale == 7.0
    assert params.scheduler is None
    assert params.algorithm_type == "dpmsolver+++"
    with pytest.raises(ValueError, match="prompt"):
        Txt2ImgParams.from_job({"width": 64})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 100}, "width must be a positive multiple of 8"),
        ({"height": 0}, "height must be a positive multiple of 8"),
        ({"samples": 0}, "samples"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": float("nan")}, "guidance scale"),
        ({"seed": -1}, "seed"),
        ({"scheduler": "KarrasVeScheduler"}, "scheduler KarrasVeScheduler"),
        ({"algorithm_type": "dpmsolver4"}, "algorithm type"),
    ],
)
def test_check_inputs_refuses(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_inputs(_params(**changes))
    check_inputs(_params())
