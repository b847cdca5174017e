"""The job parameters the API stores and the worker reads back."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dreamq.jobparams import ImageInput, JobParams, LoraChoice


def full() -> JobParams:
    return JobParams(
        kind="inpaint",
        prompt="a fox",
        width=None,
        height=None,
        loras=(LoraChoice("a", 0.5), LoraChoice("b")),
        init_image=ImageInput(url="https://example.com/a.png"),
        mask_image=ImageInput(object_key="temp/inputs/x-mask_image"),
        strength=0.4,
        upscale=2,
        safety_checker=True,
        safety_checker_type="blur",
    )


def test_round_trip_through_a_json_dict() -> None:
    params = full()
    assert JobParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize(
    "params",
    [
        full(),
        JobParams(kind="txt2img", prompt="x"),
        JobParams.from_dict({**full().to_dict(), "later": {"a": [1]}}),
    ],
    ids=["full", "defaults", "extras"],
)
def test_to_dict_is_asdict(params: JobParams) -> None:
    """Built field by field (asdict's deep copy was a measurable part of a submission), with
    asdict's result, and nothing shared with the params but immutable values."""
    data = params.to_dict()
    assert data == dataclasses.asdict(params)
    assert list(data) == list(dataclasses.asdict(params))
    assert data["extras"] is not params.extras or not params.extras


def test_unknown_keys_of_a_stored_record_are_kept_aside() -> None:
    params = JobParams.from_dict({**full().to_dict(), "later_field": 3})
    assert params.extras == {"later_field": 3}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 65, "height": 64}, "The width must be a positive multiple of 8, got 65."),
        ({"init_image": None}, "The job has no size and no init image to take it from."),
        ({"strength": 1.5}, "The strength must lie in 0..1."),
        ({"kind": "paint"}, "The job kind paint is unknown."),
        ({"seed": -1}, "The seed must not be negative."),
        ({"safety_checker_type": "melt"}, "The safety checker type melt is unknown."),
        ({"mask_image": None}, "The job has no mask image."),
        ({"loras": [{"name": "x"}]}, "The job's parameters are malformed."),
        ({"init_image": {"url": "a", "object_key": "b"}}, "The job's parameters are malformed."),
    ],
)
def test_malformed_records_fail_with_client_messages(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        JobParams.from_dict({**full().to_dict(), **change})


def test_missing_required_keys() -> None:
    with pytest.raises(ValueError, match="incomplete"):
        JobParams.from_dict({"prompt": "x"})


def test_video_needs_frames_and_fps_and_writes_one_file() -> None:
    video = JobParams(kind="text2video", prompt="x", num_frames=8, fps=4, output_format="mp4")
    assert (video.outputs, video.content_type) == (1, "video/mp4")
    with pytest.raises(ValueError, match="frame count"):
        JobParams.from_dict({**video.to_dict(), "fps": None})
    assert JobParams(kind="txt2img", prompt="x", samples=3).outputs == 3


# --- batch_key ---------------------------------------------------------------------------------


def _job(kind: str = "txt2img", **changes: Any) -> JobParams:
    fields: dict[str, Any] = {"kind": kind, "prompt": "a fox", "negative_prompt": "blurry"}
    if kind in ("img2img", "inpaint"):
        fields |= {"init_image": ImageInput(url="https://example.com/a.png")}
    if kind == "inpaint":
        fields |= {"mask_image": ImageInput(url="https://example.com/m.png")}
    return JobParams(**(fields | changes))


def test_the_batch_key_is_plain_json_the_same_in_every_process() -> None:
    # Literal: no hash() and sorted keys, so the API and every worker agree on it.
    assert _job(loras=(LoraChoice("a", 0.5),)).batch_key() == (
        '{"algorithm_type":null,"clip_skip":1,"embedding":null,"guidance_scale":7.5,"height":512,'
        '"kind":"txt2img","loras":[["a",0.5]],"negative_prompt":true,"scheduler":null,'
        '"steps":30,"strength":null,"use_karras_sigmas":true,"vae":null,"width":512}'
    )


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a lighthouse"},
        {"negative_prompt": ""},
        {"seed": 99},
        {"base64": True},
        {"temp": True},
        {"output_format": "gif"},
        {"upscale": 2},
        {"safety_checker": True, "safety_checker_type": "blur"},
        {"multi_lingual": True},
        {"extras": {"later_field": 1}},
    ],
)
def test_jobs_differing_in_their_own_fields_share_a_batch_key(
    kind: str, change: dict[str, Any]
) -> None:
    base = _job(kind, width=64, height=64)
    assert base.batch_key() is not None
    assert _job(kind, width=64, height=64, **change).batch_key() == base.batch_key()


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_jobs_differing_in_samples_share_a_batch_key(kind: str) -> None:
    one = _job(kind, width=64, height=64)
    assert one.batch_key() is not None
    assert _job(kind, width=64, height=64, samples=4).batch_key() == one.batch_key()


def test_own_inputs_and_equal_values_spelled_differently_share_a_batch_key() -> None:
    base = _job("inpaint", width=64, height=64, guidance_scale=7)
    other = _job(
        "inpaint",
        width=64,
        height=64,
        guidance_scale=7.0,  # a record may hold either
        init_image=ImageInput(object_key="temp/inputs/other"),
        mask_image=ImageInput(object_key="temp/inputs/other-mask"),
        strength=0.7,  # DEFAULT_STRENGTH, which a job without strength runs at
    )
    assert other.batch_key() == base.batch_key()


@pytest.mark.parametrize(
    ("base", "change"),
    [
        ({"kind": "txt2img"}, {"kind": "img2img", "init_image": ImageInput(url="https://x/a")}),
        ({}, {"width": 256}),
        ({}, {"height": 256}),
        ({}, {"steps": 20}),
        ({}, {"guidance_scale": 5.0}),
        ({}, {"scheduler": "Euler"}),
        ({}, {"use_karras_sigmas": False}),
        ({}, {"algorithm_type": "dpmsolver++"}),
        ({}, {"loras": (LoraChoice("a"),)}),
        ({"loras": (LoraChoice("a"),)}, {"loras": (LoraChoice("b"),)}),
        ({"loras": (LoraChoice("a"),)}, {"loras": (LoraChoice("a", 0.5),)}),
        (
            {"loras": (LoraChoice("a"), LoraChoice("b"))},
            {"loras": (LoraChoice("b"), LoraChoice("a"))},
        ),
        ({}, {"embedding": "demo-embedding"}),
        ({}, {"vae": "demo-vae"}),
        ({}, {"clip_skip": 2}),
        # SDXL zeroes the negative embeddings for None, not for "".
        ({"negative_prompt": ""}, {"negative_prompt": None}),
        ({"kind": "img2img", "width": 64, "height": 64}, {"strength": 0.5}),
        ({"kind": "inpaint", "width": 64, "height": 64, "strength": 0.2}, {"strength": 0.3}),
        ({"kind": "img2img", "width": 64, "height": 64}, {"kind": "inpaint"}),
    ],
)
def test_every_field_of_the_shared_call_is_in_the_batch_key(
    base: dict[str, Any], change: dict[str, Any]
) -> None:
    kind = base.get("kind", "txt2img")
    one = _job(**base)
    other = _job(**({"kind": kind} | base | change))
    assert one.batch_key() is not None and other.batch_key() is not None
    assert one.batch_key() != other.batch_key()


@pytest.mark.parametrize(
    "job",
    [
        _job("text2video", num_frames=8, fps=4),
        _job(tomesd=True),
        _job(panorama=True, width=1024),
        _job(highres_fix=True),
        _job(self_attention=True),
        # Alone, its samples share one encoding of the init image; batched, each gets its own.
        _job("inpaint", width=64, height=64, samples=2),
        # The size of each comes from its own init image.
        _job("img2img", width=None, height=None),
        _job("inpaint", width=64, height=None),
        _job("img2img", width=None, height=64),
    ],
)
def test_jobs_that_never_batch_have_no_batch_key(job: JobParams) -> None:
    assert job.batch_key() is None
