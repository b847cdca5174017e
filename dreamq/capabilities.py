"""What this deployment can run for a model: job kinds per model kind, and field refusals.

Torch-free: the API asks at submission (a job it cannot run is refused before it is queued) and
the worker asks again before it loads a model. Every rule below is a fact about diffusers 0.42.1
(with transformers 5.24, peft 0.21, tomesd 0.1.3) measured on the tiny models by
tests/unit/test_capabilities.py: what is refused really fails or cannot be built, and what is
allowed really runs. Messages name the request field, in the vendor's shape
``{field: [messages]}``.

Facts the rules rest on (diffusers 0.42.1):

- Panorama is StableDiffusionPanoramaPipeline (MultiDiffusion): SD 1.x text-to-image only; no
  SDXL, image-to-image or inpainting variant exists. It tiles 512-pixel windows: an image no
  larger than 512 in either side is a single window, the plain image.
- Self-attention guidance is StableDiffusionSAGPipeline: SD 1.x text-to-image only, and it raises
  for schedulers with fractional (sigma-derived) timesteps.
- TextToVideoSDPipeline's UNet3DConditionModel has no LoRA loader (``load_lora_weights`` raises
  AttributeError), and tomesd divides by zero on its 5-D latents.
- Text-to-video exists for SD-style UNets only (ModelScope); no SDXL text-to-video pipeline.
- img2img and inpainting run ``int(steps * strength)`` denoising steps; zero fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dreamq.contract import NO_ID_WORDS
from dreamq.jobparams import DEFAULT_STRENGTH, JobKind, JobParams
from dreamq.registry import ModelEntry, ModelFamily, ModelKind, Registry
from dreamq.schedulers import resolve_scheduler_name

KIND_JOBS: Mapping[ModelKind, tuple[JobKind, ...]] = {
    "image": ("txt2img", "img2img", "inpaint"),
    # A 9-channel UNet always takes a mask and a masked image: it cannot draw from noise alone.
    "inpaint": ("inpaint",),
    "text2video": ("text2video",),
}

# refuse(field, message)
_Refuse = Callable[[str, str], None]

PANORAMA_WINDOW = 512
"""MultiDiffusion's window in pixels (64 latents at SD's factor 8); a panorama needs a side
longer than one window."""

# SAG reads alphas_cumprod at the current timestep, so it refuses schedulers whose timesteps are
# fractional (derived from sigmas); these are the ones among the accepted names.
SAG_SCHEDULERS: frozenset[str] = frozenset(
    {
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "LCMScheduler",
    }
)

# Helper models named in the registry that a request field needs.
_HELPER_FIELDS = (
    ("upscale", "upscaler", "no upscaler model"),
    ("safety_checker", "safety_checker", "no safety checker model"),
    ("multi_lingual", "translator", "no translation model"),
)


def job_kinds(entry: ModelEntry) -> tuple[JobKind, ...]:
    """The job kinds a registry model serves."""
    if entry.kind == "text2video" and entry.family == "sdxl":
        return ()
    return KIND_JOBS[entry.kind]


def serves(entry: ModelEntry, kind: JobKind) -> bool:
    return kind in job_kinds(entry)


def denoising_steps(steps: int, strength: float) -> int:
    """Steps img2img and inpainting run: diffusers skips the first ``1 - strength`` of them."""
    return min(int(steps * strength), steps)


def effective_strength(params: JobParams) -> float:
    # [compat] the hosted API's default strength for img2img and inpainting.
    return DEFAULT_STRENGTH if params.strength is None else params.strength


def refusals(entry: ModelEntry, params: JobParams, registry: Registry) -> dict[str, list[str]]:
    """Everything in ``params`` this deployment cannot run on ``entry``, by request field.

    Empty when the job can run. The worker adds one check only it can make, after loading: the
    clip_skip value against the model's text encoder depth.
    """
    errors: dict[str, list[str]] = {}

    def refuse(field: str, message: str) -> None:
        errors.setdefault(field, []).append(message)

    family, kind, job = entry.family, entry.kind, params.kind
    if not job_kinds(entry):
        refuse("model_id", f"No text-to-video pipeline exists for {family} models.")
        return errors
    if not serves(entry, job):
        served = ", ".join(job_kinds(entry))
        refuse("model_id", f"The model serves {served} jobs, not {job}.")
        return errors

    _adapters(entry, params, registry, refuse)

    if params.tomesd and kind == "text2video":
        refuse("tomesd", "The tomesd field is not served for text2video models.")

    if params.panorama:
        if family != "sd15":
            refuse("panorama", f"The panorama field is not served for {family} models.")
        elif job != "txt2img":
            refuse("panorama", f"The panorama field is not served for {job} jobs.")
        elif max(params.width or 0, params.height or 0) <= PANORAMA_WINDOW:
            refuse(
                "panorama",
                f"The panorama field needs a width or height above {PANORAMA_WINDOW}: a smaller "
                "image is a single window.",
            )

    if params.self_attention:
        if family != "sd15":
            refuse("self_attention", f"The self_attention field is not served for {family} models.")
        elif job != "txt2img":
            refuse("self_attention", f"The self_attention field is not served for {job} jobs.")
        elif params.panorama:
            refuse("self_attention", "The self_attention field is not served with panorama.")
        else:
            scheduler = _named_scheduler(params.scheduler or entry.default_scheduler)
            if scheduler is not None and scheduler not in SAG_SCHEDULERS:
                refuse("self_attention", sag_scheduler_message(scheduler))

    if params.highres_fix:
        if job != "txt2img":
            refuse("highres_fix", f"The highres_fix field is not served for {job} jobs.")
        elif params.panorama:
            refuse("highres_fix", "The highres_fix field is not served with panorama.")

    if job in ("img2img", "inpaint"):
        strength = effective_strength(params)
        if denoising_steps(params.steps, strength) < 1:
            refuse(
                "strength",
                f"The strength {strength} leaves no denoising step out of {params.steps}: raise "
                "the strength or num_inference_steps.",
            )

    for field, helper, what in _HELPER_FIELDS:
        wanted = params.upscale > 1 if field == "upscale" else getattr(params, field)
        if wanted and getattr(registry, helper) is None:
            refuse(field, f"The {field} field is not served: {what} is configured.")
    return errors


def sag_scheduler_message(scheduler: str) -> str:
    return (
        f"The self_attention field is not served with {scheduler}: it needs one of "
        f"{', '.join(sorted(SAG_SCHEDULERS))}."
    )


def _named_scheduler(name: str | None) -> str | None:
    choice = resolve_scheduler_name(name) if name else None
    return None if choice is None else choice.class_name


def _adapters(entry: ModelEntry, params: JobParams, registry: Registry, refuse: _Refuse) -> None:
    seen: set[str] = set()
    for index, lora in enumerate(params.loras):
        if entry.kind == "text2video":
            refuse("lora_model", "The lora_model field is not served for text2video models.")
            break
        if lora.id in seen:
            refuse("lora_model", "A LoRA is given twice.")
        seen.add(lora.id)
        known = registry.loras.get(lora.id)
        if known is None:
            refuse("lora_model", _unknown("LoRA", index, len(params.loras)))
        elif known.family != entry.family:
            refuse("lora_model", _family_message("LoRA", lora.id, known.family, entry.family))
    if params.embedding is not None:
        embedding = registry.embeddings.get(params.embedding)
        if embedding is None:
            refuse("embeddings_model", _unknown("embedding"))
        elif embedding.family != entry.family:
            refuse(
                "embeddings_model",
                _family_message("embedding", params.embedding, embedding.family, entry.family),
            )
    if params.vae is not None:
        vae = registry.vaes.get(params.vae)
        if vae is None:
            refuse("vae", _unknown("VAE"))
        elif vae.family != entry.family:
            refuse("vae", _family_message("VAE", params.vae, vae.family, entry.family))


def unknown_ids(registry: Registry, body: Mapping[str, Any]) -> dict[str, list[str]]:
    """Registry ids a raw request body names that the registry lacks, in the vendor's shape.

    For bodies that failed validation elsewhere: the answer then names these fields too, so a
    client learns every offending field at once. Values that are not text are left to the
    validation messages.
    """
    errors: dict[str, list[str]] = {}
    for field, what, known in (
        ("lora_model", "LoRA", registry.loras),
        ("embeddings_model", "embedding", registry.embeddings),
        ("vae", "VAE", registry.vaes),
    ):
        value = body.get(field)
        if not isinstance(value, str):
            continue
        items = [part.strip() for part in value.split(",")]
        for index, item in enumerate(items):
            if item and item.lower() not in NO_ID_WORDS and item not in known:
                errors.setdefault(field, []).append(_unknown(what, index, len(items)))
    return errors


def _unknown(what: str, index: int = 0, count: int = 1) -> str:
    # The id itself is not echoed: an unknown "id" may be anything a client pasted, a key
    # included (R21). Ids the registry knows are the deployment's public names and are named.
    if count > 1:
        return f"The {what} number {index + 1} of {count} is not available."
    return f"The {what} is not available."


def _family_message(what: str, name: str, family: ModelFamily, model_family: ModelFamily) -> str:
    return f"The {what} {name} is for {family} models, not {model_family}."
