"""Real processes for integration tests: redis-server, dreamq parts, an HTTP webhook receiver.

Nothing here sleeps to wait: readiness is a line a process prints, a job's end is a Redis pub/sub
event, a webhook is an item on a queue; each wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from storage import keys


class Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self._end


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProcessOutput:
    """Collects a child's output lines in a thread; tests wait for a line matching a pattern."""

    def __init__(self, process: subprocess.Popen[str], name: str) -> None:
        self.process = process
        self.name = name
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

    def wait_for(self, pattern: str, timeout: float, *, start: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        index = start
        deadline = Deadline(timeout)
        with self._changed:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
                if deadline.passed():
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r}:\n{self.tail()}")
                self._changed.wait(deadline.left())

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


@contextmanager
def running(
    command: list[str], *, env: Mapping[str, str] | None = None, name: str, cwd: Path | None = None
) -> Iterator[ProcessOutput]:
    """Run a child in its own process group; stop the whole group afterwards."""
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = ProcessOutput(process, name)
    try:
        yield output
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """SIGTERM the leader (a Celery worker stops its own pool), then kill what is left."""
    if process.poll() is None:
        process.terminate()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class RedisServer:
    port: int
    output: ProcessOutput

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@contextmanager
def redis_server(
    directory: Path, *, port: int | None = None, appendonly: bool = False
) -> Iterator[RedisServer]:
    """A redis-server without persistence, or with AOF (fsync every second) like compose's; a
    given port and directory restart a server where a killed one left off."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make test installs it)")
    port = port or free_port()
    aof = (
        ["--appendonly", "yes", "--appendfsync", "everysec"]
        if appendonly
        else ["--appendonly", "no"]
    )
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
               "--dir", str(directory)]  # fmt: skip
    with running(command, name="redis-server") as output:
        output.wait_for(r"Ready to accept connections", timeout=15)
        yield RedisServer(port, output)


class RestartableRedis:
    """A redis-server on a fixed port and folder that a test kills and starts again."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self._stack = ExitStack()
        self.server: RedisServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        context = redis_server(self.directory, port=self.port, appendonly=self.appendonly)
        self.server = self._stack.enter_context(context)
        return self.server

    def kill(self) -> None:
        """kill -9: what the server had not written to disk is lost."""
        assert self.server is not None
        os.kill(self.server.output.process.pid, signal.SIGKILL)
        self.server.output.process.wait()

    def close(self) -> None:
        self._stack.close()


@contextmanager
def restartable(directory: Path, *, appendonly: bool = False) -> Iterator[RestartableRedis]:
    server = RestartableRedis(directory, appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.close()


def dreamq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dreamq", *args]


@contextmanager
def dreamq_worker(env: Mapping[str, str], role: str = "worker") -> Iterator[ProcessOutput]:
    """`dreamq worker` or `dreamq dispatcher`, ready once Celery says so."""
    # No metrics endpoint unless a test asks: parallel workers would compete for one port.
    env = {"DREAMQ_METRICS_PORT": "0", **env}
    with running(dreamq_command(role), env=env, name=f"dreamq {role}") as output:
        output.wait_for(r"\bready\.", timeout=90)
        yield output


class JobEvents:
    """Subscribed to the job events channel before a test acts, so no event can be missed."""

    def __init__(self, client: redis.Redis) -> None:
        # Keep the client: once it is collected, redis-py closes its pool, and with it the
        # subscribed connection, which then silently hears nothing.
        self._client = client
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(keys.JOB_EVENTS)
        self._pubsub.get_message(timeout=5)  # the subscribe confirmation
        self.seen: list[str] = []

    def wait_for(self, job_id: int, event: str | None = None, timeout: float = 60) -> str:
        """The first event of `job_id` (or the named one, e.g. 'success' or 'webhook_sent')."""
        for line in self.seen:
            if _matches(line, job_id, event):
                return line.split(" ", 1)[1]
        deadline = Deadline(timeout)
        while True:
            message = self._pubsub.get_message(timeout=deadline.left())
            if message is None:
                if deadline.passed():
                    raise TimeoutError(f"no event {event or 'terminal'} for job {job_id}")
                continue
            if message["type"] != "message":
                continue
            line = message["data"].decode()
            self.seen.append(line)
            if _matches(line, job_id, event):
                return line.split(" ", 1)[1]

    def close(self) -> None:
        self._pubsub.close()


def _matches(line: str, job_id: int, event: str | None) -> bool:
    ident, _, name = line.partition(" ")
    if ident != str(job_id):
        return False
    return name == event if event else not name.startswith("webhook_")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A real HTTP server on loopback that records every POST and answers `status`."""

    port: int
    received: queue.Queue[Received] = field(default_factory=queue.Queue)
    status: int = 200
    script: list[int] = field(default_factory=list)
    """Statuses to answer first, one per POST, before `status`."""
    hold: list[threading.Event] = field(default_factory=list)
    """Gates for the first POSTs, one per POST: such a POST is recorded as soon as it arrives and
    answered only once its gate is set (a receiver holding the request open)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def next(self, timeout: float = 30) -> Received:
        return self.received.get(timeout=timeout)


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = self.rfile.read(length)
            received = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            gate = receiver.hold.pop(0) if receiver.hold else None
            if gate is not None:
                receiver.received.put(received)
                gate.wait(300)
            with suppress(OSError):  # a held request's client may be gone by now
                self.send_response(receiver.script.pop(0) if receiver.script else receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()
            if gate is None:
                receiver.received.put(received)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
