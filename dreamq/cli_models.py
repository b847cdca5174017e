"""`dreamq models ...`: the model registry file, and the models the workers hold warm.

The registry (DREAMQ_MODELS_FILE) is read by every API and worker process once, at start: an edit
here reaches the fleet with a restart (a rolling update), nothing reloads it on the fly. Edits are
atomic (a temporary file, validated, then renamed over the registry), so a process starting
meanwhile reads the old file or the new one, never half of one. The YAML is written back without
its comments, except for the comment block at its top.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dreamq.cli import _print_table, _settings
from dreamq.registry import ModelEntry, Registry, RegistryError, load_registry
from dreamq.settings import Settings

if TYPE_CHECKING:
    import redis

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
RESTART_NOTE = (
    "API and worker processes read the registry at start: restart them (a rolling update) "
    "for the change to take effect"
)
HUB_IGNORE = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data"]
"""A hub repo's files a diffusers folder does not need: single-file checkpoints and other
frameworks' weights, often as large as the model itself."""


class _Usage(Exception):
    """Bad usage or configuration: exit 2 with the message."""


def _registry_file(settings: Settings) -> Path:
    if settings.models_file is None:
        raise _Usage("DREAMQ_MODELS_FILE is not set: it names the model registry (YAML)")
    return settings.models_file


def _load(path: Path) -> Registry:
    try:
        return load_registry(path)
    except RegistryError as exc:
        raise _Usage(str(exc)) from None


def _fail(exc: _Usage) -> int:
    print(f"dreamq: {exc}", file=sys.stderr)
    return 2


# -- editing the file --------------------------------------------------------------------------


def _read_raw(path: Path) -> tuple[str, dict[str, Any]]:
    """(leading comment block, data) of the registry, with its sources as written (relative
    ones stay relative)."""
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line + "\n")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise _Usage(f"invalid model registry {path}: no `models` mapping")
    data.setdefault("models", {})
    return "".join(header), data


def write_atomically(path: Path, header: str, data: dict[str, Any]) -> None:
    """Replace the registry with `data`, validated first: the file is always whole and valid."""
    text = header + yaml.safe_dump(data, sort_keys=False)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        _load(temporary)  # in the same folder: relative sources resolve as they will
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _source_as_given(source: str) -> str:
    """A local path the operator typed (relative to where they stand) made absolute; a hub id
    ("owner/name") or a path that exists only on the workers kept as written."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def cmd_models_add(args: argparse.Namespace) -> int:
    try:
        path = _registry_file(_settings())
        if not args.model_id or any(c.isspace() for c in args.model_id):
            raise _Usage(f"invalid model id {args.model_id!r}: no spaces")
        if args.single_file and not args.source.endswith(SINGLE_FILE_SUFFIXES):
            raise _Usage(f"--single-file: {args.source} is not a .safetensors or .ckpt file")
        header, data = _read_raw(path)
        if args.model_id in data["models"]:
            raise _Usage(f"model {args.model_id} is in the registry already (remove it first)")
        source = _source_as_given(args.source)
        config = None if args.config is None else _source_as_given(args.config)
        entry = ModelEntry(source=source, family=args.family, kind=args.kind, config=config)
        if entry.is_single_file and entry.config is None:
            print(f"note: without --config, loading {source} offline fails: diffusers fetches "
                  "the architecture from the hub", file=sys.stderr)  # fmt: skip
        if not Path(source).exists() and not _is_hub_id(source):
            print(f"note: {source} does not exist on this machine; the workers must have it",
                  file=sys.stderr)  # fmt: skip
        data["models"][args.model_id] = entry.model_dump(exclude_defaults=True)
        write_atomically(path, header, data)
    except _Usage as exc:
        return _fail(exc)
    print(f"added model {args.model_id} ({entry.family}, {entry.kind}) from {source} to {path}")
    print(RESTART_NOTE)
    return 0


def cmd_models_remove(args: argparse.Namespace) -> int:
    try:
        path = _registry_file(_settings())
        header, data = _read_raw(path)
        if args.model_id not in data["models"]:
            print(f"model {args.model_id}: not in the registry {path}", file=sys.stderr)
            return 1
        del data["models"][args.model_id]
        write_atomically(path, header, data)
    except _Usage as exc:
        return _fail(exc)
    print(f"removed model {args.model_id} from {path}")
    print(RESTART_NOTE + "; workers holding it keep it until they restart or it idles out")
    return 0


# -- what the workers hold ---------------------------------------------------------------------


def _redis(settings: Settings) -> redis.Redis:
    import redis

    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)


def _holders(client: redis.Redis) -> dict[str, list[str]]:
    """Model id -> the live pool processes (`<host>:<pid>`) holding it."""
    from storage.workers import WorkerStore

    holders: dict[str, list[str]] = {}
    for process, models in WorkerStore(client).process_models(time.time()).items():
        for model_id in models:
            holders.setdefault(model_id, []).append(process)
    return {model_id: sorted(names) for model_id, names in holders.items()}


def _load_seconds(client: redis.Redis, model_ids: list[str]) -> dict[str, float | None]:
    """The last measured load time of each model (what `model_reload` answers as its eta)."""
    from storage import keys

    pipe = client.pipeline(transaction=False)
    for model_id in model_ids:
        pipe.hget(keys.model_stats(model_id), "load_seconds")
    return {m: float(v) if v else None for m, v in zip(model_ids, pipe.execute(), strict=True)}


def cmd_models_list(args: argparse.Namespace) -> int:
    import redis

    settings = _settings()
    try:
        registry = _load(_registry_file(settings))
    except _Usage as exc:
        return _fail(exc)
    ids = list(registry.models)
    holders: dict[str, list[str]] | None
    try:
        client = _redis(settings)
        holders, load = _holders(client), _load_seconds(client, ids)
    except redis.RedisError as exc:  # the registry is still worth showing
        print(f"dreamq: Redis unreachable ({exc}): warm state unknown", file=sys.stderr)
        holders, load = None, dict.fromkeys(ids)
    found: list[dict[str, Any]] = [
        {
            "id": model_id,
            "family": entry.family,
            "kind": entry.kind,
            "source": entry.source,
            "config": entry.config,
            "single_file": entry.is_single_file,
            "warm_in": None if holders is None else holders.get(model_id, []),
            "load_seconds": load[model_id],
        }
        for model_id, entry in registry.models.items()
    ]
    if args.json:
        print(json.dumps(found))
        return 0
    rows = [["ID", "FAMILY", "KIND", "SOURCE", "WARM IN", "LAST LOAD"]]
    for model in found:
        warm: list[str] | None = model["warm_in"]
        seconds: float | None = model["load_seconds"]
        rows.append([model["id"], model["family"], model["kind"], model["source"],
                     "?" if warm is None else ",".join(warm) or "-",
                     "-" if seconds is None else f"{seconds:.1f}s"])  # fmt: skip
    _print_table(rows)
    return 0


class _Waiting:
    """A one-line progress display on a terminal (nothing when the output is not one)."""

    def __init__(self, label: str, total: float) -> None:
        self._label = label
        self._total = total
        self._tty = sys.stderr.isatty()

    def show(self, elapsed: float) -> None:
        if not self._tty:
            return
        width = 30
        done = min(width, int(width * elapsed / self._total)) if self._total else width
        bar = "#" * done + "." * (width - done)
        sys.stderr.write(f"\r{self._label} [{bar}] {elapsed:5.1f}/{self._total:g} s")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            self._tty = False  # once


def cmd_models_warm(args: argparse.Namespace) -> int:
    from storage import keys

    settings = _settings()
    try:
        registry = _load(_registry_file(settings))
    except _Usage as exc:
        return _fail(exc)
    if registry.model(args.model_id) is None:
        print(f"model {args.model_id}: not in the registry", file=sys.stderr)
        return 1
    client = _redis(settings)
    listeners = int(client.publish(keys.CONTROL, f"warm {args.model_id}"))
    last = _load_seconds(client, [args.model_id])[args.model_id]
    took = "never loaded yet" if last is None else f"its last load took {last:.1f} s"
    # Every pool process of a generation worker listens; a process busy with a job loads the
    # model when the job ends.
    print(f"asked {listeners} worker process(es) to load {args.model_id} ({took})")
    if args.wait is None:
        return 0
    started = time.monotonic()
    waiting = _Waiting(f"waiting for {args.model_id}", args.wait)
    try:
        while True:
            holders = _holders(client).get(args.model_id)
            if holders:
                waiting.close()
                print(f"{args.model_id} is warm in {', '.join(holders)}")
                return 0
            elapsed = time.monotonic() - started
            if elapsed >= args.wait:
                break
            waiting.show(elapsed)
            time.sleep(min(0.25, args.wait - elapsed))
    finally:
        waiting.close()
    print(f"{args.model_id}: no worker process holds it after {args.wait:g} s", file=sys.stderr)
    return 1


# -- fetch: a local diffusers folder for a registry entry ----------------------------------------


def _is_hub_id(source: str) -> bool:
    # What workers/models.py treats as a hub id: "owner/name", not a local path.
    return (
        not Path(source).exists()
        and not source.startswith(("/", "~", "."))
        and (source.count("/") == 1)
    )


def _convert_single_file(entry: ModelEntry, target: Path, label: str) -> None:
    """from_single_file, then save_pretrained into `target`, with a bar over the stages."""
    from tqdm import tqdm  # type: ignore[import-untyped]  # with diffusers; no stubs installed

    from workers.models import BASE_PIPELINES

    pipeline_class = BASE_PIPELINES.get((entry.family, entry.kind))
    if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
        raise _Usage(f"no single-file loader for a {entry.family} {entry.kind} model")
    with tqdm(total=2, desc="convert", unit="stage", file=sys.stderr) as bar:
        bar.set_postfix_str(f"reading {Path(entry.source).name}")
        local_config = entry.config is not None and Path(entry.config).is_dir()
        extra: dict[str, Any] = {}
        if entry.family == "sd15" and entry.kind != "text2video":
            # As the workers load it: they check safety with the registry's own checker.
            extra = {"safety_checker": None, "requires_safety_checker": False}
        pipe = pipeline_class.from_single_file(
            entry.source, config=entry.config, local_files_only=local_config, **extra
        )
        bar.update()
        bar.set_postfix_str(f"writing {label}")
        pipe.save_pretrained(target, safe_serialization=True)
        bar.update()


def _download(repo_id: str, target: Path) -> None:
    from huggingface_hub import snapshot_download

    # Its own tqdm bars: files fetched, and bytes per large file.
    snapshot_download(repo_id, local_dir=target, ignore_patterns=HUB_IGNORE)


def cmd_models_fetch(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        path = _registry_file(settings)
        entry = _load(path).model(args.model_id)
        if entry is None:
            print(f"model {args.model_id}: not in the registry {path}", file=sys.stderr)
            return 1
        target = Path(args.to).resolve() if args.to else path.parent / args.model_id
        if entry.is_single_file:
            if not Path(entry.source).is_file():
                print(f"{entry.source}: no such file on this machine", file=sys.stderr)
                return 1
            if target.exists() and any(target.iterdir()):
                raise _Usage(f"{target} exists and is not empty (name another with --to)")
            what = f"converted {entry.source}"
            # Written beside the target and renamed: a failed conversion leaves no half folder.
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            try:
                _convert_single_file(entry, partial, str(target))
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            if target.exists():
                target.rmdir()  # empty, checked above
            partial.rename(target)
        elif _is_hub_id(entry.source):
            what = f"downloaded {entry.source}"
            _download(entry.source, target)  # resumable: files already there are kept
        else:
            print(f"model {args.model_id}: {entry.source} is a local folder already; nothing to "
                  "fetch")  # fmt: skip
            return 0
        if not args.keep_registry:
            header, data = _read_raw(path)
            fields = {**data["models"][args.model_id], "source": str(target)}
            fields.pop("config", None)
            data["models"][args.model_id] = fields
            write_atomically(path, header, data)
    except _Usage as exc:
        return _fail(exc)
    except Exception as exc:  # diffusers or the hub: say what failed, without a traceback
        print(f"dreamq: fetching model {args.model_id} failed: {_first_line(exc)}", file=sys.stderr)
        if _hub_offline():
            print("HF_HUB_OFFLINE is set: only what the local hub cache holds can be used",
                  file=sys.stderr)  # fmt: skip
        return 1
    print(f"{what} into {target}")
    if not args.keep_registry:
        print(f"model {args.model_id} now loads from {target}; {RESTART_NOTE}")
    return 0


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- the parser --------------------------------------------------------------------------------


def add_models_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="the model registry, and which workers hold what")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser(
        "list",
        help="every registry model: family, kind, source, the worker processes holding it warm "
        "and its last measured load time",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.set_defaults(func=cmd_models_list)

    add = models_sub.add_parser(
        "add", help=f"add a model to the registry file (atomic rewrite); {RESTART_NOTE}"
    )
    add.add_argument("model_id")
    add.add_argument("source", help="a diffusers folder, a .safetensors/.ckpt file or a hub id")
    add.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    add.add_argument("--kind", choices=["image", "inpaint", "text2video"], default="image")
    add.add_argument(
        "--single-file",
        action="store_true",
        help="the source is one checkpoint file: refused unless it ends in .safetensors or "
        ".ckpt (the registry tells a single file by that suffix)",
    )
    add.add_argument(
        "--config", help="for a single file: a diffusers folder (or hub id) giving the architecture"
    )
    add.set_defaults(func=cmd_models_add)

    remove = models_sub.add_parser(
        "remove", help=f"remove a model from the registry file (atomic rewrite); {RESTART_NOTE}"
    )
    remove.add_argument("model_id")
    remove.set_defaults(func=cmd_models_remove)

    warm = models_sub.add_parser(
        "warm",
        help="ask every generation worker process to load a model now (what model_reload does); "
        "prints how many processes heard it",
    )
    warm.add_argument("model_id")
    warm.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="then wait until a worker process holds it; exit 1 if none does in time",
    )
    warm.set_defaults(func=cmd_models_warm)

    fetch = models_sub.add_parser(
        "fetch",
        aliases=["download"],
        help="make a registry model a local diffusers folder, with progress bars: download a "
        "hub id (huggingface_hub), or convert a .safetensors/.ckpt file (from_single_file, then "
        "save_pretrained); then point the registry entry at it. Needs the worker install",
    )
    fetch.add_argument("model_id")
    fetch.add_argument("--to", help="the folder to write (default: <registry folder>/<model_id>)")
    fetch.add_argument(
        "--keep-registry", action="store_true", help="leave the registry entry as it is"
    )
    fetch.set_defaults(func=cmd_models_fetch)
