"""Lost broker messages (R5) and a Redis crash with AOF (R6), against real processes.

R5 runs the broker on a redis-server of its own without persistence, apart from the job records
(the session's redis-server): restarting the broker loses every message, the records stay, and
the reconciler in the real `dreamq dispatcher` publishes again what nothing would run.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from storage import keys
from storage.apikeys import ApiKeyStore
from tests.support.processes import JobEvents, restartable, webhook_receiver
from tests.support.profile import QUICK, SLOW, ProfileFactory, processing

pytestmark = pytest.mark.integration

PERIOD = 1.0
"""The reconciler's period in these tests (default 30 s)."""


def fetch_status(api: TestClient, key: str, job_id: int) -> str:
    response = api.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": key})
    status: str = response.json()["status"]
    return status


def test_r5_broker_restart_without_persistence_every_accepted_job_is_redriven(
    profile_factory: ProfileFactory, tmp_path: Path
) -> None:
    with restartable(tmp_path / "broker") as broker, webhook_receiver() as receiver:
        receiver.script = [500]  # the first attempt fails: attempt 2 waits in the broker
        profile = profile_factory(
            broker_url=broker.url, reconcile_seconds=PERIOD, webhook_retry_schedule="4"
        )
        events = JobEvents(profile.redis.client())
        with profile.worker() as worker, profile.dispatcher() as dispatcher:
            hooked = profile.submit(webhook=receiver.url, **QUICK)
            assert events.wait_for(hooked, timeout=60) == "success"
            first = receiver.next(timeout=30)
            # The retry must be in the broker when it dies: the dispatcher has logged attempt 1
            # and received its retry's message (a retry published while the broker is down is
            # sent once it is back, and then nothing is lost for the reconciler to find).
            pending = rf"job {hooked}: webhook attempt 1: 500 -> pending"
            dispatcher.wait_for(pending, timeout=30)
            after = next(i for i, line in enumerate(dispatcher.lines) if re.search(pending, line))
            dispatcher.wait_for(r"deliver_webhook\[[^\]]+\] received", timeout=30, start=after)
            running = profile.submit(**SLOW)
            processing(worker, running, attempt=1)
            queued = [profile.submit(**QUICK) for _ in range(3)]

            broker.kill()  # every message goes: the queued jobs and the held webhook retry
            broker.start()
            restarted = time.monotonic()
            # Nothing accepted is unknown: the records live apart from the broker.
            for job_id in (hooked, running, *queued):
                assert fetch_status(profile.api, profile.key, job_id) in ("processing", "success")

            assert events.wait_for(running, timeout=60) == "success"
            try:
                for job_id in queued:
                    assert events.wait_for(job_id, timeout=60) == "success"
            except TimeoutError:
                print("WORKER", worker.tail(60), "DISPATCHER", dispatcher.tail(60), sep="\n")
                raise
            jobs_back = time.monotonic() - restarted
            second = receiver.next(timeout=30)
            webhook_back = time.monotonic() - restarted
            print(
                f"\nR5: broker restart without persistence -> every queued job done in "
                f"{jobs_back:.1f} s, the lost webhook retry delivered in {webhook_back:.1f} s "
                f"(reconciler period {PERIOD:g} s)"
            )
            for job_id in queued:
                dispatcher.wait_for(rf"job {job_id}: its broker message was lost", timeout=5)
            dispatcher.wait_for(rf"job {hooked}: webhook attempt 2 had no message", timeout=5)

        for job_id in queued:
            job = profile.job(job_id)
            assert (job.status.value, job.attempts) == ("success", 1)  # ran once, when re-driven
        job = profile.job(running)
        assert (job.status.value, job.attempts) == ("success", 1)  # finished by its worker
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert receiver.received.empty()  # one delivery, no duplicate
        secret = ApiKeyStore(profile.redis.client()).webhook_secrets(profile.job(hooked).owner)
        assert secret is not None
        Webhook(secret.primary).verify(second.body, second.headers)
        assert profile.job(hooked).webhook_status.value == "sent"
        events.close()


def test_r6_redis_killed_under_load_with_aof_keeps_every_job_acknowledged_2s_before(
    profile_factory: ProfileFactory, tmp_path: Path
) -> None:
    """One Redis for records and broker, AOF with fsync every second (compose's setting)."""
    with restartable(tmp_path / "aof", appendonly=True) as server:
        profile = profile_factory(
            redis_url=server.url, broker_url=server.url, reconcile_seconds=PERIOD
        )
        key, _ = ApiKeyStore(server.server.client()).create("aof")  # type: ignore[union-attr]
        acked: list[tuple[int, float]] = []
        changed = threading.Condition()
        stop = threading.Event()

        def submit_until_stopped() -> None:
            body = {"key": key, "model_id": "demo", "prompt": "a fox", **QUICK}
            while not stop.is_set():
                try:
                    response = profile.api.post("/api/v4/dreambooth", json=body)
                except Exception:
                    continue  # Redis is down: the client would retry
                if response.status_code == 200:
                    with changed:
                        acked.append((response.json()["id"], time.monotonic()))
                        changed.notify_all()

        def enough() -> bool:  # under load for 3 s, 40 jobs at least
            return len(acked) >= 40 and acked[-1][1] - acked[0][1] >= 3

        with profile.worker() as worker, profile.dispatcher():
            load = threading.Thread(target=submit_until_stopped, daemon=True)
            load.start()
            with changed:
                assert changed.wait_for(enough, timeout=60), "the API did not accept jobs"
            server.kill()
            crashed = time.monotonic()
            stop.set()
            load.join(timeout=30)
            resumed = len(worker.lines)
            server.start()
            client = server.server.client()  # type: ignore[union-attr]
            durable = [job_id for job_id, at in acked if at < crashed - 2]
            lost_tail = [job_id for job_id, at in acked if at >= crashed - 2]
            assert durable, "no job was acknowledged 2 s before the crash"
            missing = [job_id for job_id in durable if not client.exists(keys.job(job_id))]
            print(
                f"\nR6: kill -9 of Redis with AOF: {len(durable)} jobs acknowledged >2 s before "
                f"the crash, {len(missing)} missing; {len(lost_tail)} acknowledged in the last 2 s"
            )
            assert missing == []
            # The worker outlived the crash and works on: a job succeeds after the restart.
            worker.wait_for(r"job \d+: success", timeout=60, start=resumed)
