"""Webhooks through real processes: redis-server, a `dreamq dispatcher` subprocess with a short
retry schedule, a real HTTP receiver, the API in process for fetch, and `dreamq jobs
replay-webhook`. Jobs are finished directly in the store: no GPU worker is needed here."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from api.app import Overrides, create_app
from dreamq.queue import CeleryPublisher, make_celery
from dreamq.registry import Registry
from dreamq.settings import Settings
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStore
from storage.objects import MemoryObjectStore
from tests.support.jobs import new_job
from tests.support.processes import (
    JobEvents,
    RedisServer,
    WebhookReceiver,
    dreamq_command,
    dreamq_worker,
    webhook_receiver,
)

pytestmark = pytest.mark.integration


@dataclass
class Hooks:
    redis: RedisServer
    env: dict[str, str]
    jobs: JobStore
    publisher: CeleryPublisher
    receiver: WebhookReceiver
    api: TestClient
    key: str
    owner: str
    secret: str

    def finished_job(self) -> int:
        job_id = self.jobs.create(
            new_job(
                owner=self.owner,
                meta={"prompt": "a fox"},
                file_prefix="abc",
                future_links=["http://testserver/files/abc-0.png"],
                webhook=self.receiver.url,
                track_id="order-9",
            )
        )
        assert self.jobs.claim(job_id) is not None
        assert self.jobs.succeed(job_id, output=["http://testserver/files/abc-0.png"],
                                 generation_time=0.1)  # fmt: skip
        return job_id

    def fetch(self, job_id: int) -> dict[str, object]:
        response = self.api.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": self.key})
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body


@pytest.fixture(scope="module")
def hooks(redis_proc: RedisServer) -> Iterator[Hooks]:
    settings = Settings(
        redis_url=redis_proc.url,
        storage_url="file:///tmp/dreamq-unused",
        public_url="http://testserver",
        webhook_queue="webhooks-it",
        outbound_allow_cidrs="127.0.0.0/8",
    )
    env = {
        "DREAMQ_REDIS_URL": redis_proc.url,
        "DREAMQ_WEBHOOK_QUEUE": "webhooks-it",
        "DREAMQ_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
        "DREAMQ_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2",
        "DREAMQ_WEBHOOK_TIMEOUT_SECONDS": "5",
    }
    store = ApiKeyStore(redis_proc.client())
    key, info = store.create("webhooks-tenant")
    secrets = store.webhook_secrets(info.id)
    assert secrets is not None
    overrides = Overrides(registry=Registry(models={}), objects=MemoryObjectStore())
    with (
        webhook_receiver() as receiver,
        dreamq_worker(env, "dispatcher"),
        TestClient(create_app(settings, overrides)) as api,
    ):
        yield Hooks(
            redis=redis_proc,
            env=env,
            jobs=JobStore(redis_proc.client(), ttl_seconds=3600),
            publisher=CeleryPublisher(make_celery(settings), settings),
            receiver=receiver,
            api=api,
            key=key,
            owner=info.id,
            secret=secrets.primary,
        )


def test_signed_500_then_200_retries_with_the_same_webhook_id(hooks: Hooks) -> None:
    events = JobEvents(hooks.redis.client())
    hooks.receiver.script = [500]
    job_id = hooks.finished_job()
    hooks.publisher.publish_webhook(job_id)

    first, second = hooks.receiver.next(timeout=15), hooks.receiver.next(timeout=15)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"msg_{job_id}_success"
    for hook in (first, second):
        body = Webhook(hooks.secret).verify(hook.body, hook.headers)  # R13: the reference verifier
        assert (body["id"], body["status"], body["track_id"]) == (job_id, "success", "order-9")
    tampered = bytearray(second.body)
    tampered[-2] ^= 0x01
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(hooks.secret).verify(bytes(tampered), second.headers)

    assert events.wait_for(job_id, "webhook_sent", timeout=15) == "webhook_sent"
    assert hooks.fetch(job_id)["webhook_status"] == "sent"
    attempts = hooks.jobs.webhook_attempts(job_id)
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]
    events.close()


def test_always_failing_ends_failed_and_replay_delivers_the_same_id(hooks: Hooks) -> None:
    events = JobEvents(hooks.redis.client())
    hooks.receiver.script = [500, 503, 500]
    job_id = hooks.finished_job()
    hooks.publisher.publish_webhook(job_id)

    ids = {hooks.receiver.next(timeout=15).headers["webhook-id"] for _ in range(3)}
    assert ids == {f"msg_{job_id}_success"}
    assert events.wait_for(job_id, "webhook_failed", timeout=15) == "webhook_failed"
    assert hooks.fetch(job_id)["webhook_status"] == "failed"
    assert hooks.receiver.received.empty()

    replay = subprocess.run(
        dreamq_command("jobs", "replay-webhook", str(job_id)),
        env={**os.environ, **hooks.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout.splitlines()[-1])["attempt"] == 4
    hook = hooks.receiver.next(timeout=15)
    assert hook.headers["webhook-id"] == f"msg_{job_id}_success"
    Webhook(hooks.secret).verify(hook.body, hook.headers)
    assert hooks.fetch(job_id)["webhook_status"] == "sent"
    events.close()


def test_keys_cli_shows_and_rotates_the_webhook_secret(hooks: Hooks) -> None:
    def dreamq(*args: str) -> dict[str, object]:
        done = subprocess.run(
            dreamq_command(*args),
            env={**os.environ, **hooks.env, "DREAMQ_WEBHOOK_SECRET_ROTATION_SECONDS": "600"},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        answer: dict[str, object] = json.loads(done.stdout)
        return answer

    created = dreamq("keys", "create", "cli-tenant", "--json")
    secret = created["webhook_secret"]
    assert isinstance(secret, str) and secret.startswith("whsec_")
    key_id = str(created["id"])
    assert dreamq("keys", "secret", key_id, "--json")["webhook_secret"] == secret
    rotated = dreamq("keys", "rotate-secret", key_id, "--json")
    assert rotated["webhook_secret"] != secret
    assert rotated["previous_webhook_secret"] == secret
    assert isinstance(rotated["previous_valid_until"], float)
