"""The job parameters the API stores and the worker reads back."""

from __future__ import annotations

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
