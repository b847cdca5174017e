"""Where outputs live in the object store. The API promises these keys before the job runs."""

from __future__ import annotations


def output_key(file_prefix: str, index: int, extension: str = "png") -> str:
    """Object key of output `index` of a job; `file_prefix` is the job's unguessable uuid."""
    return f"generations/{file_prefix}-{index}.{extension}"
