"""`dreamq dev`: the whole stack in one command on a machine with no Docker.

Redis (`redis-server` when on PATH, else an embedded fakeredis TCP server), the API, one worker and
the webhook dispatcher, as the same separate processes a fleet runs, configured through the same
DREAMQ_* settings. Outputs go to a local folder the API serves under /files/. Ctrl-C stops every
child.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import redis

from dreamq.settings import Settings
from storage import keys
from storage.apikeys import KEY_PREFIX, ApiKeyStore

READY_TIMEOUT = 120.0
LOOPBACK = "127.0.0.0/8,::1/128"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


class _EmbeddedRedis:
    """Redis for the dev stack: a private redis-server, else fakeredis over TCP."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._fake: Any = None
        binary = shutil.which("redis-server")
        if binary:
            directory.mkdir(parents=True, exist_ok=True)
            self._process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(directory),
                    "--logfile",
                    "redis.log",
                ],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.kind = "redis-server"
        else:
            from fakeredis import TcpFakeServer

            self._fake = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
            threading.Thread(target=self._fake.serve_forever, daemon=True).start()
            self.kind = "fakeredis"
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 15, "Redis")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        if self._fake is not None:
            self._fake.shutdown()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _settings_env(settings: Settings) -> dict[str, str]:
    """The settings as DREAMQ_* variables, so every child process builds the same object."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            # Structured settings (DREAMQ_PLANS) are read back as JSON, as an operator writes them.
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            env[f"DREAMQ_{name.upper()}"] = text
    return env


class DevStack:
    def __init__(self, settings: Settings, *, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory.resolve()
        self.base = settings
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        embedded = _EmbeddedRedis(self.directory / "redis")
        try:
            settings = self._settings(embedded.url)
            key, secret = self._register_key(settings)
            self._spawn(settings)
            self._wait_ready(settings)
            self._announce(settings, key, secret, embedded.kind)
            return self._supervise()
        finally:
            self._stop_children()
            embedded.stop()

    def _settings(self, redis_url: str) -> Settings:
        models_file = self.base.models_file or self._demo_registry()
        return self.base.model_copy(
            update={
                "redis_url": redis_url,
                "broker_url": None,
                "storage_url": f"file://{self.directory / 'outputs'}",
                "public_url": f"http://127.0.0.1:{self.port}",
                "models_file": models_file,
                "outbound_allow_cidrs": ",".join(
                    filter(None, [self.base.outbound_allow_cidrs, LOOPBACK])
                ),
            }
        )

    def _demo_registry(self) -> Path:
        from workers.tiny import write_demo_registry

        folder = self.directory / "models"
        path = folder / "models.yaml"
        if not path.exists():
            print(f"dreamq dev: writing the tiny demo models to {folder}", flush=True)
            write_demo_registry(folder)
        return path

    def _register_key(self, settings: Settings) -> tuple[str, str]:
        """The dev API key and its webhook signing secret."""
        store = ApiKeyStore(redis.Redis.from_url(settings.redis_url))
        key = settings.dev_api_key or KEY_PREFIX + secrets.token_urlsafe(32)
        info = store.register(key, "dev", webhook_secret=settings.dev_webhook_secret)
        found = store.webhook_secrets(info.id)
        return key, found.primary if found else ""

    def _spawn(self, settings: Settings) -> None:
        env = {**os.environ, **_settings_env(settings)}
        dreamq = [sys.executable, "-m", "dreamq"]
        commands = {
            "api": ["--host", "127.0.0.1", "--port", str(self.port)],
            "worker": ["--concurrency", "1"],
            "dispatcher": ["--concurrency", "4"],
        }
        # The worker and the dispatcher each serve metrics: the dispatcher on the next port.
        ports = {"dispatcher": settings.metrics_port + 1} if settings.metrics_port else {}
        for name, args in commands.items():
            child_env = env
            if name in ports:
                child_env = {**env, "DREAMQ_METRICS_PORT": str(ports[name])}
            # Own session: Ctrl-C reaches only this supervisor, which stops each child in order.
            self.children[name] = subprocess.Popen(
                [*dreamq, name, *args], env=child_env, start_new_session=True
            )

    def _wait_ready(self, settings: Settings) -> None:
        client = redis.Redis.from_url(settings.redis_url)

        def ready() -> bool:
            if self._stop.is_set() or any(c.poll() is not None for c in self.children.values()):
                raise RuntimeError("a dreamq dev process exited during startup")
            try:
                api_ok = httpx.get(f"{settings.public_url}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
            return api_ok and client.zcard(keys.WORKERS) > 0

        wait_until(ready, READY_TIMEOUT, "the API and a worker")

    def _announce(self, settings: Settings, key: str, secret: str, redis_kind: str) -> None:
        url = settings.public_url
        print(
            f"\ndreamq dev ready: {url}  (docs {url}/docs)\n"
            f"DREAMQ_URL={url}\nDREAMQ_KEY={key}\nDREAMQ_WEBHOOK_SECRET={secret}\n"
            f"DREAMQ_REDIS_URL={settings.redis_url} ({redis_kind})\n"
            f"try:\n  curl -s {url}/api/v4/dreambooth -H 'content-type: application/json' "
            f'-d \'{{"key": "{key}", "model_id": "demo", "prompt": "a red fox", '
            f'"width": 64, "height": 64, "num_inference_steps": 2}}\'\n'
            "Ctrl-C stops everything.",
            flush=True,
        )

    def _supervise(self) -> int:
        while not self._stop.wait(0.5):
            for name, child in self.children.items():
                if child.poll() is not None:
                    print(f"dreamq dev: {name} exited ({child.returncode})", flush=True)
                    return 1
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def _stop_children(self) -> None:
        # SIGTERM to each leader only: a Celery worker then finishes its running job and stops
        # its own pool (a pool child signalled directly would die mid-job).
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 20
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        print("dreamq dev: stopped", flush=True)
