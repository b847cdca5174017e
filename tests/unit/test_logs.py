"""JSON log lines: the bound job fields, the key's name and never the key."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dreamq import logs
from tests.unit.test_api import build, txt2img


class Lines(logging.Handler):
    """Formats at emit time, in the thread that logs (where its context is)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("dreamq")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_line_is_one_json_object_with_the_bound_fields(lines: Lines) -> None:
    log = logging.getLogger("dreamq.worker")
    log.info("before")
    with logs.bound(job_id=41, model_id="demo", key_name="tenant-a"):
        log.info("job %s: processing", 41)
        with logs.bound(model_id="other"):
            log.warning("inner")
    log.info("after")
    before, processing, inner, after = lines.objects()
    assert set(before) == {"ts", "level", "logger", "message", "pid"}
    assert processing["message"] == "job 41: processing"
    assert (processing["level"], processing["logger"]) == ("INFO", "dreamq.worker")
    assert processing["ts"].endswith("Z")
    assert (processing["job_id"], processing["model_id"], processing["key_name"]) == (
        41,
        "demo",
        "tenant-a",
    )
    assert (inner["job_id"], inner["model_id"]) == (41, "other")
    assert "job_id" not in after and "model_id" not in after
    assert all("\n" not in line for line in lines.lines)


def test_unknown_and_empty_fields(lines: Lines) -> None:
    with pytest.raises(ValueError, match="unknown log fields"), logs.bound(key="dq_secret"):
        pass
    with logs.bound(job_id=1, key_name="", model_id=None):
        logging.getLogger("dreamq.x").info("x", extra={"model_id": "from-extra"})
    (line,) = lines.objects()
    assert line["job_id"] == 1 and line["model_id"] == "from-extra"
    assert "key_name" not in line


def test_exc_info_is_text_in_the_object(lines: Lines) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("dreamq.worker").exception("job 3: failed")
    (line,) = lines.objects()
    assert "RuntimeError: boom" in line["exc_info"]
    assert "Traceback" in line["exc_info"]


def test_threads_see_only_their_own_fields(lines: Lines) -> None:
    """The dispatcher delivers in pool threads: one delivery's fields never reach another's."""
    inside, release = threading.Event(), threading.Event()

    def deliver() -> None:
        with logs.bound(job_id=7):
            inside.set()
            release.wait(10)
            logging.getLogger("dreamq.worker").info("in thread")

    thread = threading.Thread(target=deliver)
    thread.start()
    assert inside.wait(10)
    logging.getLogger("dreamq.worker").info("main thread")
    release.set()
    thread.join(10)
    by_message = {line["message"]: line for line in lines.objects()}
    assert "job_id" not in by_message["main thread"]
    assert by_message["in thread"]["job_id"] == 7


def test_api_lines_carry_the_key_name_never_the_key(lines: Lines) -> None:
    with build() as api:
        api.publisher.fail_with = ConnectionError("broker down")
        response = txt2img(api)
        assert response.status_code == 503
        failed = [line for line in lines.objects() if "publishing job" in line["message"]]
        assert failed and failed[0]["key_name"] == "a"
        assert "ConnectionError: broker down" in failed[0]["exc_info"]
        assert all(api.key not in line for line in lines.lines)
        # The next request, before its key is known, carries no name from the last one.
        api.publisher.fail_with = None
        api.client.post("/api/v4/dreambooth/fetch/1", json={"key": "dq_unknown"})
        assert all(api.key not in line for line in lines.lines)


def test_configure_json_replaces_the_root_handler() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        logs.configure("WARNING", "json")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, logs.JsonFormatter)
        assert root.level == logging.WARNING
        logs.configure("INFO", "text")
        (handler,) = root.handlers
        assert handler.formatter is not None and handler.formatter._fmt == logs.TEXT_FORMAT
    finally:
        root.handlers = saved
        root.setLevel(level)
