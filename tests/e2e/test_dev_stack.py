"""End to end: `dreamq dev` as a user runs it, driven by an HTTP client."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from tests.support.processes import (
    JobEvents,
    dreamq_command,
    free_port,
    running,
    webhook_receiver,
)

pytestmark = pytest.mark.e2e

DEV_KEY = "dq_e2e-dev-key-0123456789abcdefghijklmnopqrstuv"


def test_dev_serves_the_readme_example(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    env = {"DREAMQ_DEV_API_KEY": DEV_KEY, "HF_HUB_OFFLINE": "1"}
    command = dreamq_command("dev", "--port", str(port), "--dir", str(tmp_path / "state"))
    with running(command, env=env, name="dreamq dev") as dev, webhook_receiver() as receiver:
        dev.wait_for(r"dreamq dev ready", timeout=180)
        base = dev.wait_for(r"^DREAMQ_URL=(\S+)", timeout=5).group(1)
        assert dev.wait_for(r"^DREAMQ_KEY=(\S+)", timeout=5).group(1) == DEV_KEY
        redis_url = dev.wait_for(r"^DREAMQ_REDIS_URL=(\S+)", timeout=5).group(1)
        events = JobEvents(redis.Redis.from_url(redis_url))

        # The README's curl example, plus a webhook to a local receiver (dev allows loopback).
        body = {
            "key": DEV_KEY,
            "model_id": "demo",
            "prompt": "a red fox",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "webhook": receiver.url,
            "track_id": "e2e-1",
        }
        answer = httpx.post(f"{base}/api/v4/dreambooth", json=body, timeout=10).json()
        assert answer["status"] == "processing"
        assert events.wait_for(answer["id"]) == "success"

        done = httpx.post(answer["fetch_result"], json={"key": DEV_KEY}, timeout=10).json()
        assert done["status"] == "success"
        assert done["output"] == answer["future_links"]
        for url in done["output"]:
            response = httpx.get(url, timeout=10)
            assert response.status_code == 200
            assert Image.open(io.BytesIO(response.content)).size == (64, 64)

        hook = receiver.next(timeout=30).json()
        assert hook["track_id"] == "e2e-1"
        assert hook["id"] == answer["id"]
        events.close()

        # Ctrl-C stops every child cleanly.
        start = len(dev.lines)
        os.kill(dev.process.pid, signal.SIGINT)
        dev.wait_for(r"dreamq dev: stopped", timeout=60, start=start)
        assert dev.process.wait(timeout=30) == 0
