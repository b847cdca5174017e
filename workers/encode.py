"""Image encoding for stored outputs."""

from __future__ import annotations

import io

from PIL import Image

# zlib level 1 encodes a 512x512 photo 2.5x faster than Pillow's default 6 (30 vs 76 ms on the
# project machine) for a file 7% larger: beside a sub-second GPU generation, encode time matters
# more than bytes.
PNG_COMPRESS_LEVEL = 1


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
