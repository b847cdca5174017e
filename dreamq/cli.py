"""The `dreamq` command: run the parts of the stack, manage keys, write tiny models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dreamq.settings import Settings

if TYPE_CHECKING:
    from storage.apikeys import ApiKeyStore, KeyInfo, WebhookSecrets
    from workers.webhooks import WebhookDispatcher


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        # A configuration dreamq refuses, e.g. DREAMQ_VISIBILITY_TIMEOUT below twice
        # DREAMQ_JOB_TIME_LIMIT: say so and stop, without a traceback.
        messages = "\n".join(f"  {error['msg']}" for error in exc.errors())
        raise SystemExit(f"dreamq: invalid settings:\n{messages}") from None


def _logging(settings: Settings) -> None:
    from dreamq.logs import configure

    configure(settings.log_level, settings.log_format)  # text, or JSON lines (dreamq/logs.py)
    logging.captureWarnings(True)  # library warnings as log lines too: JSON stays parseable


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    _logging(settings)
    uvicorn.run(
        "api.app:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        # Longer than the idle timeout of the load balancers in front (60 s on AWS ALB, nginx's
        # 75 s upstream keepalive): uvicorn's 5 s closes connections a balancer still reuses,
        # and the request that races the close fails.
        timeout_keep_alive=75,
    )
    return 0


def _run_worker(role: str, queue: str, pool: str, concurrency: int) -> int:
    from workers.app import create_worker_app

    settings = _settings()
    _logging(settings)
    app = create_worker_app(settings, role)
    app.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            # Unique per worker process, so two workers on one host are told apart; the same
            # name keys its liveness record (`dreamq workers`).
            f"--hostname={role}-{os.getpid()}@%h",
            f"--loglevel={settings.log_level}",
            # A fleet coordinates through Redis job records, not worker gossip: faster startup.
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    # prefork: one process per GPU, models loaded in the child after fork; time limits work.
    return _run_worker("generate", settings.generate_queue, "prefork", args.concurrency)


def cmd_dispatcher(args: argparse.Namespace) -> int:
    settings = _settings()
    # Deliveries wait on the network, not the CPU: threads keep many in flight cheaply.
    return _run_worker("webhooks", settings.webhook_queue, "threads", args.concurrency)


def _key_store(settings: Settings) -> ApiKeyStore:
    import redis

    from storage.apikeys import ApiKeyStore

    return ApiKeyStore(redis.Redis.from_url(settings.redis_url), plans=settings.plans)


def _plan_of(info: KeyInfo, settings: Settings) -> str:
    """The plan whose limits apply to the key, as the API resolves it."""
    if info.plan is None:
        return f"{settings.default_plan} (default)"
    if info.plan not in settings.plans:
        return f"{info.plan} (not configured: {settings.default_plan} applies)"
    return info.plan


def _key_public(info: KeyInfo, settings: Settings) -> dict[str, object]:
    """What `keys list` shows of a key: never the key or its hash."""
    return {
        "id": info.id,
        "name": info.name,
        "plan": info.plan or settings.default_plan,
        "plan_applied": _plan_of(info, settings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_at)),
        "created_at": info.created_at,
        "revoked": info.revoked,
    }


def cmd_keys_create(args: argparse.Namespace) -> int:
    from storage.apikeys import UnknownPlan

    settings = _settings()
    store = _key_store(settings)
    try:
        key, info = store.create(args.name, plan=args.plan)
    except UnknownPlan as exc:
        print(f"dreamq: {exc}", file=sys.stderr)
        return 2
    found = store.webhook_secrets(info.id)
    secret = found.primary if found else ""
    plan = info.plan or settings.default_plan
    if args.json:
        print(json.dumps({"name": info.name, "id": info.id, "key": key, "webhook_secret": secret,
                          "plan": plan}))  # fmt: skip
    else:
        print(f"created key {info.id} ({info.name}, plan {plan}); it is shown once, store it "
              f"now:\n{key}")  # fmt: skip
        print(f"webhook signing secret (`dreamq keys secret {info.id}` shows it again):\n{secret}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = _settings()
    found = [_key_public(info, settings) for info in _key_store(settings).list()]
    if args.json:
        print(json.dumps(found))
        return 0
    rows = [["ID", "NAME", "PLAN", "CREATED", "STATE"]]
    for key in found:
        state = "revoked" if key["revoked"] else "active"
        rows.append([str(key["id"]), str(key["name"]), str(key["plan_applied"]),
                     str(key["created"]), state])  # fmt: skip
    _print_table(rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    info = _key_store(_settings()).revoke(args.key_id)
    if info is None:
        print(f"key {args.key_id}: unknown", file=sys.stderr)
        return 1
    print(f"revoked key {info.id} ({info.name}): refused from its next request on")
    return 0


def cmd_keys_set_plan(args: argparse.Namespace) -> int:
    from storage.apikeys import UnknownPlan

    try:
        info = _key_store(_settings()).set_plan(args.key_id, args.plan)
    except UnknownPlan as exc:
        print(f"dreamq: {exc}", file=sys.stderr)
        return 2
    if info is None:
        print(f"key {args.key_id}: unknown", file=sys.stderr)
        return 1
    print(f"key {info.id} ({info.name}) is on plan {args.plan} from its next request on")
    return 0


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _print_secrets(key_id: str, found: WebhookSecrets | None, as_json: bool) -> int:
    if found is None:
        print(f"no webhook secret for key {key_id} (unknown key?)", file=sys.stderr)
        return 1
    answer = {
        "id": key_id,
        "webhook_secret": found.primary,
        "previous_webhook_secret": found.previous,
        "previous_valid_until": found.previous_until,
    }
    if as_json:
        print(json.dumps(answer))
    else:
        print(found.primary)
        if found.previous and found.previous_until:
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(found.previous_until))
            print(f"previous secret, still signing until {until}:\n{found.previous}")
    return 0


def cmd_keys_secret(args: argparse.Namespace) -> int:
    import redis

    from storage.apikeys import ApiKeyStore

    store = ApiKeyStore(redis.Redis.from_url(_settings().redis_url))
    return _print_secrets(args.key_id, store.webhook_secrets(args.key_id), args.json)


def cmd_keys_rotate_secret(args: argparse.Namespace) -> int:
    import redis

    from storage.apikeys import ApiKeyStore

    settings = _settings()
    store = ApiKeyStore(redis.Redis.from_url(settings.redis_url))
    window = settings.webhook_secret_rotation_seconds
    found = store.rotate_webhook_secret(args.key_id, window_seconds=window)
    return _print_secrets(args.key_id, found, args.json)


def _webhook_dispatcher(settings: Settings) -> WebhookDispatcher:
    import redis

    from storage.jobs import JobStore
    from workers.webhooks import dispatcher_from_settings

    client = redis.Redis.from_url(settings.redis_url)
    jobs = JobStore(client, ttl_seconds=settings.job_ttl_seconds)
    return dispatcher_from_settings(settings, client, jobs)


def cmd_jobs_replay_webhook(args: argparse.Namespace) -> int:
    settings = _settings()
    _logging(settings)
    outcome = _webhook_dispatcher(settings).replay(args.job_id)
    if outcome is None:
        print(f"job {args.job_id}: no webhook to replay (unknown, not finished, no webhook URL, "
              "or an attempt in flight)", file=sys.stderr)  # fmt: skip
        return 1
    print(json.dumps({"webhook_status": outcome.status.value, **(outcome.record or {})}))
    return 0 if outcome.status.value == "sent" else 2


def cmd_jobs_webhook(args: argparse.Namespace) -> int:
    import redis

    from storage.jobs import JobStore

    settings = _settings()
    jobs = JobStore(redis.Redis.from_url(settings.redis_url), ttl_seconds=settings.job_ttl_seconds)
    job = jobs.get(args.job_id)
    if job is None:
        print(f"job {args.job_id}: unknown", file=sys.stderr)
        return 1
    status, attempts = job.webhook_status.value, jobs.webhook_attempts(args.job_id)
    print(json.dumps({"id": job.id, "webhook_status": status, "attempts": attempts}))
    return 0


def cmd_jobs_reconcile(args: argparse.Namespace) -> int:
    from dreamq.queue import make_celery
    from workers.reconciler import fleet_lock, from_settings

    settings = _settings()
    _logging(settings)
    lock = fleet_lock(settings)
    if not lock.hold():
        print("a dispatcher's reconciler is running (it holds the fleet lock); it passes every "
              f"{settings.reconcile_seconds:g} s", file=sys.stderr)  # fmt: skip
        return 1
    try:
        reconciler = from_settings(settings, make_celery(settings))
        reconciler.run_once()  # notes what is missing from the broker
        time.sleep(args.wait)  # a message moving between queue and consumer is in neither
        lock.hold()
        report = reconciler.run_once()  # re-drives what is still missing
    finally:
        lock.release()
    print(json.dumps({"jobs": report.jobs, "failed": report.failed, "webhooks": report.webhooks}))
    return 0


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s"


def cmd_workers(args: argparse.Namespace) -> int:
    import redis

    from storage.workers import OK, WorkerStore, find, queue_depths

    settings = _settings()
    store = WorkerStore(redis.Redis.from_url(settings.redis_url))
    statuses = store.statuses(lambda names: queue_depths(settings.effective_broker_url, names))
    if args.check is not None:
        found = find(statuses, args.check)
        if found is None:
            print(f"worker {args.check}: unknown (no heartbeat record)", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(found.as_dict()))
        else:
            print(f"{found.record.name}: {found.state}{': ' if found.reason else ''}{found.reason}")
        return 0 if found.state == OK else 1
    if args.json:
        print(json.dumps([status.as_dict() for status in statuses]))
        return 0
    header = ["NAME", "ROLE", "STATE", "QUEUES", "HEARTBEAT", "RECEIVED", "JOBS", "MODELS", "DEPTH"]
    rows = [header]
    for status in statuses:
        record = status.record
        rows.append(
            [
                record.name,
                record.role,
                status.state,
                ",".join(record.queues),
                _age(status.heartbeat_age),
                _age(status.received_age),
                ",".join(map(str, record.jobs)) or "-",
                ",".join(status.models) or "-",
                "?" if status.queue_depth is None else str(status.queue_depth),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for status in statuses:
        if status.reason:
            print(f"{status.record.name}: {status.reason}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from workers.tiny import main_tiny_model

    path = main_tiny_model(Path(args.directory), args.kind)
    print(path)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from dreamq.devstack import DevStack

    return DevStack(_settings(), port=args.port, directory=Path(args.dir)).run()


def parser() -> argparse.ArgumentParser:
    # Their modules import this one (settings, tables): imported here, not at the top.
    from dreamq.cli_jobs import add_jobs_commands, add_queue_command
    from dreamq.cli_models import add_models_commands

    root = argparse.ArgumentParser(prog="dreamq", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="API processes")
    api.add_argument("--access-log", action="store_true")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a GPU worker (generation jobs)")
    worker.add_argument("--concurrency", type=int, default=1, help="pool processes (one per GPU)")
    worker.set_defaults(func=cmd_worker)

    dispatcher = sub.add_parser("dispatcher", help="run a webhook dispatcher (CPU)")
    dispatcher.add_argument("--concurrency", type=int, default=8)
    dispatcher.set_defaults(func=cmd_dispatcher)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument(
        "--plan", help="the key's plan, one of DREAMQ_PLANS (default: DREAMQ_DEFAULT_PLAN)"
    )
    create.add_argument("--json", action="store_true", help="print a JSON object")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser(
        "list", help="every key: id, name, plan, created, revoked (never the key itself)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="refuse a key from its next request on")
    revoke.add_argument("key_id", help="the key's public id (from keys create or keys list)")
    revoke.set_defaults(func=cmd_keys_revoke)
    set_plan = keys_sub.add_parser("set-plan", help="move a key to another plan")
    set_plan.add_argument("key_id")
    set_plan.add_argument("plan", help="one of DREAMQ_PLANS")
    set_plan.set_defaults(func=cmd_keys_set_plan)
    secret = keys_sub.add_parser("secret", help="show a key's webhook signing secret(s)")
    secret.add_argument("key_id", help="the key's public id (from keys create)")
    secret.add_argument("--json", action="store_true", help="print a JSON object")
    secret.set_defaults(func=cmd_keys_secret)
    rotate = keys_sub.add_parser(
        "rotate-secret",
        help="a new webhook secret; the old one keeps signing for "
        "DREAMQ_WEBHOOK_SECRET_ROTATION_SECONDS",
    )
    rotate.add_argument("key_id")
    rotate.add_argument("--json", action="store_true", help="print a JSON object")
    rotate.set_defaults(func=cmd_keys_rotate_secret)

    jobs = sub.add_parser("jobs", help="operate on jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    replay = jobs_sub.add_parser(
        "replay-webhook", help="re-send a job's webhook now (same webhook-id, one attempt)"
    )
    replay.add_argument("job_id", type=int)
    replay.set_defaults(func=cmd_jobs_replay_webhook)
    show = jobs_sub.add_parser("webhook", help="a job's webhook status and every attempt (JSON)")
    show.add_argument("job_id", type=int)
    show.set_defaults(func=cmd_jobs_webhook)
    reconcile = jobs_sub.add_parser(
        "reconcile",
        help="publish again every job and webhook whose broker message was lost (what the "
        "dispatchers' reconciler does every DREAMQ_RECONCILE_SECONDS); prints what it did",
    )
    reconcile.add_argument(
        "--wait", type=float, default=2.0, help="seconds between the two looks at the broker"
    )
    reconcile.set_defaults(func=cmd_jobs_reconcile)
    add_jobs_commands(jobs_sub)
    add_queue_command(sub)
    add_models_commands(sub)

    workers = sub.add_parser(
        "workers", help="workers, their queues, loaded models, heartbeat and consumption state"
    )
    workers.add_argument("--json", action="store_true", help="print a JSON list")
    workers.add_argument(
        "--check",
        metavar="NAME",
        help="exit 1 unless worker NAME is ok (not stale, not stalled); NAME may be ROLE@HOST "
        "for the newest worker of that role on that host, e.g. generate@$(hostname)",
    )
    workers.set_defaults(func=cmd_workers)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight model (offline)")
    tiny.add_argument("directory")
    # Spelled out rather than read from workers.tiny, which would import torch into every command.
    tiny_kinds = ["sd", "sdxl", "video", "inpaint", "lora", "lora-sdxl", "embedding", "vae"]
    tiny_kinds += ["safety-checker", "upscaler", "translator", "demo"]
    tiny.add_argument(
        "--kind",
        default="sd",
        choices=tiny_kinds,
        help="demo: all of them plus the registry YAML of `dreamq dev` (its path is printed)",
    )
    tiny.set_defaults(func=cmd_tiny_model)

    dev = sub.add_parser("dev", help="run the whole stack on this machine")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--dir", default=".dreamq-dev", help="state folder (models, outputs)")
    dev.set_defaults(func=cmd_dev)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
