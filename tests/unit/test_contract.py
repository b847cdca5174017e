"""Txt2ImgRequest parsing and the fetch/webhook bodies: the wire contract (spec §1, §3.1, §4, §5).

Error maps are asserted as clients see them: pydantic's errors, relocated under "body" the way
FastAPI reports a body model, then mapped by `api.errors.field_errors`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from api.errors import field_errors
from dreamq.contract import (
    MAX_SEED,
    Img2ImgRequest,
    InpaintRequest,
    Text2VideoRequest,
    Txt2ImgRequest,
    job_body,
    webhook_body,
)
from dreamq.schedulers import SCHEDULER_NAMES, UNUSABLE_SCHEDULERS, resolve_algorithm_type
from storage.jobs import JobRecord, JobStatus, WebhookStatus

BASE = {"model_id": "demo", "prompt": "a red fox"}


def parse(**fields: Any) -> Txt2ImgRequest:
    return Txt2ImgRequest.model_validate({**BASE, **fields})


def errors_of(body: dict[str, Any]) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as info:
        Txt2ImgRequest.model_validate(body)
    # FastAPI reports a body model's errors under ("body", field, ...).
    relocated = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return field_errors(relocated)


def field_error(**fields: Any) -> dict[str, list[str]]:
    return errors_of({**BASE, **fields})


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("width", "512", 512),
        ("width", " 512 ", 512),
        ("width", 512, 512),
        ("width", 512.0, 512),
        ("width", "512.0", 512),
        ("height", "768", 768),
        ("samples", "2", 2),
        ("num_inference_steps", " 30 ", 30),
        ("num_inference_steps", 30, 30),
        ("guidance_scale", "7.5", 7.5),
        ("guidance_scale", 7, 7.0),
        ("guidance_scale", " 12.25", 12.25),
        ("seed", "3361266218", 3361266218),
        ("seed", 0, 0),
    ],
)
def test_numbers_and_numeric_strings_are_accepted(field: str, value: Any, expected: Any) -> None:
    parsed = getattr(parse(**{field: value}), field)
    assert parsed == expected
    assert type(parsed) is type(expected)


@pytest.mark.parametrize("value", [None, "", "  "])
@pytest.mark.parametrize(
    "field",
    ["width", "samples", "guidance_scale", "seed", "scheduler", "webhook", "use_karras_sigmas"],
)
def test_null_and_blank_mean_not_given(field: str, value: Any) -> None:
    assert getattr(parse(**{field: value}), field) is None


@pytest.mark.parametrize("value", ["abc", "12px", "nan", "inf", "1e400", True, [512], {"a": 1}])
def test_non_numbers_are_refused_naming_the_field(value: Any) -> None:
    assert field_error(width=value) == {"width": ["The width must be a number."]}
    assert field_error(guidance_scale=value) == {
        "guidance_scale": ["The guidance scale must be a number."]
    }


def test_an_integer_too_large_for_a_float_is_a_field_error_not_a_crash() -> None:
    assert field_error(seed=10**400) == {"seed": ["The seed must be a number."]}


@pytest.mark.parametrize("value", ["1.5", 1.5, "2.000001"])
def test_fractions_for_integer_fields_are_refused(value: Any) -> None:
    assert field_error(samples=value) == {"samples": ["The samples must be an integer."]}


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("field", "low", "high", "message"),
    [
        ("width", 64, 1024, "The width must be between 64 and 1024."),
        ("height", 64, 1024, "The height must be between 64 and 1024."),
        ("samples", 1, 4, "The samples must be between 1 and 4."),
        ("num_inference_steps", 1, 51, "The num inference steps must be between 1 and 51."),
        ("guidance_scale", 1, 20, "The guidance scale must be between 1 and 20."),
        ("seed", 0, MAX_SEED, "The seed must be between 0 and 4294967295."),
    ],
)
def test_range_limits_are_inclusive(field: str, low: int, high: int, message: str) -> None:
    step = 8 if field in ("width", "height") else 1
    assert getattr(parse(**{field: low}), field) == low
    assert getattr(parse(**{field: str(high)}), field) == high
    below = low - step if field != "seed" else -2  # -1 is the "random" seed
    assert field_error(**{field: below}) == {field: [message]}
    assert field_error(**{field: high + step}) == {field: [message]}


def test_seed_minus_one_means_random_like_null() -> None:
    assert parse(seed=-1).seed is None
    assert parse(seed="-1").seed is None


def test_track_id_must_be_a_string_or_a_number() -> None:
    assert field_error(track_id=[1]) == {"track_id": ["The track id must be a string or a number."]}
    assert field_error(track_id=True) == {
        "track_id": ["The track id must be a string or a number."]
    }
    assert parse(track_id=7).track_id == 7


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "order \ud800"])
def test_track_id_that_would_break_the_webhook_body_is_refused(value: Any) -> None:
    # Found fuzzing the API (R25): JSON 1e400 and NaN parse to floats that json.dumps writes
    # as Infinity/NaN (not JSON), a "\ud800" escape to a lone surrogate.
    assert field_error(track_id=value) == {
        "track_id": ["The track id must be a string or a number."]
    }


@pytest.mark.parametrize(
    "field", ["prompt", "negative_prompt", "model_id", "webhook", "lora_model", "vae", "scheduler"]
)
def test_text_with_a_lone_surrogate_is_refused_naming_the_field(field: str) -> None:
    # Found fuzzing the API (R25): "\ud800" in a JSON string decodes to a lone surrogate,
    # which Redis' encoder and the response's UTF-8 body refuse later (a 500).
    name = field.replace("_", " ")
    assert field_error(**{field: "a \ud800 fox"}) == {
        field: [f"The {name} must be valid Unicode text."]
    }
    assert parse(prompt="a fox \U0001f98a").prompt == "a fox \U0001f98a"  # a real pair is fine


def test_guidance_scale_range_applies_to_fractions() -> None:
    assert field_error(guidance_scale="0.99") == {
        "guidance_scale": ["The guidance scale must be between 1 and 20."]
    }
    assert field_error(guidance_scale=20.01) == {
        "guidance_scale": ["The guidance scale must be between 1 and 20."]
    }


def test_seed_2_to_the_32_is_out_of_range() -> None:
    assert parse(seed=2**32 - 1).seed == 2**32 - 1
    assert field_error(seed=2**32) == {"seed": ["The seed must be between 0 and 4294967295."]}


@pytest.mark.parametrize("field", ["width", "height"])
@pytest.mark.parametrize("value", [100, "513", 1020])
def test_sizes_must_be_multiples_of_8(field: str, value: Any) -> None:
    attr = field.replace("_", " ")
    assert field_error(**{field: value}) == {field: [f"The {attr} must be a multiple of 8."]}


# ---------------------------------------------------------------- required fields


def test_missing_prompt_uses_the_documented_message() -> None:
    assert errors_of({"model_id": "demo"}) == {"prompt": ["The prompt field is required."]}


def test_missing_model_id_and_prompt_are_both_reported() -> None:
    assert errors_of({"key": "dq_x"}) == {
        "model_id": ["The model id field is required."],
        "prompt": ["The prompt field is required."],
    }


@pytest.mark.parametrize("value", [None, "", "   "])
def test_blank_prompt_is_missing(value: Any) -> None:
    assert field_error(prompt=value) == {"prompt": ["The prompt field is required."]}


def test_prompt_that_is_not_text_is_refused() -> None:
    assert field_error(prompt=5) == {"prompt": ["The prompt must be a string."]}


def test_several_bad_fields_are_reported_together() -> None:
    body = {"model_id": "demo", "width": "abc", "samples": "1.5", "seed": -2, "height": 100}
    assert errors_of(body) == {
        "prompt": ["The prompt field is required."],
        "width": ["The width must be a number."],
        "height": ["The height must be a multiple of 8."],
        "samples": ["The samples must be an integer."],
        "seed": ["The seed must be between 0 and 4294967295."],
    }


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("yes", True),
        ("no", False),
        ("Yes", True),
        ("NO", False),
        ("true", True),
        ("false", False),
        ("TRUE", True),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("1", True),
        ("0", False),
        (" yes ", True),
        (None, None),
        ("", None),
    ],
)
def test_flags_accept_the_vendor_spellings(value: Any, expected: bool | None) -> None:
    assert parse(use_karras_sigmas=value).use_karras_sigmas is expected


@pytest.mark.parametrize("value", ["maybe", 2, "yess", [True]])
def test_other_flag_values_are_refused(value: Any) -> None:
    assert field_error(use_karras_sigmas=value) == {
        "use_karras_sigmas": ['The use karras sigmas field must be "yes" or "no".']
    }


# ---------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_usable_class_name_is_accepted(name: str) -> None:
    assert parse(scheduler=name).scheduler == name


@pytest.mark.parametrize(
    "name", ["DPM++ 2M Karras", "DPM++ 2M SDE", "Euler a", "euler a", "EULER A", "dpm2 a karras"]
)
def test_a1111_names_are_accepted_case_insensitively(name: str) -> None:
    assert parse(scheduler=name).scheduler == name


@pytest.mark.parametrize("name", ["NoSuchScheduler", "Euler b", "eulerdiscrete"])
def test_unknown_scheduler_is_refused(name: str) -> None:
    assert field_error(scheduler=name) == {"scheduler": ["The selected scheduler is invalid."]}


@pytest.mark.parametrize(("name", "why"), sorted(UNUSABLE_SCHEDULERS.items()))
def test_unusable_scheduler_is_refused_naming_it(name: str, why: str) -> None:
    assert field_error(scheduler=name) == {
        "scheduler": [f"The scheduler {name} cannot be used: {why}."]
    }


@pytest.mark.parametrize(
    "scheduler", [None, "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPM++ 2M"]
)
@pytest.mark.parametrize("algorithm", ["dpmsolver+++", "DPMSolver+++", "sde-dpmsolver++"])
def test_algorithm_type_accepted_with_dpmsolver(scheduler: str | None, algorithm: str) -> None:
    # The request's name becomes diffusers' own: the hosted "dpmsolver+++" is the SDE variant.
    parsed = parse(scheduler=scheduler, algorithm_type=algorithm).algorithm_type
    assert parsed == resolve_algorithm_type(algorithm)
    assert parsed is not None


def test_unknown_algorithm_type_is_refused() -> None:
    assert field_error(algorithm_type="dpmsolver++++") == {
        "algorithm_type": ["The selected algorithm type is invalid."]
    }


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "Euler a", "DDIMScheduler"])
def test_algorithm_type_with_a_non_dpmsolver_scheduler_is_refused(scheduler: str) -> None:
    assert field_error(scheduler=scheduler, algorithm_type="dpmsolver+++") == {
        "algorithm_type": ["The algorithm type applies only to DPMSolver schedulers."]
    }


# ---------------------------------------------------------------- webhook


@pytest.mark.parametrize(
    "url",
    ["https://example.com/hook", "http://hooks.example.com:8080/a?b=c", "http://[2001:db8::1]/"],
)
def test_http_webhooks_are_accepted(url: str) -> None:
    assert parse(webhook=url).webhook == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "example.com/hook",
        "http://",
        "https:///path-only",
        "javascript:alert(1)",
        "http://[::1",
        "http://example.com:99999/",
    ],
)
def test_other_webhooks_are_refused(url: str) -> None:
    assert field_error(webhook=url) == {
        "webhook": ["The webhook must be a valid http or https URL."]
    }


# ---------------------------------------------------------------- LoRA, helpers, flags

FLAGS = [
    "enhance_prompt",
    "safety_checker",
    "tomesd",
    "panorama",
    "self_attention",
    "highres_fix",
    "multi_lingual",
    "base64",
    "temp",
]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("No", False), (None, None)])
def test_feature_flags_parse(flag: str, value: Any, expected: bool | None) -> None:
    assert getattr(parse(**{flag: value}), flag) is expected


@pytest.mark.parametrize(
    ("lora_model", "ids"),
    [
        ("ganyu-lora", ("ganyu-lora",)),
        ("ganyu-lora, more_details", ("ganyu-lora", "more_details")),
        ("none", ()),
        ("", ()),
        (None, ()),
    ],
)
def test_lora_model_is_one_id_or_a_comma_separated_list(lora_model: Any, ids: Any) -> None:
    assert parse(lora_model=lora_model).lora_ids == ids


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a,,b", "The lora model must be ids separated by commas."),
        ("a,a", "The lora model names an id twice."),
        ("a,b,c,d,e,f", "The lora model may name at most 5 ids."),
    ],
)
def test_bad_lora_lists_are_refused(value: str, message: str) -> None:
    assert field_error(lora_model=value) == {"lora_model": [message]}


@pytest.mark.parametrize(
    ("value", "expected"), [("0.6,0.4", (0.6, 0.4)), (0.5, (0.5,)), ("1", (1.0,))]
)
def test_lora_strength_is_one_or_more_numbers(value: Any, expected: Any) -> None:
    assert parse(lora_model="a,b", lora_strength=value).lora_strength == expected


@pytest.mark.parametrize("value", ["1.5", -0.1, "0.2,2"])
def test_lora_strength_outside_0_1_is_refused(value: Any) -> None:
    assert field_error(lora_model="a,b", lora_strength=value) == {
        "lora_strength": ["Each lora strength must be a number between 0 and 1."]
    }


def test_lora_strength_must_be_numbers() -> None:
    assert field_error(lora_model="a,b", lora_strength="0.5,x") == {
        "lora_strength": ["The lora strength must be a number."]
    }


def test_lora_strength_count_must_match() -> None:
    assert field_error(lora_model="a,b", lora_strength="0.1,0.2,0.3") == {
        "lora_strength": ["The lora strength must give one value or one per LoRA (2)."]
    }


@pytest.mark.parametrize(
    ("value", "factor"),
    [
        ("yes", 2),
        (True, 2),
        ("no", 1),
        (False, 1),
        ("1", 1),
        ("2", 2),
        (3, 3),
        ("4", 4),
        (None, None),
    ],
)
def test_upscale_is_a_flag_or_a_factor(value: Any, factor: int | None) -> None:
    assert parse(upscale=value).upscale == factor


@pytest.mark.parametrize("value", ["5", "x", 2.5, -1])
def test_other_upscale_values_are_refused(value: Any) -> None:
    assert field_error(upscale=value) == {
        "upscale": ['The upscale must be "yes", "no" or a factor from 1 to 4.']
    }


@pytest.mark.parametrize("field", ["embeddings_model", "vae"])
def test_none_means_no_embedding_or_vae(field: str) -> None:
    assert getattr(parse(**{field: "none"}), field) is None
    assert getattr(parse(**{field: "x"}), field) == "x"


def test_clip_skip_range() -> None:
    assert parse(clip_skip="2").clip_skip == 2
    assert field_error(clip_skip=9) == {"clip_skip": ["The clip skip must be between 1 and 8."]}


def test_safety_checker_type_choices() -> None:
    assert parse(safety_checker_type="Blur").safety_checker_type == "blur"
    assert field_error(safety_checker_type="melt") == {
        "safety_checker_type": [
            "The safety checker type must be one of: black, blur, pixelate, sensitive_content_text."
        ]
    }


def test_img2img_needs_an_init_image_and_strength_in_0_1() -> None:
    errors = field_errors(_errors(Img2ImgRequest, {**BASE, "strength": 1.5}))
    assert errors == {
        "init_image": ["The init image field is required."],
        "strength": ["The strength must be between 0 and 1."],
    }


def test_inpaint_needs_a_mask_and_takes_steps() -> None:
    errors = field_errors(_errors(InpaintRequest, {**BASE, "init_image": "http://x/a.png"}))
    assert errors == {"mask_image": ["The mask image field is required."]}
    body = {**BASE, "init_image": "http://x/a.png", "mask_image": "http://x/m.png", "steps": "3"}
    assert InpaintRequest.model_validate(body).steps == 3


@pytest.mark.parametrize(
    ("fields", "errors"),
    [
        ({"num_frames": 65}, {"num_frames": ["The num frames must be between 1 and 64."]}),
        ({"output_type": "avi"}, {"output_type": ["The output type must be one of: mp4, gif."]}),
        (
            {"seconds": 9, "fps": 8},
            {"seconds": ["The seconds times the fps must give 1 to 64 frames."]},
        ),
        ({"fps": 0}, {"fps": ["The fps must be between 1 and 60."]}),
    ],
)
def test_text2video_limits(fields: dict[str, Any], errors: dict[str, list[str]]) -> None:
    assert field_errors(_errors(Text2VideoRequest, {**BASE, **fields})) == errors


def _errors(model: type[Any], body: dict[str, Any]) -> Any:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]


# ---------------------------------------------------------------- key, unknown fields, track_id


def test_unknown_fields_are_ignored() -> None:
    request = parse(foo="bar", X_Requested_With="XMLHttpRequest", instant_response="no")
    dumped = request.model_dump()
    assert "foo" not in dumped
    assert "instant_response" not in dumped
    assert request.prompt == "a red fox"


@pytest.mark.parametrize("value", [12345, ["dq_abc"], {"k": "dq_abc"}, True, "", None])
def test_a_key_that_is_not_a_nonempty_string_becomes_none(value: Any) -> None:
    assert parse(key=value).key is None


def test_a_string_key_is_kept() -> None:
    assert parse(key="dq_abc").key == "dq_abc"


@pytest.mark.parametrize("key", ["dq_SECRET_in_errors", {"nested": "dq_SECRET_in_errors"}, 7])
def test_the_key_never_appears_in_any_error(key: Any) -> None:
    body = {
        "key": key,
        "model_id": "demo",
        "width": "abc",
        "samples": "1.5",
        "scheduler": "nope",
        "lora_model": "x",
    }
    errors = errors_of(body)
    assert "key" not in errors
    assert "SECRET" not in json.dumps(errors)
    # The model-level check (it sees the whole body) must not leak it either.
    model_level = errors_of(
        {**BASE, "key": key, "scheduler": "Euler", "algorithm_type": "dpmsolver+++"}
    )
    assert "SECRET" not in json.dumps(model_level)
    assert list(model_level) == ["algorithm_type"]


@pytest.mark.parametrize("value", ["order-17", "42", 42, None])
def test_track_id_keeps_its_type(value: Any) -> None:
    parsed = parse(track_id=value).track_id
    assert parsed == value
    assert type(parsed) is type(value)


# ---------------------------------------------------------------- response bodies

NOW = 10_000.0
META = {"prompt": "a red fox", "W": 512, "H": 512, "seed": 7, "steps": 30}


def record(status: JobStatus, **fields: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": 29763508,
        "status": status,
        "owner": "key-id",
        "model_id": "demo",
        "kind": "txt2img",
        "params": {"prompt": "a red fox"},
        "meta": META,
        "file_prefix": "d00bf96e",
        "future_links": ["https://out.test/generations/d00bf96e-0.png"],
        "created_at": NOW - 5,
        "updated_at": NOW - 1,
        "eta_at": NOW + 12.5,
        "predicted_seconds": 3.0,
        **fields,
    }
    return JobRecord(**values)


def test_success_body() -> None:
    job = record(
        JobStatus.SUCCESS,
        output=["https://out.test/a-0.png", "https://out.test/a-1.png"],
        generation_time=1.93,
        webhook_status=WebhookStatus.SENT,
        eta_at=NOW - 3,
    )
    assert job_body(job, NOW).model_dump() == {
        "status": "success",
        "generationTime": 1.93,
        "id": 29763508,
        "output": ["https://out.test/a-0.png", "https://out.test/a-1.png"],
        "meta": META,
        "webhook_status": "sent",
    }


def test_success_body_without_a_webhook_has_an_empty_webhook_status() -> None:
    job = record(JobStatus.SUCCESS, output=["u"], generation_time=2.0)
    assert job_body(job, NOW).model_dump()["webhook_status"] == ""


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.PROCESSING])
def test_processing_body_has_remaining_eta_and_empty_string_output(status: JobStatus) -> None:
    body = job_body(record(status, eta_at=NOW + 12.5), NOW).model_dump()
    assert body == {
        "status": "processing",
        "id": 29763508,
        "eta": 12.5,
        "queue_position": 0,
        "messege": "try again later.",
        "message": "try again later.",
        "output": "",
    }
    assert '"output":""' in json.dumps(body, separators=(",", ":"))


def test_a_queued_job_answers_its_current_estimate_and_position() -> None:
    job = record(JobStatus.QUEUED, eta_at=NOW + 12.5)
    body = job_body(job, NOW, waiting=(3.25, 4)).model_dump()
    assert (body["eta"], body["queue_position"]) == (3.25, 4)
    # A running job is past the queue: the estimate is its own remaining run time.
    running = record(JobStatus.PROCESSING, eta_at=NOW + 12.5)
    assert job_body(running, NOW, waiting=(3.25, 4)).model_dump()["queue_position"] == 0


def test_processing_eta_never_goes_negative() -> None:
    body = job_body(record(JobStatus.PROCESSING, eta_at=NOW - 40), NOW).model_dump()
    assert body["eta"] == 0.0


def test_processing_eta_counts_down_with_time() -> None:
    job = record(JobStatus.PROCESSING, eta_at=NOW + 10)
    assert job_body(job, NOW + 4).model_dump()["eta"] == 6.0


def test_failed_body_has_both_spellings() -> None:
    body = job_body(record(JobStatus.FAILED, error="out of memory"), NOW).model_dump()
    assert body == {
        "status": "failed",
        "id": 29763508,
        "message": "out of memory",
        "messege": "out of memory",
        "output": "",
    }


def test_failed_body_without_a_reason_still_says_something() -> None:
    body = job_body(record(JobStatus.FAILED), NOW).model_dump()
    assert body["message"]
    assert body["messege"] == body["message"]


@pytest.mark.parametrize("track_id", ["order-17", 17, None])
def test_webhook_body_is_the_fetch_body_plus_track_id(track_id: Any) -> None:
    job = record(
        JobStatus.SUCCESS, output=["u"], generation_time=1.0, track_id=track_id, eta_at=NOW
    )
    body = webhook_body(job, NOW)
    assert body == {**job_body(job, NOW).model_dump(), "track_id": track_id}
    assert "track_id" in body
    assert json.loads(json.dumps(body))["track_id"] == track_id


def test_webhook_body_of_a_failed_job() -> None:
    job = record(JobStatus.FAILED, error="model not loaded", track_id="t-1")
    assert webhook_body(job, NOW) == {
        "status": "failed",
        "id": 29763508,
        "message": "model not loaded",
        "messege": "model not loaded",
        "output": "",
        "track_id": "t-1",
    }
