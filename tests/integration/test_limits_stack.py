"""Per-key limits across processes (R23) and key management (R21): two real `dreamq api`
processes sharing one job Redis and one limiter Redis, the `dreamq keys` commands as subprocesses.

No worker runs, so every accepted job stays queued. One API process runs with
DREAMQ_RATE_LIMIT_WHEN_DOWN=open and the other with closed; the limiter's own redis-server is
killed (and restarted) to see each do what its setting says.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from dreamq.registry import ModelEntry, Registry, write_registry
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStore
from tests.support.processes import (
    ProcessOutput,
    RedisServer,
    RestartableRedis,
    dreamq_command,
    free_port,
    redis_server,
    running,
)

pytestmark = pytest.mark.integration

PLANS = {
    "ratey": {"requests_per_minute": 1, "burst": 6},
    "capped": {"max_queued": 3},
    "unlimited": {},
}
UNAVAILABLE = "The rate limiter is unavailable, try again later."


@dataclass
class Stack:
    jobs: RedisServer
    limiter: RestartableRedis
    env: dict[str, str]
    urls: list[str]
    """[open, closed]: the API processes by their DREAMQ_RATE_LIMIT_WHEN_DOWN."""
    outputs: list[ProcessOutput]
    http: httpx.Client

    def key(self, name: str, plan: str | None = None) -> tuple[str, str]:
        """A fresh key (and its id): each test works with keys of its own."""
        store = ApiKeyStore(self.jobs.client(), plans=PLANS)
        key, info = store.create(name, plan=plan)
        return key, info.id

    def submit(self, url: str, key: str, **fields: Any) -> httpx.Response:
        body = {"key": key, "model_id": "demo", "prompt": "a fox", **fields}
        return self.http.post(f"{url}/api/v4/dreambooth", json=body)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            dreamq_command("keys", *args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("limits")
    registry = base / "models.yaml"
    # The API only reads the registry; no worker ever loads this model.
    write_registry(registry, Registry(models={"demo": ModelEntry(source=str(base / "demo"))}))
    with ExitStack() as stack:
        (base / "jobs").mkdir()
        jobs = stack.enter_context(redis_server(base / "jobs"))
        limiter = RestartableRedis(base / "limiter")
        limiter.start()
        stack.callback(limiter.close)
        env = {
            "DREAMQ_REDIS_URL": jobs.url,
            "DREAMQ_RATE_LIMIT_REDIS_URL": limiter.url,
            "DREAMQ_MODELS_FILE": str(registry),
            "DREAMQ_STORAGE_URL": f"file://{base / 'outputs'}",
            "DREAMQ_PUBLIC_URL": "http://testserver",
            "DREAMQ_PLANS": json.dumps(PLANS),
            "DREAMQ_DEFAULT_PLAN": "unlimited",
        }
        urls, outputs = [], []
        for mode in ("open", "closed"):
            port = free_port()
            command = dreamq_command("api", "--host", "127.0.0.1", "--port", str(port))
            process_env = {**env, "DREAMQ_RATE_LIMIT_WHEN_DOWN": mode}
            outputs.append(
                stack.enter_context(running(command, env=process_env, name=f"dreamq api {mode}"))
            )
            urls.append(f"http://127.0.0.1:{port}")
        for output in outputs:
            output.wait_for(r"Uvicorn running on", timeout=60)
        http = stack.enter_context(httpx.Client(timeout=10))
        yield Stack(jobs, limiter, env, urls, outputs, http)


def alternating(stack: Stack, key: str, count: int) -> list[httpx.Response]:
    """`count` requests at once, alternating between the two API processes."""

    def one(index: int) -> httpx.Response:
        return stack.submit(stack.urls[index % 2], key, seed=index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_r23_the_rate_limit_holds_across_two_api_processes(stack: Stack) -> None:
    key, _ = stack.key("ratey", "ratey")
    answers = alternating(stack, key, 14)
    codes = [answer.status_code for answer in answers]
    assert codes.count(200) == 6, codes  # the plan's burst, over both processes together
    assert codes.count(429) == 8, codes
    refused = [answer for answer in answers if answer.status_code == 429]
    # One request a minute: the next one is about 60 s away (the wait is rounded up).
    assert all(50 <= int(answer.headers["retry-after"]) <= 60 for answer in refused)
    assert all("limit exceeded" in answer.json()["message"] for answer in refused)
    # Another key is not affected.
    other, _ = stack.key("ratey-2", "ratey")
    assert stack.submit(stack.urls[1], other).status_code == 200


def test_r23_the_queued_cap_holds_across_two_api_processes(stack: Stack) -> None:
    key, key_id = stack.key("capped", "capped")
    answers = alternating(stack, key, 12)
    accepted = [answer.json()["id"] for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert len(accepted) == 3 and len(refused) == 9
    assert all(
        answer.json()["message"]
        == "Rate limit exceeded: 3 requests already queued or running for this key."
        for answer in refused
    )
    assert all(int(answer.headers["retry-after"]) >= 1 for answer in refused)
    jobs = JobStore(stack.jobs.client(), ttl_seconds=3600)
    assert sorted(jobs.unfinished(key_id)) == sorted(accepted)
    # A job that ends (here failed, as the reconciler or a worker would) frees one slot.
    jobs.fail(accepted[0], "cancelled")
    assert stack.submit(stack.urls[1], key).status_code == 200
    assert stack.submit(stack.urls[0], key).status_code == 429


def test_r21_keys_commands_and_revocation_on_the_next_request(stack: Stack) -> None:
    created = stack.cli("create", "customer", "--plan", "capped", "--json")
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    assert made["plan"] == "capped" and made["key"].startswith("dq_")
    key, key_id = made["key"], made["id"]

    refused = stack.cli("create", "someone", "--plan", "gold")
    assert refused.returncode == 2
    assert "unknown plan 'gold'" in refused.stderr

    listed = json.loads(stack.cli("list", "--json").stdout)
    mine = [entry for entry in listed if entry["id"] == key_id]
    assert mine == [
        {
            "id": key_id,
            "name": "customer",
            "plan": "capped",
            "plan_applied": "capped",
            "created": mine[0]["created"],
            "created_at": mine[0]["created_at"],
            "revoked": False,
        }
    ]
    table = stack.cli("list").stdout
    assert table.splitlines()[0].split() == ["ID", "NAME", "PLAN", "CREATED", "STATE"]
    row = [line.split() for line in table.splitlines() if line.startswith(key_id)]
    assert [(cells[1], cells[2], cells[-1]) for cells in row] == [("customer", "capped", "active")]
    assert key not in stack.cli("list").stdout + stack.cli("list", "--json").stdout

    assert stack.cli("set-plan", key_id, "ratey").returncode == 0
    assert stack.cli("set-plan", key_id, "gold").returncode == 2
    assert stack.cli("set-plan", "no-such-id", "ratey").returncode == 1
    listed = json.loads(stack.cli("list", "--json").stdout)
    assert [entry["plan"] for entry in listed if entry["id"] == key_id] == ["ratey"]

    assert stack.submit(stack.urls[0], key).status_code == 200
    revoked = stack.cli("revoke", key_id)
    assert revoked.returncode == 0 and key not in revoked.stdout
    assert stack.cli("revoke", "no-such-id").returncode == 1
    # The very next request, on either process, is refused exactly like an unknown key.
    unknown = stack.submit(stack.urls[1], "dq_" + "x" * 43)
    for url in stack.urls:
        answer = stack.submit(url, key)
        assert (answer.status_code, answer.content) == (unknown.status_code, unknown.content)
    assert unknown.status_code == 401
    listed = json.loads(stack.cli("list", "--json").stdout)
    assert [entry["revoked"] for entry in listed if entry["id"] == key_id] == [True]
    # Neither API process ever logged the key.
    assert not [line for output in stack.outputs for line in output.lines if key in line]


def test_r23_limiter_redis_down_open_admits_closed_answers_503(stack: Stack) -> None:
    key, _ = stack.key("down", "ratey")
    assert [a.status_code for a in alternating(stack, key, 8)].count(200) == 6
    open_url, closed_url = stack.urls
    warnings_before = stack.outputs[0].count("rate limiter Redis unreachable")
    stack.limiter.kill()
    try:
        started = time.monotonic()
        opened = [stack.submit(open_url, key, seed=100 + i) for i in range(4)]
        open_seconds = (time.monotonic() - started) / 4
        started = time.monotonic()
        closed = [stack.submit(closed_url, key, seed=200 + i) for i in range(4)]
        closed_seconds = (time.monotonic() - started) / 4
        # A key on a plan without a rate never asks the limiter: closed still serves it.
        unlimited, _ = stack.key("unlimited-down")
        served = stack.submit(closed_url, unlimited)
    finally:
        stack.limiter.start()
    print(f"limiter down: {open_seconds * 1000:.1f} ms a request open, "
          f"{closed_seconds * 1000:.1f} ms closed")  # fmt: skip
    assert [a.status_code for a in opened] == [200] * 4  # over the plan, admitted unthrottled
    assert [a.status_code for a in closed] == [503] * 4
    assert all(a.json()["message"] == UNAVAILABLE for a in closed)
    assert served.status_code == 200
    # One warning for the outage, not one per request.
    stack.outputs[0].wait_for(r"rate limiter Redis unreachable", timeout=5)
    assert stack.outputs[0].count("rate limiter Redis unreachable") == warnings_before + 1
    # Back up: the key's state was lost with the limiter's Redis (no persistence), so it has
    # its burst again, and the closed process serves again.
    assert stack.submit(closed_url, key, seed=300).status_code == 200
    stack.outputs[1].wait_for(r"rate limiter Redis reachable again", timeout=5)
