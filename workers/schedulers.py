"""Builds the scheduler a job asked for from the model's own scheduler config."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dreamq.schedulers import SchedulerChoice, resolve_algorithm_type

# diffusers raises NotImplementedError for an algorithm_type outside these sets.
DPMSOLVER_ALGORITHM_TYPES: dict[str, frozenset[str]] = {
    "DPMSolverMultistepScheduler": frozenset(
        {"dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"}
    ),
    "DPMSolverSinglestepScheduler": frozenset({"dpmsolver", "dpmsolver++", "sde-dpmsolver++"}),
}

# Solver settings that belong to one class: carried into another class they can raise (DEIS
# refuses "sde-dpmsolver++") or silently mean something else.
_CLASS_SPECIFIC_KEYS = ("algorithm_type", "solver_type")


def scheduler_class(class_name: str) -> type[SchedulerMixin]:
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{class_name} is not a diffusers scheduler")
    return cls


def accepts(cls: type[SchedulerMixin], option: str) -> bool:
    return option in inspect.signature(cls.__init__).parameters


def make_scheduler(
    choice: SchedulerChoice,
    base_config: dict[str, Any],
    *,
    use_karras_sigmas: bool,
    algorithm_type: str | None,
) -> SchedulerMixin:
    """A fresh scheduler of ``choice``'s class on the model's noise schedule.

    ``choice.karras`` and ``choice.algorithm_type`` (set by A1111 names) win over the request's
    ``use_karras_sigmas`` and ``algorithm_type``. Each applies only where the class takes it, so a
    request flag never breaks a scheduler that has no such option.
    """
    cls = scheduler_class(choice.class_name)
    config = dict(base_config)
    if config.get("_class_name") != choice.class_name:
        for key in _CLASS_SPECIFIC_KEYS:
            config.pop(key, None)
    overrides: dict[str, Any] = {}
    if accepts(cls, "use_karras_sigmas"):
        overrides["use_karras_sigmas"] = (
            choice.karras if choice.karras is not None else use_karras_sigmas
        )
    if choice.class_name == "PNDMScheduler" and "skip_prk_steps" not in config:
        # PLMS, as SD's own config has it: PNDM's default Runge-Kutta warm-up needs at least 4
        # steps (fewer raise in set_timesteps), and a config from another class (ModelScope's
        # DDIM) does not say.
        overrides["skip_prk_steps"] = True
    algorithm = choice.algorithm_type or resolve_algorithm_type(algorithm_type)
    if algorithm in DPMSOLVER_ALGORITHM_TYPES.get(choice.class_name, frozenset()):
        overrides["algorithm_type"] = algorithm
    # Every diffusers scheduler is also a ConfigMixin; SchedulerMixin alone does not say so.
    scheduler: SchedulerMixin = cls.from_config(config, **overrides)
    return scheduler
