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
    if value is None or isinstance(value, str):
        return value
    raise _fail("string", "The {attr} must be a string.", info)


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


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    key: ApiKey = Field(None, description="The API key.")


def _random_seed(value: int | None) -> int | None:
    # [compat] A1111-style clients send -1 for "random", as null means here.
    return None if value == -1 else value


def _track_id(value: Any, info: ValidationInfo) -> str | int | float | None:
    if value is None or (isinstance(value, str | int | float) and not isinstance(value, bool)):
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


# Contract fields this deployment does not serve yet, each with the test of whether a value asks
# for anything. A value that asks for nothing (null, "", "no", the contract default) is accepted,
# so clients that send every field keep working; one that asks for the feature is refused by name,
# never ignored.
def _asks(value: Any) -> bool:
    return _blank_to_none(value) is not None


def _asks_flag(value: Any) -> bool:
    return _asks(value) and str(value).strip().lower() not in _FALSE


def _asks_clip_skip(value: Any) -> bool:
    return _asks(value) and str(value).strip() not in ("1", "1.0")


def _asks_upscale(value: Any) -> bool:
    return _asks_flag(value) and str(value).strip() not in ("1", "1.0")


def _not_yet_served(asks: Callable[[Any], bool]) -> Callable[..., Any]:
    def check(value: Any, info: ValidationInfo) -> Any:
        if asks(value):
            raise _fail("unserved", "The {attr} field is not served by this deployment yet.", info)
        return None

    return check


Unserved = Annotated[Any, AfterValidator(_not_yet_served(_asks))]
UnservedFlag = Annotated[Any, AfterValidator(_not_yet_served(_asks_flag))]
UnservedClipSkip = Annotated[Any, AfterValidator(_not_yet_served(_asks_clip_skip))]
UnservedUpscale = Annotated[Any, AfterValidator(_not_yet_served(_asks_upscale))]
RequiredText = Annotated[Text, AfterValidator(_required)]

NOT_YET = "Not served by this deployment yet: a value that asks for it is refused."


class Txt2ImgRequest(_Request):
    """Body of POST /api/v4/dreambooth (text to image)."""

    model_id: RequiredText = Field(
        None, validate_default=True, description="A registered model id.", examples=["demo"]
    )
    prompt: RequiredText = Field(
        None, validate_default=True, description="What to draw.", examples=["a red fox"]
    )
    negative_prompt: Text = Field(None, description="What to avoid.")
    width: Size = Field(None, description="64..1024, a multiple of 8. Default 512.")
    height: Size = Field(None, description="64..1024, a multiple of 8. Default 512.")
    samples: Annotated[Integer, AfterValidator(_between(1, 4))] = Field(
        None, description="Images from one request, 1..4. Default 1."
    )
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
    track_id: Annotated[Any, AfterValidator(_track_id)] = Field(
        None, description="Opaque string or number echoed in the webhook body."
    )

    lora_model: Unserved = Field(None, description=NOT_YET)
    lora_strength: Any = Field(None, description="Qualifies lora_model.")
    embeddings_model: Unserved = Field(None, description=NOT_YET)
    vae: Unserved = Field(None, description=NOT_YET)
    clip_skip: UnservedClipSkip = Field(None, description="Only the default, 1, is served yet.")
    enhance_prompt: UnservedFlag = Field(None, description=NOT_YET)
    safety_checker: UnservedFlag = Field(None, description=NOT_YET)
    safety_checker_type: Any = Field(None, description="Qualifies safety_checker.")
    tomesd: UnservedFlag = Field(None, description=NOT_YET)
    panorama: UnservedFlag = Field(None, description=NOT_YET)
    self_attention: UnservedFlag = Field(None, description=NOT_YET)
    upscale: UnservedUpscale = Field(None, description=NOT_YET)
    highres_fix: UnservedFlag = Field(None, description=NOT_YET)
    multi_lingual: UnservedFlag = Field(None, description=NOT_YET)
    base64: UnservedFlag = Field(None, description=NOT_YET)
    temp: UnservedFlag = Field(None, description=NOT_YET)

    @model_validator(mode="after")
    def _algorithm_needs_dpmsolver(self) -> Txt2ImgRequest:
        if self.algorithm_type is not None and self.scheduler is not None:
            choice = resolve_scheduler_name(self.scheduler)
            if choice is not None and not choice.class_name.startswith("DPMSolver"):
                raise PydanticCustomError(
                    "fields",
                    "The algorithm type applies only to DPMSolver schedulers.",
                    {"field": "algorithm_type"},
                )
        return self


class FetchRequest(_Request):
    """Body of POST /api/v4/dreambooth/fetch."""

    request_id: Annotated[Integer, AfterValidator(_required)] = Field(
        None, validate_default=True, description="The id a generation request answered."
    )


class KeyOnlyRequest(_Request):
    """Body of POST /api/v4/dreambooth/fetch/{id}."""


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


FetchResponse = SuccessResponse | FetchProcessingResponse | FailedResponse


def job_body(job: JobRecord, now: float) -> FetchResponse:
    """The fetch body of a job; the webhook body is this plus track_id."""
    if job.status is JobStatus.SUCCESS:
        return SuccessResponse(
            generationTime=job.generation_time or 0.0,
            id=job.id,
            output=job.output,
            meta=job.meta,
            webhook_status=job.webhook_status.value,
        )
    if job.status is JobStatus.FAILED:
        reason = job.error or "generation failed"
        return FailedResponse(id=job.id, message=reason, messege=reason)
    return FetchProcessingResponse(id=job.id, eta=job.remaining_seconds(now))


def webhook_body(job: JobRecord, now: float) -> dict[str, Any]:
    return {**job_body(job, now).model_dump(), "track_id": job.track_id}
