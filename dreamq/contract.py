"""The wire contract of the Dreambooth API V4, as pydantic models split by direction.

Requests come in with the hosted API's conventions, handled here and nowhere else [compat]:
numbers may be numeric strings, flags may be "yes"/"no" (or true/false, 1/0), any optional field
may be null, unknown fields are ignored. Every failure is reported per field in the vendor's
``{field: [messages]}`` shape with Laravel-style texts ("The width must be a number.").

Responses are the bodies of spec §4; `job_body` renders a job record as the fetch (and webhook)
body so the API and the webhook dispatcher send the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dreamq.schedulers import (
    UNUSABLE_SCHEDULERS,
    resolve_algorithm_type,
    resolve_scheduler_name,
)
from storage.jobs import JobRecord, JobStatus

MAX_SEED = 2**32 - 1


def attribute(field: str) -> str:
    """[compat] Laravel names a field in messages with spaces for underscores."""
    return field.replace("_", " ")


def _fail(kind: str, template: str, info: ValidationInfo, **extra: Any) -> PydanticCustomError:
    name = attribute(info.field_name or "value")
    return PydanticCustomError(kind, template.format(attr=name, **extra))


def _blank_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _number(value: Any, info: ValidationInfo) -> float | None:
    value = _blank_to_none(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _fail("number", "The {attr} must be a number.", info)
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer too large for a float: no number we accept
            raise _fail("number", "The {attr} must be a number.", info) from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _fail("number", "The {attr} must be a number.", info) from None
    else:
        raise _fail("number", "The {attr} must be a number.", info)
    if not math.isfinite(number):
        raise _fail("number", "The {attr} must be a number.", info)
    return number


def _integer(value: Any, info: ValidationInfo) -> int | None:
    number = _number(value, info)
    if number is None:
        return None
    if not number.is_integer():
        raise _fail("integer", "The {attr} must be an integer.", info)
    return int(number)


_TRUE = {"yes", "true", "1", "y", "on"}
_FALSE = {"no", "false", "0", "n", "off"}


def _flag(value: Any, info: ValidationInfo) -> bool | None:
    value = _blank_to_none(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail("flag", 'The {attr} field must be "yes" or "no".', info)


def _text(value: Any, info: ValidationInfo) -> str | None:
    value = _blank_to_none(value)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail("string", "The {attr} must be a string.", info)
    if not _is_unicode(value):
        raise _fail("string", "The {attr} must be valid Unicode text.", info)
    return value


def _is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate: JSON's "\\ud800" escape decodes to one, and no
    UTF-8 encoder (Redis, the response body) takes it, so it would fail later with a 500."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_DOCUMENTED: dict[Callable[..., Any], dict[str, Any]] = {}
"""What a validator of ours checks, in JSON Schema words: `_document` puts it in the OpenAPI
document, so the document and the validation cannot drift apart."""


def _between(low: float, high: float, multiple_of: int | None = None) -> Callable[..., Any]:
    def check(value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        if not low <= value <= high:
            raise _fail(
                "range", "The {attr} must be between {low} and {high}.", info, low=low, high=high
            )
        if multiple_of and int(value) % multiple_of:
            raise _fail("multiple", "The {attr} must be a multiple of {m}.", info, m=multiple_of)
        return value

    limits: dict[str, Any] = {"minimum": low, "maximum": high}
    _DOCUMENTED[check] = limits | ({"multipleOf": multiple_of} if multiple_of else {})
    return check


Number = Annotated[float | None, BeforeValidator(_number)]
Integer = Annotated[int | None, BeforeValidator(_integer)]
Flag = Annotated[bool | None, BeforeValidator(_flag)]
Text = Annotated[str | None, BeforeValidator(_text)]
Size = Annotated[Integer, AfterValidator(_between(64, 1024, multiple_of=8))]


def _key(value: Any) -> str | None:
    # A key that is not a string is just an invalid key: the same answer as an unknown one, and
    # never a validation message that could echo it.
    return value if isinstance(value, str) and value else None


ApiKey = Annotated[str | None, BeforeValidator(_key)]


def _document(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Document what the validators enforce: the ranges and choices on the value's own type (a
    null still means "not given"), and the fields a request must carry as required and not null.
    They stay optional in the model so that a missing one gets the vendor's message."""
    required = [*schema.get("required", [])]
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(field.alias or name)
        if prop is None:
            continue
        funcs = [getattr(item, "func", None) for item in field.metadata]
        given = [branch for branch in prop.get("anyOf", []) if branch.get("type") != "null"]
        for func in funcs:
            if func in _DOCUMENTED and len(given) == 1:
                given[0].update(_DOCUMENTED[func])
        if _required in funcs and len(given) == 1:
            del prop["anyOf"]
            prop.pop("default", None)
            prop.update(given[0])
            if prop.get("type") == "string":
                prop["minLength"] = 1
            required.append(name)
    if required:
        schema["required"] = required


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, json_schema_extra=_document)

    key: ApiKey = Field(None, description="The API key.")


def _random_seed(value: int | None) -> int | None:
    # [compat] A1111-style clients send -1 for "random", as null means here.
    return None if value == -1 else value


def _track_id(value: Any, info: ValidationInfo) -> str | int | float | None:
    # Echoed in the webhook body: NaN and infinities (JSON 1e400) would make it invalid JSON.
    if (
        value is None
        or (isinstance(value, str) and _is_unicode(value))
        or (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, float) and math.isfinite(value))
    ):
        return value
    raise _fail("track_id", "The {attr} must be a string or a number.", info)


def _required(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        raise _fail("required", "The {attr} field is required.", info)
    return value


def _scheduler(value: str | None, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    if value in UNUSABLE_SCHEDULERS:
        raise _fail(
            "scheduler",
            "The scheduler {name} cannot be used: {why}.",
            info,
            name=value,
            why=UNUSABLE_SCHEDULERS[value],
        )
    if resolve_scheduler_name(value) is None:
        raise _fail("scheduler", "The selected {attr} is invalid.", info)
    return value


def _algorithm(value: str | None, info: ValidationInfo) -> str | None:
    """The diffusers name of the requested algorithm type."""
    if value is None:
        return None
    algorithm = resolve_algorithm_type(value)
    if algorithm is None:
        raise _fail("algorithm", "The selected {attr} is invalid.", info)
    return algorithm


def _http_url(value: str | None, info: ValidationInfo) -> str | None:
    if value is not None and not _is_http_url(value):
        raise _fail("url", "The {attr} must be a valid http or https URL.", info)
    return value


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


NO_ID_WORDS = ("none", "no", "null")


def _none_word(value: Any) -> Any:
    # [compat] clients send "none" (and "no") for "no LoRA / embedding / VAE".
    if isinstance(value, str) and value.strip().lower() in NO_ID_WORDS:
        return None
    return value


def _id_list(value: str | None, info: ValidationInfo) -> str | None:
    """A comma-separated list of registry ids, e.g. "ganyu-lora,more_details"."""
    if value is None:
        return None
    ids = tuple(part.strip() for part in value.split(","))
    if any(not part for part in ids):
        raise _fail("ids", "The {attr} must be ids separated by commas.", info)
    if len(set(ids)) != len(ids):
        raise _fail("ids", "The {attr} names an id twice.", info)
    if len(ids) > MAX_LORAS:
        raise _fail("ids", "The {attr} may name at most {n} ids.", info, n=MAX_LORAS)
    return ",".join(ids)


def _strengths(value: Any, info: ValidationInfo) -> tuple[float, ...] | None:
    """One number, or comma-separated numbers, each 0..1."""
    value = _blank_to_none(value)
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else [value]
    strengths = []
    for part in parts:
        number = _number(part, info)
        if number is None or not 0 <= number <= 1:
            raise _fail("strength", "Each {attr} must be a number between 0 and 1.", info)
        strengths.append(number)
    return tuple(strengths)


def _upscale(value: Any, info: ValidationInfo) -> int | None:
    """[compat] "yes" means 2x, "no" none; a number is the factor (1 = none)."""
    value = _blank_to_none(value)
    if value is None:
        return None
    words = (_TRUE | _FALSE) - {"1", "0"}
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in words):
        return 2 if _flag(value, info) else 1
    try:
        factor = _integer(value, info)
    except PydanticCustomError:
        factor = None
    if factor is None or not 0 <= factor <= MAX_UPSCALE:
        raise _fail(
            "upscale",
            'The {attr} must be "yes", "no" or a factor from 1 to {n}.',
            info,
            n=MAX_UPSCALE,
        )
    return max(1, factor)


def _one_of(*choices: str) -> Callable[..., Any]:
    def check(value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if value.strip().lower() not in choices:
            raise _fail(
                "choice", "The {attr} must be one of: {choices}.", info, choices=", ".join(choices)
            )
        return value.strip().lower()

    _DOCUMENTED[check] = {"enum": list(choices)}
    return check


RequiredText = Annotated[Text, AfterValidator(_required)]
IdList = Annotated[
    str | None, BeforeValidator(_none_word), BeforeValidator(_text), AfterValidator(_id_list)
]
RegistryId = Annotated[str | None, BeforeValidator(_none_word), BeforeValidator(_text)]
# Documented as what it takes (a number or a comma-separated string), not as the tuple it becomes.
Strengths = Annotated[
    tuple[float, ...] | None,
    BeforeValidator(_strengths),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}]}),
]
Upscale = Annotated[int | None, BeforeValidator(_upscale)]
Strength = Annotated[Number, AfterValidator(_between(0, 1))]
ImageRef = Annotated[Text, AfterValidator(_required)]

MAX_LORAS = 5
MAX_UPSCALE = 4
_DOCUMENTED[_upscale] = {"minimum": 0, "maximum": MAX_UPSCALE}  # the factor form; 0 and 1: none
MAX_FRAMES = 64
SAFETY_CHECKER_TYPES = ("black", "blur", "pixelate", "sensitive_content_text")


class _Prompted(_Request):
    """Fields every generation endpoint takes."""

    model_id: RequiredText = Field(
        None, validate_default=True, description="A registered model id.", examples=["demo"]
    )
    prompt: RequiredText = Field(
        None, validate_default=True, description="What to draw.", examples=["a red fox"]
    )
    negative_prompt: Text = Field(None, description="What to avoid.")
    width: Size = Field(None, description="64..1024, a multiple of 8. Default 512.")
    height: Size = Field(None, description="64..1024, a multiple of 8. Default 512.")
    num_inference_steps: Annotated[Integer, AfterValidator(_between(1, 51))] = Field(
        None, description="1..51 (a deployment may cap it lower). Default 30."
    )
    guidance_scale: Annotated[Number, AfterValidator(_between(1, 20))] = Field(
        None, description="1..20. Default 7.5."
    )
    seed: Annotated[
        Integer, AfterValidator(_random_seed), AfterValidator(_between(0, MAX_SEED))
    ] = Field(None, description="0..2^32-1; null or -1 picks one. Sample i uses seed+i.")
    scheduler: Annotated[Text, AfterValidator(_scheduler)] = Field(
        None, description="A diffusers scheduler class name or an A1111 sampler name."
    )
    use_karras_sigmas: Flag = Field(
        None, description='Karras sigmas where the scheduler supports them. Default "yes".'
    )
    algorithm_type: Annotated[Text, AfterValidator(_algorithm)] = Field(
        None, description='"dpmsolver+++" selects the SDE variant of DPMSolverMultistepScheduler.'
    )
    webhook: Annotated[Text, AfterValidator(_http_url)] = Field(
        None, description="URL that receives a POST when the job ends."
    )
    track_id: Annotated[
        Any,
        AfterValidator(_track_id),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]}),
    ] = Field(None, description="Opaque string or number echoed in the webhook body.")

    @model_validator(mode="after")
    def _algorithm_needs_dpmsolver(self) -> Any:
        if self.algorithm_type is not None and self.scheduler is not None:
            choice = resolve_scheduler_name(self.scheduler)
            if choice is not None and not choice.class_name.startswith("DPMSolver"):
                raise PydanticCustomError(
                    "fields",
                    "The algorithm type applies only to DPMSolver schedulers.",
                    {"field": "algorithm_type"},
                )
        return self


class Txt2ImgRequest(_Prompted):
    """Body of POST /api/v4/dreambooth (text to image, LoRA and multi-LoRA)."""

    samples: Annotated[Integer, AfterValidator(_between(1, 4))] = Field(
        None, description="Images from one request, 1..4. Default 1."
    )
    lora_model: IdList = Field(
        None, description='A registered LoRA id, or ids separated by commas ("a,b").'
    )
    lora_strength: Strengths = Field(
        None,
        description='0..1, one value for every LoRA or one per LoRA ("0.6,0.4"). Default 1.',
    )
    embeddings_model: RegistryId = Field(
        None,
        description="A registered textual-inversion embedding id; its token goes in the prompt.",
    )
    vae: RegistryId = Field(None, description="A registered VAE id replacing the model's VAE.")
    clip_skip: Annotated[Integer, AfterValidator(_between(1, 8))] = Field(
        None, description="1..8: CLIP layers skipped from the end, 1 skips none. Default 1."
    )
    enhance_prompt: Flag = Field(
        None, description="Append a fixed quality suffix and a default negative prompt."
    )
    safety_checker: Flag = Field(
        None, description="Replace NSFW images per safety_checker_type (needs a safety checker)."
    )
    safety_checker_type: Annotated[Text, AfterValidator(_one_of(*SAFETY_CHECKER_TYPES))] = Field(
        None, description="black (default), blur, pixelate or sensitive_content_text."
    )
    tomesd: Flag = Field(None, description="Token merging (ToMe) for speed.")
    panorama: Flag = Field(None, description="Wide image by MultiDiffusion panorama generation.")
    self_attention: Flag = Field(None, description="Self-attention guidance.")
    upscale: Upscale = Field(
        None, description='"yes" = 2x, or a factor 1..4 (needs an upscaler). Default none.'
    )
    highres_fix: Flag = Field(None, description="Two-pass generation: low resolution, then up.")
    multi_lingual: Flag = Field(
        None, description="Translate the prompt to English first (needs a translator)."
    )
    base64: Flag = Field(
        None, description="Output as base64 strings instead of URLs; inputs may be base64."
    )
    temp: Flag = Field(None, description="Output links valid 24 hours.")

    @model_validator(mode="after")
    def _strengths_match_loras(self) -> Any:
        if self.lora_strength is not None and self.lora_model is not None:
            count, given = len(self.lora_ids), len(self.lora_strength)
            if given not in (1, count):
                raise PydanticCustomError(
                    "fields",
                    f"The lora strength must give one value or one per LoRA ({count}).",
                    {"field": "lora_strength"},
                )
        return self

    @property
    def lora_ids(self) -> tuple[str, ...]:
        return tuple(self.lora_model.split(",")) if self.lora_model else ()


class Img2ImgRequest(Txt2ImgRequest):
    """Body of POST /api/v4/dreambooth/img2img."""

    init_image: ImageRef = Field(
        None,
        validate_default=True,
        description="The starting image: an http(s) URL, or base64 (with base64: yes or a data: "
        "prefix).",
    )
    strength: Strength = Field(
        None, description="0..1: how far from the init image (1 ignores it). Default 0.7."
    )
    width: Size = Field(None, description="64..1024, a multiple of 8. Default: the init image's.")
    height: Size = Field(None, description="64..1024, a multiple of 8. Default: the init image's.")


class InpaintRequest(Img2ImgRequest):
    """Body of POST /api/v4/dreambooth/inpaint."""

    mask_image: ImageRef = Field(
        None,
        validate_default=True,
        description="White repaints, black keeps: a URL or base64 like init_image.",
    )
    steps: Annotated[Integer, AfterValidator(_between(1, 51))] = Field(
        None, description="[compat] The hosted docs' name of num_inference_steps here."
    )


class Text2VideoRequest(_Prompted):
    """Body of POST /api/v4/dreambooth/text2video."""

    num_frames: Annotated[Integer, AfterValidator(_between(1, MAX_FRAMES))] = Field(
        None, description=f"1..{MAX_FRAMES}. Default 16 (or seconds x fps)."
    )
    fps: Annotated[Integer, AfterValidator(_between(1, 60))] = Field(
        None, description="Frames per second, 1..60. Default 8."
    )
    seconds: Annotated[Number, AfterValidator(_between(0.1, MAX_FRAMES))] = Field(
        None, description="Length; sets num_frames = seconds x fps when num_frames is not given."
    )
    output_type: Annotated[Text, AfterValidator(_one_of("mp4", "gif"))] = Field(
        None, description='"mp4" (default) or "gif".'
    )

    @model_validator(mode="after")
    def _frames_fit(self) -> Any:
        frames = None if self.seconds is None else round(self.seconds * (self.fps or DEFAULT_FPS))
        if self.num_frames is None and frames is not None and not 1 <= frames <= MAX_FRAMES:
            raise PydanticCustomError(
                "fields",
                f"The seconds times the fps must give 1 to {MAX_FRAMES} frames.",
                {"field": "seconds"},
            )
        return self


DEFAULT_FPS = 8
DEFAULT_FRAMES = 16


GenerationRequest = Txt2ImgRequest | Img2ImgRequest | InpaintRequest | Text2VideoRequest


class ModelRequest(_Request):
    """Body of POST /api/v4/dreambooth/model_reload."""

    model_id: RequiredText = Field(None, validate_default=True, description="A registered id.")


class FetchRequest(_Request):
    """Body of POST /api/v4/dreambooth/fetch."""

    request_id: Annotated[Integer, AfterValidator(_required)] = Field(
        None, validate_default=True, description="The id a generation request answered."
    )


class KeyOnlyRequest(_Request):
    """Body of POST /api/v4/dreambooth/fetch/{id} and /model_list."""


# ---------------------------------------------------------------- responses


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ProcessingResponse(_Response):
    """What every generation endpoint answers at once (spec §4.1)."""

    status: Literal["processing"] = "processing"
    tip: str = "Your image is processing in background, you can get this image using fetch API"
    eta: float = Field(description="Seconds until the output is expected to be ready.")
    messege: str = "Try to fetch request after seconds estimated"  # [compat] the hosted spelling
    message: str = "Try to fetch request after seconds estimated"
    webhook_status: str = ""
    fetch_result: str
    id: int
    output: list[str] = Field(default_factory=list)
    meta: dict[str, Any]
    future_links: list[str]


class SuccessResponse(_Response):
    status: Literal["success"] = "success"
    generationTime: float
    id: int
    output: list[str]
    meta: dict[str, Any]
    webhook_status: str = ""


class FetchProcessingResponse(_Response):
    status: Literal["processing"] = "processing"
    id: int
    eta: float
    queue_position: int = Field(
        default=0,
        description="[dreamq] 1 for the next job a worker takes, 2 behind it, ...; 0 once a "
        "worker runs it",
    )
    messege: str = "try again later."  # [compat]
    message: str = "try again later."
    output: str = ""  # [compat] an empty string here on the hosted service, not a list


class FailedResponse(_Response):
    status: Literal["failed"] = "failed"
    id: int
    message: str
    messege: str  # [compat]
    output: str = ""


class ErrorResponse(_Response):
    status: Literal["error"] = "error"
    message: str | dict[str, list[str]]
    messege: str | dict[str, list[str]]  # [compat]


class ModelReloadResponse(_Response):
    status: Literal["success"] = "success"
    message: str = "model reload started"
    eta: float = Field(description="Seconds until the model is expected to be loaded.")


class ModelListItem(_Response):
    model_id: str
    model_name: str
    status: str = "model_ready"
    model_category: str = Field(description="stable_diffusion, stable_diffusion_xl, ...")
    family: str
    kind: str


FetchResponse = SuccessResponse | FetchProcessingResponse | FailedResponse


def _same(link: str) -> str:
    return link


def job_body(
    job: JobRecord,
    now: float,
    present: Callable[[str], str] = _same,
    waiting: tuple[float, int] | None = None,
) -> FetchResponse:
    """The fetch body of a job; the webhook body is this plus track_id. `present` turns the
    record's canonical output links into the ones given out now (presigned for a private
    bucket). `waiting`: a queued job's current estimate and queue position (storage/eta.py);
    without it a queued job answers the estimate it was given at submission."""
    if job.status is JobStatus.SUCCESS:
        return SuccessResponse(
            generationTime=job.generation_time or 0.0,
            id=job.id,
            output=[present(link) for link in job.output],
            meta=job.meta,
            webhook_status=job.webhook_status.value,
        )
    if job.status is JobStatus.FAILED:
        reason = job.error or "generation failed"
        return FailedResponse(id=job.id, message=reason, messege=reason)
    if job.status is JobStatus.QUEUED and waiting is not None:
        eta, position = waiting
        return FetchProcessingResponse(id=job.id, eta=eta, queue_position=position)
    return FetchProcessingResponse(id=job.id, eta=job.remaining_seconds(now))


def webhook_body(
    job: JobRecord, now: float, present: Callable[[str], str] = _same
) -> dict[str, Any]:
    return {**job_body(job, now, present).model_dump(), "track_id": job.track_id}
