"""Fixtures shared by every test level."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import RedisServer, redis_server

# One torch thread per process, set before torch is imported so that worker subprocesses inherit
# it: on a 2-core machine running pytest, a worker and an API at once, OpenMP threads spin-waiting
# on each other made a tiny 64x64 image take seconds instead of 0.15 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline saved as a diffusers folder."""
    from workers.tiny import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "demo")


@pytest.fixture(scope="session")
def demo_registry_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo registry of `dreamq dev`: tiny sd, sdxl, video, inpaint models, LoRAs, an
    embedding, VAEs, and the safety checker, upscaler and translator helpers."""
    from workers.tiny import write_demo_registry

    return write_demo_registry(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, shared by a session's integration tests."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
