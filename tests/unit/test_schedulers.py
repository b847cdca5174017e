"""Every scheduler name the API accepts must drive the tiny SD pipeline; every name it refuses
must really fail. The name tables live in dreamq/schedulers.py (torch-free, for the API)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

from dreamq.schedulers import (
    A1111_NAMES,
    SCHEDULER_NAMES,
    UNUSABLE_SCHEDULERS,
    SchedulerChoice,
    resolve_algorithm_type,
    resolve_scheduler_name,
)
from workers.schedulers import make_scheduler

# diffusers' k-diffusion schedulers trip numpy 2 deprecations thousands of times per run.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def base_config(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    return dict(pipe.scheduler.config)


def _generate(pipe: StableDiffusionPipeline, steps: int = 3) -> torch.Tensor:
    images: torch.Tensor = pipe(
        "a lighthouse at dusk",
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return images


def _walks_from_noise_to_image(scheduler: Any) -> bool:
    timesteps = scheduler.timesteps
    train = scheduler.config.num_train_timesteps
    return bool(timesteps[0] > timesteps[-1] and timesteps[0] > train / 2)


def _assert_generates(pipe: StableDiffusionPipeline) -> None:
    images = _generate(pipe)
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()
    assert images.std() > 1e-3
    assert _walks_from_noise_to_image(pipe.scheduler), pipe.scheduler.timesteps


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_class_name_generates(
    pipe: StableDiffusionPipeline, base_config: dict[str, Any], name: str
) -> None:
    choice = resolve_scheduler_name(name)
    assert choice == SchedulerChoice(name)
    # Karras on: the request default, and the harder case for the classes that take it.
    pipe.scheduler = make_scheduler(
        choice, base_config, use_karras_sigmas=True, algorithm_type=None
    )
    assert type(pipe.scheduler).__name__ == name
    _assert_generates(pipe)


@pytest.mark.parametrize("name", A1111_NAMES)
def test_every_a1111_name_generates(
    pipe: StableDiffusionPipeline, base_config: dict[str, Any], name: str
) -> None:
    choice = resolve_scheduler_name(name.upper())
    assert choice == A1111_NAMES[name]
    assert choice.class_name in SCHEDULER_NAMES
    pipe.scheduler = make_scheduler(
        choice, base_config, use_karras_sigmas=not choice.karras, algorithm_type=None
    )
    config = pipe.scheduler.config
    if choice.karras is not None:
        assert config.use_karras_sigmas is choice.karras
    if choice.algorithm_type is not None:
        assert config.algorithm_type == choice.algorithm_type
    _assert_generates(pipe)


@pytest.mark.parametrize("name", UNUSABLE_SCHEDULERS)
def test_every_refused_name_really_cannot_generate(
    pipe: StableDiffusionPipeline, base_config: dict[str, Any], name: str
) -> None:
    assert resolve_scheduler_name(name) is None
    cls = getattr(diffusers, name, None)
    if cls is None:
        return
    pipe.scheduler = cls.from_config(base_config)
    try:
        _generate(pipe)
    except (TypeError, AttributeError, NotImplementedError):
        return
    assert not _walks_from_noise_to_image(pipe.scheduler), pipe.scheduler.timesteps


def test_names_resolve() -> None:
    assert resolve_scheduler_name("dpm++ 2m sde karras") == SchedulerChoice(
        "DPMSolverMultistepScheduler", karras=True, algorithm_type="sde-dpmsolver++"
    )
    assert resolve_scheduler_name("euler a") == SchedulerChoice("EulerAncestralDiscreteScheduler")
    assert resolve_scheduler_name("eulerdiscretescheduler") is None
    assert resolve_scheduler_name("KarrasVeScheduler") is None
    assert resolve_scheduler_name("nope") is None
    assert resolve_algorithm_type("DPMSolver+++") == "sde-dpmsolver++"
    assert resolve_algorithm_type("nope") is None


def _config(
    choice: SchedulerChoice,
    base: dict[str, Any],
    *,
    use_karras_sigmas: bool = False,
    algorithm_type: str | None = None,
) -> Any:
    scheduler: Any = make_scheduler(
        choice, base, use_karras_sigmas=use_karras_sigmas, algorithm_type=algorithm_type
    )
    return scheduler.config


def test_request_flags_apply_only_where_the_class_takes_them(base_config: dict[str, Any]) -> None:
    request: dict[str, Any] = {"use_karras_sigmas": True, "algorithm_type": "dpmsolver+++"}
    sde = _config(SchedulerChoice("DPMSolverMultistepScheduler"), base_config, **request)
    assert (sde.use_karras_sigmas, sde.algorithm_type) == (True, "sde-dpmsolver++")
    # The sampler name's own setting beats the request flag.
    plain = _config(A1111_NAMES["DPM++ 2M"], base_config, **request)
    assert (plain.use_karras_sigmas, plain.algorithm_type) == (False, "dpmsolver++")
    ancestral = _config(SchedulerChoice("EulerAncestralDiscreteScheduler"), base_config, **request)
    assert "use_karras_sigmas" not in ancestral
    assert "algorithm_type" not in ancestral


def test_another_class_does_not_inherit_solver_settings(base_config: dict[str, Any]) -> None:
    # A model shipped with DPM++ 2M SDE: its algorithm_type must not reach DEIS, which refuses it.
    sde_config = dict(_config(A1111_NAMES["DPM++ 2M SDE"], base_config))
    assert _config(SchedulerChoice("DEISMultistepScheduler"), sde_config).algorithm_type == "deis"
    same = _config(SchedulerChoice("DPMSolverMultistepScheduler"), sde_config)
    assert same.algorithm_type == "sde-dpmsolver++"


def test_name_tables_import_without_torch() -> None:
    code = (
        "import sys, dreamq.schedulers; sys.exit(bool({'torch', 'diffusers'} & sys.modules.keys()))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
