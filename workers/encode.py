"""Encoding of stored outputs: PNG images, MP4/GIF videos, and base64 for `base64: yes` jobs."""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import imageio_ffmpeg  # type: ignore[import-untyped]  # no stubs, no py.typed
import numpy as np
from PIL import Image

# zlib level 1 encodes a 512x512 photo 2.5x faster than Pillow's default 6 (30 vs 76 ms on the
# project machine) for a file 7% larger: beside a sub-second GPU generation, encode time matters
# more than bytes.
PNG_COMPRESS_LEVEL = 1

VideoFormat = Literal["mp4", "gif"]

# yuv420p stores colour at half resolution in both axes, so it needs even sizes, and that is all
# libx264 needs: with imageio-ffmpeg's default of 16, a 520x520 video (a valid request size,
# a multiple of 8) would be silently rescaled to 528x528.
MP4_MACRO_BLOCK_SIZE = 2
# x264's constant-quality factor (0 lossless .. 51 worst; its own default is 23). Generated
# frames are smooth and short: 20 keeps detail at a few hundred KB per second of 512x512 video.
MP4_CRF = 20
# The slowest a video encode may take before it counts as a failure (a wedged ffmpeg process must
# not hold the GPU worker forever); 64 frames of 1024x1024 take a few seconds.
FFMPEG_TIMEOUT_SECONDS = 300.0


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_video(frames: Sequence[Image.Image], *, fps: int, fmt: VideoFormat) -> bytes:
    """Encode frames of one size as an H.264 MP4 (yuv420p) or an endlessly looping GIF.

    ValueError for no frames, frames of different sizes, or a frame rate below 1.
    """
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fps < 1:
        raise ValueError(f"the frame rate must be at least 1, got {fps}")
    size = frames[0].size
    if any(frame.size != size for frame in frames):
        raise ValueError("every frame of a video must have the same size")
    if fmt == "mp4":
        return _encode_mp4(frames, fps=fps)
    if fmt == "gif":
        return _encode_gif(frames, fps=fps)
    raise ValueError(f"unknown video format {fmt!r}")


def _encode_mp4(frames: Sequence[Image.Image], *, fps: int) -> bytes:
    width, height = frames[0].size
    # ffmpeg writes the MP4 index (moov) after the frames and then, for +faststart, moves it to
    # the front so players can start before the whole file has arrived; both need a seekable
    # file, not a pipe.
    with tempfile.TemporaryDirectory(prefix="dreamq-video-") as folder:
        path = Path(folder) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=MP4_MACRO_BLOCK_SIZE,
            quality=None,  # imageio-ffmpeg would otherwise add its own -crf
            output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart"],
            ffmpeg_log_level="error",
            ffmpeg_timeout=FFMPEG_TIMEOUT_SECONDS,
        )
        writer.send(None)  # start the generator (and the ffmpeg process)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"))))
        finally:
            writer.close()  # flushes and waits for ffmpeg; raises if ffmpeg failed
        return path.read_bytes()


def _encode_gif(frames: Sequence[Image.Image], *, fps: int) -> bytes:
    rgb = [frame.convert("RGB") for frame in frames]
    buffer = io.BytesIO()
    # GIF stores delays in 1/100 s and Pillow truncates: 8 fps (125 ms) plays at 120 ms a frame.
    # Pillow also merges a frame identical to the one before into a longer delay; timing holds.
    rgb[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=rgb[1:],
        duration=1000 / fps,
        loop=0,  # 0 = loop forever
    )
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    """Standard base64 (RFC 4648 alphabet, padded, no line breaks) of ``data``.

    No ``data:image/png;base64,`` prefix: a client decodes the string as is, and the content
    type follows from the job's output format (png, mp4 or gif).
    """
    return base64.b64encode(data).decode("ascii")
