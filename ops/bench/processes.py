"""Child processes for the benchmark: redis-server, `dreamq api`/`worker`, bare uvicorn apps.

A trimmed copy of tests/support/processes.py (ops/ does not import tests/): each child runs in its
own process group, its output lines are collected in a thread, and readiness is a line it prints
or an HTTP answer, each waited for with a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Child:
    """A running process whose merged stdout/stderr lines are kept for `wait_for` and `count`."""

    def __init__(self, command: list[str], env: Mapping[str, str], name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> None:
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        index = 0
        with self._changed:
            while True:
                while index < len(self.lines):
                    index += 1
                    if regex.search(self.lines[index - 1]):
                        return
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r}\n{self.tail()}")
                self._changed.wait(left)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, timeout: float = 20) -> None:
        # SIGTERM to the leader (a Celery worker stops its own pool), then kill what is left.
        if self.process.poll() is None:
            self.process.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@contextmanager
def child(command: list[str], env: Mapping[str, str], name: str) -> Iterator[Child]:
    running = Child(command, env, name)
    try:
        yield running
    finally:
        running.stop()


@contextmanager
def redis_server(directory: str) -> Iterator[str]:
    """A private redis-server without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (`make redis-server` installs it)")
    port = free_port()
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        directory,
    ]
    with child(command, {}, "redis-server") as server:
        server.wait_for(r"Ready to accept connections", timeout=15)
        yield f"redis://127.0.0.1:{port}/0"


def wait_http(url: str, timeout: float = 60, process: Child | None = None) -> None:
    """Until `url` answers 200 (a readiness probe; benchmark code, so a plain poll)."""
    end = time.monotonic() + timeout
    while True:
        if process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if time.monotonic() > end:
            raise TimeoutError(f"{url} did not answer 200")
        time.sleep(0.05)


def dreamq(*args: str) -> list[str]:
    return [sys.executable, "-m", "dreamq", *args]


@contextmanager
def http_server(
    command: list[str], env: Mapping[str, str], name: str, port: int, probe: str = "/openapi.json"
) -> Iterator[str]:
    """A uvicorn-served app; yields its base URL once `probe` answers."""
    with child(command, env, name) as server:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + probe, process=server)
        yield base


def uvicorn_app(factory: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


@contextmanager
def dreamq_worker(env: Mapping[str, str], name: str = "dreamq worker") -> Iterator[Child]:
    with child(dreamq("worker"), {"DREAMQ_METRICS_PORT": "0", **env}, name) as worker:
        worker.wait_for(r"\bready\.", timeout=120)
        yield worker
