"""Fakes shared by unit tests: a private fakeredis server per test, the tiny pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> redis.Redis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Any:
    """The tiny StableDiffusionPipeline through from_pretrained, once per module: tests swap its
    scheduler, and each module reads the model's own scheduler config first."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
