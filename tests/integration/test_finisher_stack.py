"""The finisher against real processes: a job's upload runs after its task has returned, beside
the next job's compute; a pool process killed while a job was still being stored loses that job
for no longer than its own restart (workers/finisher.py, workers/supervision.py).

The object store is a stub S3 server on loopback whose first object upload hangs until the test
lets it go: that holds a finished job in the finisher for as long as the test needs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from storage import keys
from tests.support.processes import JobEvents
from tests.support.profile import QUICK, SLOW, ProfileFactory, processing, terminal_events

pytestmark = pytest.mark.integration

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class StallingS3:
    """Answers what a worker asks of S3: no lifecycle rules yet, a rule added, objects put. The
    first object upload is held (never answered) until `release` is set."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.uploads: list[str] = []
        self.stalled = threading.Event()
        self.release = threading.Event()


@contextmanager
def stalling_s3() -> Iterator[StallingS3]:
    state = StallingS3("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # botocore sends Expect: 100-continue

        def log_message(self, format: str, *args: object) -> None:
            pass

        def answer(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("ETag", '"0"')
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            code = b"NoSuchLifecycleConfiguration" if "lifecycle" in self.path else b"NoSuchKey"
            self.answer(404, b"<Error><Code>" + code + b"</Code></Error>")

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if "lifecycle" not in self.path:
                state.uploads.append(self.path)
                if len(state.uploads) == 1:
                    state.stalled.set()
                    state.release.wait(120)
                    return  # never answered: the process that asked is gone by then
            self.answer(200)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def test_a_pool_process_killed_while_a_finished_job_was_stored_runs_that_job_again(
    profile_factory: ProfileFactory,
) -> None:
    with stalling_s3() as s3:
        profile = profile_factory(storage_url="s3://outputs", s3_endpoint_url=s3.url)
        events = JobEvents(profile.redis.client())
        with profile.worker(env=CREDENTIALS) as worker:
            stored = profile.submit(webhook=True, **QUICK)
            assert s3.stalled.wait(120)  # its upload hangs on the finisher's thread
            running = profile.submit(**SLOW)
            # One pool process: the second job runs, so the first one's task has returned (and
            # its message was acked) while its outputs are still being stored.
            child = processing(worker, running, attempt=1)
            job = profile.job(stored)
            assert job.status.value == "processing"
            assert profile.redis.client().exists(keys.job_lease(stored))  # still held
            os.kill(child, signal.SIGKILL)
            killed = time.monotonic()
            s3.release.set()  # uploads succeed from now on
            assert events.wait_for(stored, timeout=120) == "success"
            print(f"\nkill -9 while storing -> success in {time.monotonic() - killed:.1f} s")
            assert events.wait_for(running, timeout=120) == "success"
            worker.wait_for(
                rf"job {stored}: its worker process {child} died; the job is delivered again",
                timeout=5,
            )
            assert processing(worker, stored, attempt=2, timeout=5) != child
    assert (profile.job(stored).attempts, profile.job(running).attempts) == (2, 2)
    assert terminal_events(events, stored) == [f"{stored} success"]
    assert terminal_events(events, running) == [f"{running} success"]
    assert profile.webhooks_queued() == 1  # the stored job's, handed off once
    events.close()
