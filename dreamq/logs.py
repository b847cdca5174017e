"""Logging: today's text lines, or one JSON object a line, with the job a line belongs to.

`bound(job_id=..., model_id=..., key_name=...)` binds fields for the code it wraps (a job in the
runner, a webhook delivery in the dispatcher); `bind(...)` sets them for the rest of the current
context (an API request after authentication: each request runs in a context of its own). The
fields live in a contextvar, so a worker thread or an asyncio task sees only its own. The JSON
formatter writes them on every line logged meanwhile; `extra={"job_id": ...}` on one call wins.

Only the key's NAME is ever bound, never the key: nothing here can see a request body.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Literal

FIELDS = ("job_id", "model_id", "key_name")
"""The context fields a line carries when they are known."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"

_NOTHING: Mapping[str, Any] = MappingProxyType({})
_bound: ContextVar[Mapping[str, Any]] = ContextVar("dreamq_log_fields", default=_NOTHING)


def _known(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; expected {FIELDS}")
    return {name: value for name, value in fields.items() if value not in (None, "")}


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Bind `fields` (None or '' leaves one out) for the code inside, then restore."""
    token = _bound.set({**_bound.get(), **_known(fields)})
    try:
        yield
    finally:
        _bound.reset(token)


def bind(**fields: Any) -> None:
    """Bind `fields` for the rest of the current context (an asyncio task copies it)."""
    _bound.set({**_bound.get(), **_known(fields)})


def clear() -> None:
    """Forget every bound field in the current context (a new request starts clean)."""
    _bound.set(_NOTHING)


def bound_fields() -> dict[str, Any]:
    return dict(_bound.get())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, pid, the bound fields, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name, value in _bound.get().items():
            entry[name] = value
        for name in FIELDS:  # extra={...} on the call itself
            value = record.__dict__.get(name)
            if value not in (None, ""):
                entry[name] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """The root logger of a dreamq process: one stderr handler in the chosen format. Celery
    workers keep it (workers/app.py stops Celery from configuring logging)."""
    handler = logging.StreamHandler(sys.stderr)
    json_lines = fmt == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if json_lines:
        # uvicorn's loggers bring their own text handlers; route them through the root instead.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers = []
            uvicorn_logger.propagate = True
