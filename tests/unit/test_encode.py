"""Output encoding: PNG, H.264 MP4 and GIF videos decoded back, base64."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import imageio_ffmpeg  # type: ignore[import-untyped]  # no stubs, no py.typed
import numpy as np
import pytest
from PIL import Image, ImageSequence

from workers.encode import encode_png, encode_video, to_base64


def _frames(count: int, width: int = 64, height: int = 64) -> list[Image.Image]:
    # Distinct noise frames: GIF writers merge identical consecutive frames.
    return [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (height, width, 3), np.uint8))
        for i in range(count)
    ]


def _decode_mp4(data: bytes, folder: Path) -> tuple[dict[str, object], int]:
    path = folder / "video.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta: dict[str, object] = next(reader)
    return meta, sum(1 for _ in reader)


def test_png_round_trip() -> None:
    image = _frames(1)[0]
    data = encode_png(image)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))


def test_mp4_decodes_to_the_frames_rate_and_size(tmp_path: Path) -> None:
    data = encode_video(_frames(8), fps=8, fmt="mp4")
    assert data[4:8] == b"ftyp"  # an ISO BMFF file opens with its ftyp box
    meta, count = _decode_mp4(data, tmp_path)
    assert count == 8
    assert meta["fps"] == 8.0
    assert meta["size"] == (64, 64)
    assert meta["codec"] == "h264"
    assert str(meta["pix_fmt"]).startswith("yuv420p")


@pytest.mark.parametrize(("width", "height"), [(520, 72), (72, 200)])
def test_mp4_keeps_sizes_that_are_multiples_of_8(tmp_path: Path, width: int, height: int) -> None:
    # imageio-ffmpeg's default block of 16 would rescale 520 to 528 and 72 to 80.
    data = encode_video(_frames(2, width, height), fps=4, fmt="mp4")
    meta, count = _decode_mp4(data, tmp_path)
    assert meta["size"] == (width, height)
    assert count == 2


def test_gif_has_every_frame_and_loops() -> None:
    data = encode_video(_frames(5), fps=10, fmt="gif")
    gif = Image.open(io.BytesIO(data))
    assert gif.format == "GIF"
    assert sum(1 for _ in ImageSequence.Iterator(gif)) == 5
    assert gif.size == (64, 64)
    assert gif.info["loop"] == 0
    assert gif.info["duration"] == 100


def test_video_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        encode_video([], fps=8, fmt="mp4")
    with pytest.raises(ValueError, match="same size"):
        encode_video([*_frames(1), *_frames(1, 32, 32)], fps=8, fmt="gif")
    with pytest.raises(ValueError, match="frame rate"):
        encode_video(_frames(2), fps=0, fmt="mp4")


def test_base64_round_trip_is_plain() -> None:
    data = bytes(range(256)) * 3
    text = to_base64(data)
    assert not text.startswith("data:")
    assert "\n" not in text
    assert base64.b64decode(text, validate=True) == data
