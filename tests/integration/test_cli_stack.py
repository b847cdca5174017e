"""The admin CLI against a real redis-server: `dreamq models ...`, `dreamq jobs show|requeue` and
`dreamq queue`, each run as a subprocess as an operator runs it, checked by output and exit code
(0 ok, 1 not found or refused, 2 bad usage).

The redis-server is this module's own: `models warm` counts the subscribers of the control
channel, and pub/sub spans every database of a server. No worker runs: what a worker writes (its
record, the models its processes hold, a consumer holding a message) is written here by the same
code or client a worker uses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from dreamq.registry import load_registry
from storage import keys
from storage.apikeys import ApiKeyStore
from storage.eta import DurationRecorder
from storage.jobs import JobStore, new_lease_token
from storage.workers import WorkerRecord, WorkerStore
from tests.support.jobs import new_job
from tests.support.processes import Deadline, RedisServer, dreamq_command, redis_server

pytestmark = pytest.mark.integration

REGISTRY = """\
# The operators' registry: this comment stays at the top.
models:
  demo:
    source: demo-folder
  xl:
    source: /models/sdxl
    family: sdxl
loras:
  detail:
    source: loras/detail.safetensors
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("cli-redis")) as found:
        yield found


@dataclass
class Cli:
    env: dict[str, str]
    registry: Path
    client: redis.Redis
    queue: str
    webhook_queue: str

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            dreamq_command(*args),
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def jobs(self) -> JobStore:
        return JobStore(self.client, ttl_seconds=3600)

    def new_job(self, owner: str = "k-owner", webhook: str | None = None) -> int:
        job = new_job(
            owner=owner,
            params={"prompt": "a fox"},
            meta={"prompt": "a fox"},
            file_prefix="f",
            future_links=["https://cdn.example/f-0.png"],
            predicted_seconds=3.0,
            eta_seconds=10.0,
            webhook=webhook,
            track_id=17,
            queue=self.queue,
        )
        return self.jobs().create(job)

    def queued_job_ids(self) -> list[int]:
        """The job ids of the generation messages waiting in the Redis broker's list."""
        found = []
        for raw in self.client.lrange(self.queue, 0, -1):
            message = json.loads(raw)
            body = json.loads(base64.b64decode(message["body"]))
            assert message["headers"]["task"] == "dreamq.generate"
            found.append(int(body[0][0]))
        return found


@pytest.fixture
def cli(server: RedisServer, tmp_path: Path) -> Cli:
    server.client().flushall()  # the module's own server: each test starts from nothing
    registry = tmp_path / "registry" / "models.yaml"
    (registry.parent / "demo-folder").mkdir(parents=True)
    registry.write_text(REGISTRY)
    name = f"cli-{uuid.uuid4().hex[:8]}"  # queues of this test's own
    env = {
        **os.environ,
        "DREAMQ_REDIS_URL": server.url,
        "DREAMQ_MODELS_FILE": str(registry),
        "DREAMQ_GENERATE_QUEUE": name,
        "DREAMQ_WEBHOOK_QUEUE": f"{name}-webhooks",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty hub cache
    }
    env.pop("DREAMQ_BROKER_URL", None)
    return Cli(env, registry, server.client(), name, f"{name}-webhooks")


# -- models ------------------------------------------------------------------------------------


def test_models_add_and_remove_edit_the_registry_file(cli: Cli) -> None:
    added = cli.run("models", "add", "photo", "/models/photo.safetensors", "--single-file",
                    "--config", "/models/sd15-config", "--kind", "inpaint")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "restart" in added.stdout  # API and workers read the registry at start
    entry = load_registry(cli.registry).models["photo"]
    assert (entry.source, entry.config, entry.kind, entry.family) == (
        "/models/photo.safetensors", "/models/sd15-config", "inpaint", "sd15"
    )  # fmt: skip
    text = cli.registry.read_text()
    assert text.startswith("# The operators' registry")  # the top comment block is kept
    assert "source: demo-folder" in text  # a relative source stays relative
    assert "loras/detail.safetensors" in text

    before = cli.registry.read_bytes()
    duplicate = cli.run("models", "add", "demo", "/models/other")
    assert duplicate.returncode == 2 and "already" in duplicate.stderr
    not_a_file = cli.run("models", "add", "bad", "/models/folder", "--single-file")
    assert not_a_file.returncode == 2 and "--single-file" in not_a_file.stderr
    spaced = cli.run("models", "add", "a b", "/models/x")
    assert spaced.returncode == 2
    assert cli.run("models", "add", "x", "/m", "--kind", "nope").returncode == 2  # argparse
    assert cli.registry.read_bytes() == before  # refused edits leave the file as it was

    unknown = cli.run("models", "remove", "nope")
    assert unknown.returncode == 1 and "not in the registry" in unknown.stderr
    removed = cli.run("models", "remove", "photo")
    assert removed.returncode == 0, removed.stderr
    assert set(load_registry(cli.registry).models) == {"demo", "xl"}
    # Written through a temporary file in the same folder, renamed: none is left behind.
    assert sorted(p.name for p in cli.registry.parent.iterdir()) == ["demo-folder", "models.yaml"]

    missing = cli.run("models", "list", DREAMQ_MODELS_FILE="/nonexistent/models.yaml")
    assert missing.returncode == 2 and "cannot read model registry" in missing.stderr


def test_models_list_shows_the_registry_warm_processes_and_load_times(cli: Cli) -> None:
    host = f"gpu-{uuid.uuid4().hex[:6]}"
    WorkerStore(cli.client).publish_models(f"{host}:4242", ["xl"], until=time.time() + 120)
    WorkerStore(cli.client).publish_models(f"{host}:4243", ["xl"], until=time.time() - 1)  # dead
    DurationRecorder(cli.client).record_load("xl", 12.25)
    cli.client.delete(keys.model_stats("demo"))

    listed = {model["id"]: model for model in cli.json("models", "list")}
    assert set(listed) == {"demo", "xl"}
    assert listed["xl"] == {
        "id": "xl",
        "family": "sdxl",
        "kind": "image",
        "source": "/models/sdxl",
        "config": None,
        "single_file": False,
        "warm_in": [f"{host}:4242"],  # the process past its deadline is not counted
        "load_seconds": 12.25,
    }
    assert listed["demo"]["warm_in"] == [] and listed["demo"]["load_seconds"] is None
    assert listed["demo"]["source"] == str(cli.registry.parent / "demo-folder")

    table = cli.run("models", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "FAMILY", "KIND", "SOURCE", "WARM", "IN", "LAST", "LOAD"]
    assert lines[2].split() == ["xl", "sdxl", "image", "/models/sdxl", f"{host}:4242", "12.2s"]


def test_models_warm_with_no_worker_reaches_nobody_and_wait_times_out(cli: Cli) -> None:
    result = cli.run("models", "warm", "demo")
    assert result.returncode == 0, result.stderr
    assert "asked 0 worker process(es) to load demo" in result.stdout

    started = time.monotonic()
    waited = cli.run("models", "warm", "demo", "--wait", "0.5")
    assert waited.returncode == 1
    assert "no worker process holds it after 0.5 s" in waited.stderr
    assert time.monotonic() - started < 15  # the wait, plus a process start

    unknown = cli.run("models", "warm", "nope")
    assert unknown.returncode == 1 and "not in the registry" in unknown.stderr


def test_models_warm_is_heard_and_wait_ends_when_a_process_holds_the_model(cli: Cli) -> None:
    # A worker pool process's side, as workers/control.py does it: listen, then report.
    pubsub = cli.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONTROL)
    try:
        command = dreamq_command("models", "warm", "xl", "--wait", "60")
        with subprocess.Popen(
            command, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as waiting:
            deadline = Deadline(30)
            heard = None
            while heard is None and not deadline.passed():
                heard = pubsub.get_message(timeout=deadline.left())
            assert heard is not None and heard["data"] == b"warm xl"
            WorkerStore(cli.client).publish_models("gpu-w:99", ["xl"], until=time.time() + 60)
            out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        assert "asked 1 worker process(es) to load xl (never loaded yet)" in out
        assert "xl is warm in gpu-w:99" in out
    finally:
        pubsub.close()


def test_models_fetch_converts_a_single_file_into_a_diffusers_folder(
    cli: Cli, tmp_path: Path
) -> None:
    from workers.tiny import write_tiny_sd_single_file

    file, config = write_tiny_sd_single_file(tmp_path / "single")
    added = cli.run("models", "add", "photo", str(file), "--single-file", "--config", str(config))
    assert added.returncode == 0, added.stderr
    target = tmp_path / "converted" / "photo"

    fetched = cli.run("models", "fetch", "photo", "--to", str(target))
    assert fetched.returncode == 0, fetched.stderr
    assert "convert: 100%" in fetched.stderr  # the progress bar over the stages
    assert (target / "model_index.json").is_file()
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    entry = load_registry(cli.registry).models["photo"]
    assert (entry.source, entry.config) == (str(target), None)  # now loads from the folder
    assert [p.name for p in target.parent.iterdir()] == ["photo"]  # no partial folder left

    again = cli.run("models", "fetch", "photo")
    assert again.returncode == 0 and "nothing to fetch" in again.stdout
    assert cli.run("models", "fetch", "nope").returncode == 1


def test_models_fetch_of_a_hub_id_offline_fails_clearly(cli: Cli) -> None:
    assert cli.run("models", "add", "hub", "nobody-here/no-such-model").returncode == 0
    result = cli.run("models", "download", "hub", "--to", str(cli.registry.parent / "hub"))
    assert result.returncode == 1
    assert "fetching model hub failed" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert "Traceback" not in result.stderr
    assert load_registry(cli.registry).models["hub"].source == "nobody-here/no-such-model"


# -- jobs ----------------------------------------------------------------------------------------


def test_jobs_show_tells_the_record_and_no_secret(cli: Cli) -> None:
    key, info = ApiKeyStore(cli.client).create("shop")
    webhook = "https://user:hunter2@hooks.example:8443/dreamq?token=s3cret"
    job_id = cli.new_job(owner=info.id, webhook=webhook)

    shown = cli.json("jobs", "show", str(job_id))
    assert shown["id"] == job_id and shown["status"] == "queued"
    assert (shown["model_id"], shown["kind"], shown["owner"]) == ("demo", "txt2img", info.id)
    assert shown["owner_name"] == "shop" and shown["queue"] == cli.queue
    assert shown["attempts"] == 0 and shown["lease_seconds_left"] is None
    assert shown["webhook"] == "https://hooks.example:8443/dreamq?..."
    assert shown["webhook_status"] == "pending" and shown["track_id"] == 17
    assert shown["future_links"] == ["https://cdn.example/f-0.png"]
    assert 0 < shown["remaining_seconds"] <= 10 and shown["created"].endswith("Z")

    assert cli.jobs().fail(job_id, "The model demo could not be loaded.")
    table = cli.run("jobs", "show", str(job_id))
    assert table.returncode == 0, table.stderr
    rows = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert rows["status"] == "failed" and rows["owner"] == f"{info.id} (shop)"
    assert rows["error"] == "The model demo could not be loaded."
    for secret in (key, "hunter2", "s3cret"):
        assert secret not in table.stdout

    unknown = cli.run("jobs", "show", "999999")
    assert unknown.returncode == 1 and "unknown" in unknown.stderr


def test_jobs_requeue_publishes_a_lost_job_and_refuses_the_rest(cli: Cli) -> None:
    lost = cli.new_job()
    published = cli.run("jobs", "requeue", str(lost))
    assert published.returncode == 0, published.stderr
    assert f"published job {lost}" in published.stdout
    assert cli.queued_job_ids() == [lost]

    # Its message is in the broker now: a second one only on demand.
    present = cli.run("jobs", "requeue", str(lost))
    assert present.returncode == 1 and "has a message in the broker" in present.stderr
    forced = cli.run("jobs", "requeue", str(lost), "--force")
    assert forced.returncode == 0, forced.stderr
    assert cli.queued_job_ids() == [lost, lost]

    running = cli.new_job()
    claim = cli.jobs().acquire(running, new_lease_token())  # a worker process holds it
    assert claim.job is not None and claim.job.status == "processing"
    leased = cli.run("jobs", "requeue", str(running))
    assert leased.returncode == 1 and "holds its lease" in leased.stderr

    failed = cli.new_job()
    assert cli.jobs().fail(failed, "stopped")
    final = cli.run("jobs", "requeue", str(failed))
    assert final.returncode == 1 and "is failed" in final.stderr
    assert cli.queued_job_ids() == [lost, lost]  # nothing more was published

    assert cli.run("jobs", "requeue", "999999").returncode == 1
    assert cli.run("jobs", "requeue", "x").returncode == 2  # argparse: not a job id


# -- queue -------------------------------------------------------------------------------------


def test_queue_shows_depth_unacked_jobs_by_state_and_workers(cli: Cli) -> None:
    jobs = [cli.new_job() for _ in range(3)]
    for job_id in jobs:
        assert cli.run("jobs", "requeue", str(job_id)).returncode == 0
    assert cli.jobs().acquire(jobs[0], new_lease_token()).job is not None  # one processing
    now = time.time()
    worker = WorkerRecord(
        name=f"generate-1@{cli.queue}", role="generate", host=cli.queue, pid=1,
        queues=[cli.queue], concurrency=1, pool_pids=[2], started_at=now, heartbeat_at=now,
        heartbeat_seconds=10, connected=True, consuming=[cli.queue], consuming_at=now,
    )  # fmt: skip
    WorkerStore(cli.client).beat(worker, serving=True)

    # A consumer holds one message unacknowledged while the command runs.
    with Connection(cli.env["DREAMQ_REDIS_URL"]) as connection:
        held = connection.default_channel.basic_get(cli.queue, no_ack=False)
        assert held is not None
        report = {entry["queue"]: entry for entry in cli.json("queue")}
        table = cli.run("queue")

    generate, webhooks = report[cli.queue], report[cli.webhook_queue]
    assert (generate["waiting"], generate["unacked"]) == (2, 1)
    assert generate["priorities"] == {"0": 2, "3": 0, "6": 0, "9": 0}
    assert generate["jobs"] == {"queued": 2, "processing": 1}
    assert generate["workers"] == [{"name": worker.name, "state": "ok"}]
    assert (webhooks["waiting"], webhooks["unacked"], webhooks["workers"]) == (0, 0, [])
    assert "pending_webhooks" in webhooks["jobs"]

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "WAITING", "BY", "PRIORITY", "UNACKED", "JOBS", "WORKERS"]
    assert lines[1].split() == [cli.queue, "2", "0:2", "1", "queued", "2,", "processing", "1",
                                "1", "ok"]  # fmt: skip
