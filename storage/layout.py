"""Where objects live in the object store. The API promises output keys before the job runs."""

from __future__ import annotations

TEMP_PREFIX = "temp/"
"""Outputs of `temp: "yes"` jobs: a bucket lifecycle rule deletes them after a day."""

TEMP_LIFETIME_SECONDS = 24 * 3600


def output_key(file_prefix: str, index: int, extension: str = "png", *, temp: bool = False) -> str:
    """Object key of output `index` of a job; `file_prefix` is the job's unguessable uuid."""
    key = f"generations/{file_prefix}-{index}.{extension}"
    return TEMP_PREFIX + key if temp else key


def input_key(token: str, field: str) -> str:
    """Object key of an input image the API received as base64 (init_image, mask_image).

    ``token`` is a secret of the job record alone, never the public file_prefix."""
    return f"{TEMP_PREFIX}inputs/{token}-{field}"
