"""A job to create in tests: one builder instead of a NewJob literal in every test file."""

from __future__ import annotations

from typing import Any

from storage.jobs import NewJob


def new_job(**fields: Any) -> NewJob:
    """A txt2img job of the demo model with neutral values; `fields` replace any of them."""
    defaults: dict[str, Any] = {
        "owner": "key-1",
        "model_id": "demo",
        "kind": "txt2img",
        "params": {},
        "meta": {},
        "file_prefix": "p",
        "future_links": [],
        "predicted_seconds": 1.0,
        "eta_seconds": 1.0,
    }
    return NewJob(**{**defaults, **fields})
