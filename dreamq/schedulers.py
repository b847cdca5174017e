"""Scheduler names a request may give: diffusers class names and A1111 sampler names.

Torch-free on purpose: the API validates names with these tables and never imports diffusers.
The worker turns a `SchedulerChoice` into a scheduler object (workers/schedulers.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerChoice:
    """A diffusers scheduler class plus the settings a sampler name implies.

    ``karras`` and ``algorithm_type`` are None when the name leaves them to the request; a value
    here overrides the request (``"DPM++ 2M"`` means no Karras sigmas whatever the flag says).
    ``algorithm_type`` is a diffusers value, never a wire alias.
    """

    class_name: str
    karras: bool | None = None
    algorithm_type: str | None = None


# Every class name below drives StableDiffusionPipeline text-to-image to a finite image in
# diffusers 0.42.1, checked by tests/unit/test_schedulers.py on a tiny model.
SCHEDULER_NAMES: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    # Runs on any epsilon model; sharp images in 2-8 steps need LCM-distilled weights or LoRA.
    "LCMScheduler",
)

# Contract names that exist in diffusers 0.42.1 but cannot generate from SD latents; the API
# refuses them with this reason (the test checks each one really fails or runs backwards).
UNUSABLE_SCHEDULERS: dict[str, str] = {
    # Walks timesteps from clean to noisy: it inverts an image into noise, it does not generate.
    "DDIMInverseScheduler": "it is an inversion scheduler that turns images into noise",
    # Continuous time in [0, 1] and v-diffusion's parameterisation; SD's UNet expects integer
    # timesteps 0..999 and predicts noise, so the loop runs but never denoises.
    "IPNDMScheduler": "it uses v-diffusion's continuous timesteps, which Stable Diffusion "
    "models do not understand",
    # step() needs the churned sample from add_noise_to_input(), which the SD pipeline never
    # calls: the first step raises TypeError.
    "KarrasVeScheduler": "it is a variance-exploding scheduler for unconditional models and "
    "cannot drive Stable Diffusion",
    # Has step_pred()/step_correct() instead of step(): the first step raises AttributeError.
    "ScoreSdeVeScheduler": "it is a score-SDE variance-exploding scheduler and cannot drive "
    "Stable Diffusion",
}

_DPM_2M = "DPMSolverMultistepScheduler"
_DPM_SINGLE = "DPMSolverSinglestepScheduler"
_SDE = "sde-dpmsolver++"

# A1111 sampler names, as its UI spells them.
A1111_NAMES: dict[str, SchedulerChoice] = {
    "DPM++ 2M": SchedulerChoice(_DPM_2M, karras=False, algorithm_type="dpmsolver++"),
    "DPM++ 2M Karras": SchedulerChoice(_DPM_2M, karras=True, algorithm_type="dpmsolver++"),
    "DPM++ 2M SDE": SchedulerChoice(_DPM_2M, karras=False, algorithm_type=_SDE),
    "DPM++ 2M SDE Karras": SchedulerChoice(_DPM_2M, karras=True, algorithm_type=_SDE),
    # A1111's "DPM++ SDE" is diffusers' DPMSolverSDEScheduler, which needs torchsde (not a
    # dependency); the single-step solver in its SDE form is the closest built-in match.
    "DPM++ SDE": SchedulerChoice(_DPM_SINGLE, karras=False, algorithm_type=_SDE),
    "DPM++ SDE Karras": SchedulerChoice(_DPM_SINGLE, karras=True, algorithm_type=_SDE),
    "DPM2": SchedulerChoice("KDPM2DiscreteScheduler", karras=False),
    "DPM2 Karras": SchedulerChoice("KDPM2DiscreteScheduler", karras=True),
    "DPM2 a": SchedulerChoice("KDPM2AncestralDiscreteScheduler", karras=False),
    "DPM2 a Karras": SchedulerChoice("KDPM2AncestralDiscreteScheduler", karras=True),
    "Euler": SchedulerChoice("EulerDiscreteScheduler", karras=False),
    "Euler Karras": SchedulerChoice("EulerDiscreteScheduler", karras=True),
    "Euler a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "Heun": SchedulerChoice("HeunDiscreteScheduler", karras=False),
    "Heun Karras": SchedulerChoice("HeunDiscreteScheduler", karras=True),
    "LMS": SchedulerChoice("LMSDiscreteScheduler", karras=False),
    "LMS Karras": SchedulerChoice("LMSDiscreteScheduler", karras=True),
    "DDIM": SchedulerChoice("DDIMScheduler"),
    "PLMS": SchedulerChoice("PNDMScheduler"),
    "UniPC": SchedulerChoice("UniPCMultistepScheduler"),
    "LCM": SchedulerChoice("LCMScheduler"),
}

# The algorithm_type values a request may send, to diffusers' own.
ALGORITHM_TYPES: dict[str, str] = {
    "dpmsolver": "dpmsolver",
    "dpmsolver++": "dpmsolver++",
    "sde-dpmsolver": "sde-dpmsolver",
    "sde-dpmsolver++": _SDE,
    "dpmsolver+++": _SDE,  # [compat] the hosted API's name for the SDE variant
}

_CLASS_CHOICES = {name: SchedulerChoice(name) for name in SCHEDULER_NAMES}
_A1111_BY_LOWER = {name.lower(): choice for name, choice in A1111_NAMES.items()}


def resolve_scheduler_name(name: str) -> SchedulerChoice | None:
    """The choice a name stands for: exact class names, case-insensitive A1111 names.

    None for unknown names and for the names in `UNUSABLE_SCHEDULERS`.
    """
    return _CLASS_CHOICES.get(name) or _A1111_BY_LOWER.get(name.strip().lower())


def resolve_algorithm_type(value: str | None) -> str | None:
    """diffusers' algorithm_type for a request value; None for None and for unknown values."""
    return None if value is None else ALGORITHM_TYPES.get(value.strip().lower())
