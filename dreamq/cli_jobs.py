"""`dreamq jobs show|requeue` and `dreamq queue`: one job's record, and the queues' state."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dreamq import lanes
from dreamq.cli import _print_table, _settings
from dreamq.settings import Settings

if TYPE_CHECKING:
    import redis

    from storage.jobs import JobRecord


def _redis(url: str) -> redis.Redis:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)


def _when(at: float | None) -> str | None:
    return None if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def public_webhook(url: str | None) -> str | None:
    """The webhook URL without what may authenticate it (user info, query, fragment)."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    hidden = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{hidden}"


def _is_broker_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


# -- jobs show ---------------------------------------------------------------------------------


def job_public(job: JobRecord, client: redis.Redis, now: float) -> dict[str, Any]:
    """What `jobs show` tells of a job: never the key, nor its webhook URL's secrets."""
    from storage import keys
    from storage.apikeys import ApiKeyStore

    owner = ApiKeyStore(client).get(job.owner)
    lease_ms = int(client.pttl(keys.job_lease(job.id)))
    raw_redrives = client.hget(keys.job(job.id), "redrives")
    attempts = client.hget(keys.job(job.id), "webhook_attempt_count")
    return {
        "id": job.id,
        "status": job.status.value,
        "model_id": job.model_id,
        "kind": job.kind,
        "owner": job.owner,
        "owner_name": owner.name if owner else None,
        "queue": job.queue,
        "attempts": job.attempts,
        "redrives": int(raw_redrives or 0),
        # -2: no lease; -1: a lease without expiry (never written so, shown as held).
        "lease_seconds_left": None if lease_ms == -2 else max(lease_ms, 0) / 1000,
        "created": _when(job.created_at),
        "updated": _when(job.updated_at),
        "started": _when(job.started_at),
        "finished": _when(job.finished_at),
        "eta": _when(job.eta_at),
        "remaining_seconds": 0.0 if job.status.is_terminal() else job.remaining_seconds(now),
        "predicted_seconds": round(job.predicted_seconds, 2),
        "generation_time": job.generation_time,
        "error": job.error,
        "webhook": public_webhook(job.webhook),
        "webhook_status": job.webhook_status.value or None,
        "webhook_attempts": int(attempts or 0),
        "track_id": job.track_id,
        "output": job.output,
        "future_links": job.future_links,
    }


def _job(settings: Settings, job_id: int) -> tuple[redis.Redis, JobRecord | None]:
    """The Redis client and the job record; None (after saying so) when there is none."""
    from storage.jobs import JobStore

    client = _redis(settings.redis_url)
    job = JobStore(client, ttl_seconds=settings.job_ttl_seconds).get(job_id)
    if job is None:
        print(f"job {job_id}: unknown (or expired)", file=sys.stderr)
    return client, job


def cmd_jobs_show(args: argparse.Namespace) -> int:
    settings = _settings()
    client, job = _job(settings, args.job_id)
    if job is None:
        return 1
    found = job_public(job, client, time.time())
    if args.json:
        print(json.dumps(found))
        return 0
    rows = []
    for name, value in found.items():
        if isinstance(value, list):
            text = "\n".join(map(str, value)) if value else "-"
        else:
            text = "-" if value is None or value == "" else str(value)
        if name == "owner" and found["owner_name"]:
            text = f"{text} ({found['owner_name']})"
        if name != "owner_name":
            lines = text.splitlines() or ["-"]
            rows += [[name, lines[0]], *[["", line] for line in lines[1:]]]
    _print_table(rows)
    return 0


# -- jobs requeue ------------------------------------------------------------------------------

REQUEUE_HELP = (
    "publish again a queued or processing job whose broker message was lost and that no worker "
    "holds (no lease): what the reconciler does, at once. The record is left as it is. Finished "
    "jobs (success, failed) are refused: the state machine takes no job out of a final state; "
    "submit a failed job again instead"
)


def cmd_jobs_requeue(args: argparse.Namespace) -> int:
    from dreamq.queue import CeleryPublisher, make_celery
    from storage import keys
    from workers.reconciler import broker_view

    settings = _settings()
    client, job = _job(settings, args.job_id)
    if job is None:
        return 1
    if job.status.is_terminal():
        print(f"job {job.id} is {job.status.value}: a finished job is not requeued (submit it "
              "again)", file=sys.stderr)  # fmt: skip
        return 1
    lease_ms = int(client.pttl(keys.job_lease(job.id)))
    if lease_ms != -2:
        left = "" if lease_ms < 0 else f" for {lease_ms / 1000:.0f} s more"
        print(f"job {job.id} is {job.status.value} and a worker process holds its lease{left}: "
              "it is running, not lost; not published", file=sys.stderr)  # fmt: skip
        return 1
    if job.queue and job.queue != settings.generate_queue:
        print(f"job {job.id} belongs to queue {job.queue}, not {settings.generate_queue}: run "
              f"this with DREAMQ_GENERATE_QUEUE={job.queue}", file=sys.stderr)  # fmt: skip
        return 2
    contents = broker_view(settings).contents()
    if contents is not None and job.id in contents.jobs and not args.force:
        print(f"job {job.id} has a message in the broker (waiting or held by a consumer): not "
              "published again; --force publishes a second one", file=sys.stderr)  # fmt: skip
        return 1
    CeleryPublisher(make_celery(settings), settings).publish_job(job.id, job.level)
    print(f"published job {job.id} ({job.status.value}, {job.attempts} attempt(s) so far) to "
          f"queue {settings.generate_queue} again")  # fmt: skip
    return 0


# -- queue -------------------------------------------------------------------------------------


def _redis_queue(client: redis.Redis, queue: str, task: str) -> tuple[dict[str, int], int]:
    """(messages waiting by priority, messages held unacknowledged) of a kombu Redis queue
    whose messages run `task`."""
    from workers.reconciler import UNACKED_KEY

    names = {
        str(lanes.broker_priority(level)): lanes.list_name(queue, level)
        for level in range(lanes.LEVELS)
    }
    pipe = client.pipeline(transaction=False)
    for name in names.values():
        pipe.llen(name)
    waiting = {step: int(n) for step, n in zip(names, pipe.execute(), strict=True)}
    unacked = 0
    for raw in client.hvals(UNACKED_KEY):
        try:
            message, _exchange, routing_key = json.loads(raw)
            its_task = (message.get("headers") or {}).get("task")
        except (ValueError, TypeError, AttributeError):
            continue
        if routing_key == queue or (not routing_key and its_task == task):
            unacked += 1
    return waiting, unacked


def _job_states(client: redis.Redis, generate_queue: str) -> Counter[str]:
    """Unfinished jobs of this deployment's generation queue, by status."""
    from storage import keys
    from storage.jobs import JobStore

    ids = JobStore(client, ttl_seconds=1).active_ids()
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "status", "queue")
    states: Counter[str] = Counter({"queued": 0, "processing": 0})
    for status, queue in pipe.execute() if ids else []:
        if status is None:
            continue
        if queue and queue.decode() != generate_queue:
            continue  # another deployment sharing the Redis
        states[status.decode()] += 1
    return states


def queue_report(settings: Settings) -> list[dict[str, Any]]:
    from dreamq.queue import GENERATE_TASK, WEBHOOK_TASK
    from storage import keys
    from storage.workers import WorkerStore, queue_depths

    client = _redis(settings.redis_url)
    broker = settings.effective_broker_url
    queues = [(settings.generate_queue, GENERATE_TASK), (settings.webhook_queue, WEBHOOK_TASK)]
    report: list[dict[str, Any]] = []
    for queue, task in queues:
        entry: dict[str, Any] = {"queue": queue}
        if _is_broker_redis(broker):
            try:
                priorities, unacked = _redis_queue(_redis(broker), queue, task)
                entry |= {"waiting": sum(priorities.values()), "priorities": priorities}
                entry["unacked"] = unacked
            except Exception as exc:  # the broker down: the rest is still worth showing
                print(f"dreamq: broker unreachable ({exc})", file=sys.stderr)
                entry |= {"waiting": None, "priorities": None, "unacked": None}
        else:
            # AMQP: a passive declare tells the ready count; unacknowledged messages and
            # priorities only RabbitMQ's own tools show.
            waiting = queue_depths(broker, [queue])[queue]
            entry |= {"waiting": waiting, "priorities": None, "unacked": None}
        report.append(entry)
    states = _job_states(client, settings.generate_queue)
    report[0]["jobs"] = dict(states)
    report[1]["jobs"] = {"pending_webhooks": int(client.zcard(keys.WEBHOOKS_PENDING))}
    depth_of = {entry["queue"]: entry["waiting"] for entry in report}
    statuses = WorkerStore(client).statuses(lambda names: {n: depth_of.get(n) for n in names})
    for entry in report:
        entry["workers"] = [
            {"name": s.record.name, "state": s.state}
            for s in statuses
            if entry["queue"] in s.record.queues
        ]
    return report


def _count_text(values: dict[str, int]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in values.items()) or "-"


def _priorities_text(values: dict[str, int] | None) -> str:
    """`priority:count` of the priority lists holding messages (kombu's steps 0, 3, 6, 9)."""
    if values is None:
        return "?"
    return " ".join(f"{step}:{n}" for step, n in values.items() if n) or "-"


def cmd_queue(args: argparse.Namespace) -> int:
    settings = _settings()
    report = queue_report(settings)
    if args.json:
        print(json.dumps(report))
        return 0
    rows = [["QUEUE", "WAITING", "BY PRIORITY", "UNACKED", "JOBS", "WORKERS"]]
    for entry in report:
        states = Counter(worker["state"] for worker in entry["workers"])
        workers = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
        rows.append(
            [
                entry["queue"],
                "?" if entry["waiting"] is None else str(entry["waiting"]),
                _priorities_text(entry["priorities"]),
                "?" if entry["unacked"] is None else str(entry["unacked"]),
                _count_text(entry["jobs"]),
                workers,
            ]
        )
    _print_table(rows)
    if not _is_broker_redis(settings.effective_broker_url):
        print("AMQP broker: WAITING is RabbitMQ's ready count; unacknowledged messages and "
              "priorities come from RabbitMQ's own tools (rabbitmqctl list_queues name "
              "messages_ready messages_unacknowledged, or its management UI)")  # fmt: skip
    return 0


# -- the parser --------------------------------------------------------------------------------


def add_jobs_commands(jobs_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = jobs_sub.add_parser(
        "show",
        help="a job's record: status, model, kind, owner key id, attempts, times, eta, error, "
        "webhook status, outputs (never a secret)",
    )
    show.add_argument("job_id", type=int)
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=cmd_jobs_show)
    requeue = jobs_sub.add_parser("requeue", help=REQUEUE_HELP, description=REQUEUE_HELP)
    requeue.add_argument("job_id", type=int)
    requeue.add_argument(
        "--force",
        action="store_true",
        help="publish even when the broker holds a message of the job (a duplicate delivery "
        "finds the job leased or finished and exits)",
    )
    requeue.set_defaults(func=cmd_jobs_requeue)


def add_queue_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = sub.add_parser(
        "queue",
        help="per queue: messages waiting (by priority) and unacknowledged, unfinished jobs by "
        "state, and the workers consuming it",
    )
    queue.add_argument("--json", action="store_true", help="print a JSON list")
    queue.set_defaults(func=cmd_queue)
