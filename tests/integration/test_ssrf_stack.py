"""The outbound guard across real processes (reliability R16): the API in process allows loopback
(its settings name 127.0.0.0/8), but the `dreamq worker` and `dreamq dispatcher` subprocesses run
without the allow-list. What the API let through, they refuse, and the servers behind the URLs
never see a connection."""

from __future__ import annotations

import ipaddress
import socket
import threading
from contextlib import ExitStack

import pytest

from dreamq.outbound import early_refusal, system_resolve
from storage.jobs import JobStore
from tests.support.processes import JobEvents, dreamq_command, running
from tests.support.profile import QUICK, ProfileFactory
from tests.support.tcp import read_request, tcp_server

pytestmark = pytest.mark.integration

STRICT = {"DREAMQ_OUTBOUND_ALLOW_CIDRS": ""}
# A 1x1 PNG: what the image server would serve, had anyone asked.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d7"
    "63f8ffff3f0005fe02fea7d6a4e90000000049454e44ae426082"
)


def serve_png(connection: socket.socket, stop: threading.Event) -> None:
    read_request(connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PNG), PNG))


def answer_ok(connection: socket.socket, stop: threading.Event) -> None:
    read_request(connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def loopback_name() -> str:
    """This machine's own name when it resolves to loopback only (an /etc/hosts line), so the
    dispatcher's refusal comes from its connect-time check; else 127.0.0.1, refused on its face.
    Either way the recorded refusal reads the same."""
    name = socket.gethostname()
    try:
        addresses = system_resolve(name, 80)
    except OSError:
        return "127.0.0.1"
    only_loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if addresses and only_loopback and early_refusal(f"http://{name}/", []) is None:
        return name
    return "127.0.0.1"


def test_r16_worker_and_dispatcher_refuse_loopback_the_api_accepted(
    profile_factory: ProfileFactory,
) -> None:
    profile = profile_factory(webhook_retry_schedule="")  # one webhook attempt, then failed
    events = JobEvents(profile.redis.client())
    env = {**profile.env, **STRICT}
    with ExitStack() as stack:
        images = stack.enter_context(tcp_server(serve_png))
        receiver = stack.enter_context(tcp_server(answer_ok))
        # Both start at once: each spends seconds importing.
        worker = stack.enter_context(running(dreamq_command("worker"), env=env, name="worker"))
        dispatcher = stack.enter_context(
            running(dreamq_command("dispatcher"), env=env, name="dispatcher")
        )
        for process in (worker, dispatcher):
            process.wait_for(r"\bready\.", timeout=90)

        init_image = f"http://127.0.0.1:{images.port}/a.png"
        body = {"key": profile.key, "model_id": "demo", "prompt": "a fox", **QUICK}
        response = profile.api.post(
            "/api/v4/dreambooth/img2img", json={**body, "init_image": init_image}
        )
        assert response.json()["status"] == "processing", response.text
        img2img = response.json()["id"]
        webhook = f"http://{loopback_name()}:{receiver.port}/hook"
        txt2img = profile.submit(webhook=webhook, **QUICK)

        assert events.wait_for(img2img, timeout=60) == "failed"
        assert profile.job(img2img).error == (
            "The init_image URL is not allowed: the host resolves to a non-public address."
        )
        assert events.wait_for(txt2img, timeout=60) == "success"
        assert events.wait_for(txt2img, "webhook_failed", timeout=30) == "webhook_failed"
        (attempt,) = JobStore(profile.redis.client(), ttl_seconds=60).webhook_attempts(txt2img)
        assert attempt["status_code"] is None
        assert attempt["error"] == "refused: the host resolves to a non-public address"
        assert images.connections == 0
        assert receiver.connections == 0
    events.close()
