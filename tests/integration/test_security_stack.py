"""R20 and R21 against real processes: a `dreamq api` (uvicorn) on a real redis-server.

- R21: a key planted through `dreamq keys create` and used for every kind of request is found
  nowhere in a dump of Redis (job records, broker messages and key records together), nor in the
  API's log output at DEBUG with access logs on.
- R20: a body declared over the cap is refused with 413 before a byte of it is sent; a chunked
  body is refused as soon as the chunks pass the cap, not after the whole upload.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from storage.apikeys import hash_key
from tests.support.processes import (
    Deadline,
    ProcessOutput,
    RedisServer,
    dreamq_command,
    free_port,
    redis_server,
    running,
)

pytestmark = pytest.mark.integration

BODY_CAP = 64 * 1024


@dataclass
class Api:
    url: str
    port: int
    output: ProcessOutput
    redis: RedisServer
    key: str


@pytest.fixture(scope="module")
def api(demo_registry_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    folder = tmp_path_factory.mktemp("security")
    with redis_server(folder) as server:
        env = {
            "DREAMQ_REDIS_URL": server.url,
            "DREAMQ_MODELS_FILE": str(demo_registry_file),
            "DREAMQ_STORAGE_URL": f"file://{folder / 'outputs'}",
            "DREAMQ_MAX_BODY_BYTES": str(BODY_CAP),
            "DREAMQ_LOG_LEVEL": "DEBUG",
            "DREAMQ_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
        }
        created = subprocess.run(
            dreamq_command("keys", "create", "tenant", "--json"),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        key = json.loads(created.stdout)["key"]
        port = free_port()
        command = dreamq_command("api", "--host", "127.0.0.1", "--port", str(port), "--access-log")
        with running(command, env=env, name="dreamq api") as output:
            output.wait_for(r"Uvicorn running on", timeout=60)
            yield Api(f"http://127.0.0.1:{port}", port, output, server, key)


def test_a_planted_key_is_nowhere_in_redis_nor_in_the_logs(api: Api) -> None:
    key = api.key
    with httpx.Client(base_url=api.url, timeout=30) as client:
        submitted = client.post(
            "/api/v4/dreambooth",
            json={"key": key, "model_id": "demo", "prompt": "a fox", "track_id": "t-1",
                  "webhook": "http://127.0.0.1:9/hook"},
        )  # fmt: skip
        assert submitted.status_code == 200, submitted.text
        job_id = submitted.json()["id"]
        answers = [
            client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": key}),
            client.post("/api/v4/dreambooth", json={"key": key, "prompt": key, "width": key}),
            client.post("/api/v4/dreambooth", json={"key": key, "model_id": key, "prompt": "x"}),
            client.post("/api/v4/dreambooth/model_reload", json={"key": key, "model_id": "demo"}),
            client.post(
                "/api/v4/dreambooth", json={"key": key + "x", "model_id": "demo", "prompt": "x"}
            ),
        ]
    for response in answers:
        assert key not in response.text
    assert [response.status_code for response in answers] == [200, 400, 400, 200, 401]

    raw = api.redis.client()
    raw.config_set("rdbcompression", "no")  # stored strings appear as they are in the file
    raw.save()
    dump = Path(raw.config_get("dir")["dir"]) / raw.config_get("dbfilename")["dbfilename"]
    data = dump.read_bytes()
    # The dump does hold the key's record and the job: found by the key's hash and the prompt.
    assert hash_key(key).encode() in data
    assert b"a fox" in data
    assert key.encode() not in data
    assert key.removeprefix("dq_").encode()[:16] not in data

    # The log saw every request (access log at DEBUG), never the key.
    api.output.wait_for(r'"POST /api/v4/dreambooth HTTP/1.1" 401', timeout=10)
    logged = api.output.tail(100_000)
    assert logged.count("POST /api/v4/dreambooth") >= 4
    assert key not in logged
    assert key.removeprefix("dq_")[:16] not in logged


def _connect(api: Api) -> socket.socket:
    return socket.create_connection(("127.0.0.1", api.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    deadline = Deadline(10)
    while b"\r\n\r\n" not in data and not deadline.passed():
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length and not deadline.passed():
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, rest[:length]


def test_a_declared_body_over_the_cap_is_refused_before_it_is_sent(api: Api) -> None:
    with _connect(api) as sock:
        sock.sendall(
            b"POST /api/v4/dreambooth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        # Not a byte of the gigabyte is sent: the answer comes anyway.
        status, body = _read_response(sock)
    assert status == 413
    assert json.loads(body)["message"] == "Request body too large"


def test_a_chunked_body_is_cut_once_it_passes_the_cap(api: Api) -> None:
    chunk = b"x" * 8192
    with _connect(api) as sock:
        sock.sendall(
            b"POST /api/v4/dreambooth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        # Twice the cap, and never the last chunk: a server that waited for the whole body
        # before judging it would never answer.
        for _ in range(2 * BODY_CAP // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, body = _read_response(sock)
    assert status == 413
    assert json.loads(body)["message"] == "Request body too large"
