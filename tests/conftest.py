"""Fixtures shared by every test level."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import RedisServer, redis_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline saved as a diffusers folder."""
    from workers.tiny import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "demo")


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, shared by a session's integration tests."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
