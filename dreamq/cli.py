"""The `dreamq` command: run the parts of the stack, manage keys, write tiny models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dreamq.settings import Settings


def _settings() -> Settings:
    return Settings()


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
    )


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
            f"--hostname={role}@%h",
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


def cmd_keys_create(args: argparse.Namespace) -> int:
    import redis

    from storage.apikeys import ApiKeyStore

    settings = _settings()
    key, info = ApiKeyStore(redis.Redis.from_url(settings.redis_url)).create(args.name)
    if args.json:
        print(json.dumps({"name": info.name, "id": info.id, "key": key}))
    else:
        print(f"created key {info.id} ({info.name}); it is shown once, store it now:\n{key}")
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
    create.add_argument("--json", action="store_true", help="print a JSON object")
    create.set_defaults(func=cmd_keys_create)

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
