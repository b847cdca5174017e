"""The webhook dispatcher (workers/webhooks.py) with a scripted sender, fakeredis and a fake clock:
signing, the retry schedule, Retry-After, 410, redirects, timeouts, duplicates and replay. Then the
real sender against raw servers on loopback: the outbound guard at connect time, no redirects,
one deadline, a capped answer (R14, R16-R18)."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from dreamq.outbound import BlockedUrl
from dreamq.settings import Settings, parse_retry_schedule
from dreamq.signing import new_secret
from storage.apikeys import ApiKeyStore
from storage.jobs import JobStore, WebhookStatus
from tests.support.jobs import new_job
from tests.support.ssrf import (
    R16_ADDRESS_URLS,
    R16_ADDRESSES,
    R16_NAME_URLS,
    R16_SCHEME_URLS,
    Answers,
    refuse_connections,
)
from tests.support.tcp import Handler, listener, read_request, tcp_server
from workers.webhooks import (
    Delivery,
    HttpWebhookSender,
    Outcome,
    Response,
    RetryPolicy,
    WebhookDispatcher,
    dispatcher_from_settings,
    parse_retry_after,
)

START = 1_700_000_000.0
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
HOOK = "http://127.0.0.1:9/hook"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class ScriptedSender:
    """Answers each POST with the next scripted response (or raises the scripted error)."""

    def __init__(self, *script: Response | Exception) -> None:
        self.script = list(script)
        self.sent: list[Delivery] = []

    def send(self, delivery: Delivery) -> Response:
        self.sent.append(delivery)
        step = self.script.pop(0) if self.script else Response(200)
        if isinstance(step, Exception):
            raise step
        return step


class Scheduled:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float]] = []

    def __call__(self, job_id: int, attempt: int, due_at: float) -> None:
        self.calls.append((job_id, attempt, due_at))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jobs(client: redis.Redis, clock: Clock) -> JobStore:
    return JobStore(client, ttl_seconds=3600, clock=clock)


@pytest.fixture
def api_keys(client: redis.Redis) -> ApiKeyStore:
    return ApiKeyStore(client)


@pytest.fixture
def owner(api_keys: ApiKeyStore) -> str:
    return api_keys.create("tenant")[1].id


def finished_job(jobs: JobStore, owner: str, webhook: str | None = HOOK) -> int:
    job_id = jobs.create(
        new_job(
            owner=owner,
            meta={"prompt": "a fox"},
            file_prefix="abc",
            future_links=["https://out.test/abc-0.png"],
            webhook=webhook,
            track_id="order-1",
        )
    )
    assert jobs.claim(job_id) is not None
    assert jobs.succeed(job_id, output=["https://out.test/abc-0.png"], generation_time=0.5)
    return job_id


def dispatcher(
    jobs: JobStore,
    api_keys: ApiKeyStore,
    clock: Clock,
    sender: ScriptedSender,
    schedule: Scheduled | None = None,
    delays: tuple[float, ...] = (10.0, 100.0),
) -> WebhookDispatcher:
    def secrets(owner: str, now: float) -> list[str]:
        found = api_keys.webhook_secrets(owner)
        return found.signing(now) if found else []

    return WebhookDispatcher(
        jobs=jobs,
        sender=sender,
        policy=RetryPolicy(delays, uniform=lambda low, high: 1.0),
        secrets=secrets,
        schedule=schedule or Scheduled(),
        allow=LOOPBACK,
        clock=clock,
    )


def signed_by(secret: str, delivery: Delivery) -> bool:
    """The reference library's signature (the fake clock's timestamps are too old for `verify`,
    which tests/unit/test_signing.py exercises) is among the delivery's."""
    headers = delivery.headers
    when = datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=UTC)
    expected = Webhook(secret).sign(headers["webhook-id"], when, delivery.body.decode())
    return expected in headers["webhook-signature"].split(" ")


def run_schedule(hooks: WebhookDispatcher, clock: Clock, schedule: Scheduled) -> list[Outcome]:
    """Play the scheduled messages in order, moving the clock to each due time."""
    outcomes = []
    while schedule.calls:
        job_id, attempt, due_at = schedule.calls.pop(0)
        clock.now = max(clock.now, due_at)
        outcome = hooks.handle(job_id, attempt, due_at)
        assert outcome is not None
        outcomes.append(outcome)
    return outcomes


def test_500_then_200_sends_attempt_2_with_the_same_id_and_a_valid_signature(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    sender, schedule = ScriptedSender(Response(500), Response(200)), Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, sender, schedule)

    first = hooks.handle(job_id)
    assert first is not None and first.status is WebhookStatus.PENDING
    assert schedule.calls == [(job_id, 2, START + 10.0)]
    assert jobs.get(job_id).webhook_status is WebhookStatus.PENDING  # type: ignore[union-attr]
    assert run_schedule(hooks, clock, schedule)[-1].status is WebhookStatus.SENT

    ids = [d.headers["webhook-id"] for d in sender.sent]
    assert ids == [f"msg_{job_id}_success"] * 2
    stamps = [d.headers["webhook-timestamp"] for d in sender.sent]
    assert stamps == [str(int(START)), str(int(START + 10))]
    secret = api_keys.webhook_secrets(owner).primary  # type: ignore[union-attr]
    for delivery in sender.sent:
        assert signed_by(secret, delivery)
        assert json.loads(delivery.body)["track_id"] == "order-1"
    assert jobs.get(job_id).webhook_status is WebhookStatus.SENT  # type: ignore[union-attr]
    attempts = jobs.webhook_attempts(job_id)
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]
    assert attempts[0]["at"] == START and attempts[0]["next_at"] == START + 10
    assert all(a["duration"] >= 0 and a["webhook_id"] == ids[0] for a in attempts)


def test_always_failing_ends_failed_after_the_schedule(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    sender, schedule = ScriptedSender(*[Response(500)] * 10), Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, sender, schedule, delays=(1.0, 2.0, 3.0))
    hooks.handle(job_id)
    outcomes = run_schedule(hooks, clock, schedule)
    assert [o.status for o in outcomes] == [WebhookStatus.PENDING] * 2 + [WebhookStatus.FAILED]
    assert len(sender.sent) == 4
    assert jobs.get(job_id).webhook_status is WebhookStatus.FAILED  # type: ignore[union-attr]
    assert [a["attempt"] for a in jobs.webhook_attempts(job_id)] == [1, 2, 3, 4]


def test_410_stops_retries(jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock) -> None:
    job_id = finished_job(jobs, owner)
    schedule = Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, ScriptedSender(Response(410)), schedule)
    outcome = hooks.handle(job_id)
    assert outcome is not None and outcome.status is WebhookStatus.FAILED
    assert schedule.calls == []
    assert jobs.get(job_id).webhook_status is WebhookStatus.FAILED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("7", 7.0), ("100000", 100.0), (None, 10.0), ("soon", 10.0)],
)
@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured_and_bounded(
    jobs: JobStore,
    api_keys: ApiKeyStore,
    owner: str,
    clock: Clock,
    code: int,
    retry_after: str | None,
    expected: float,
) -> None:
    job_id = finished_job(jobs, owner)
    schedule = Scheduled()
    sender = ScriptedSender(Response(code, retry_after))
    dispatcher(jobs, api_keys, clock, sender, schedule).handle(job_id)
    # Bounded by the schedule's longest wait (100 s here); unreadable: the schedule's wait.
    assert schedule.calls == [(job_id, 2, START + expected)]


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after("", 0) is None


@pytest.mark.parametrize(
    "failure",
    [
        Response(302),
        Response(301),
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        Response(404),
    ],
)
def test_redirects_timeouts_and_errors_are_failed_attempts(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock, failure: Any
) -> None:
    job_id = finished_job(jobs, owner)
    schedule = Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, ScriptedSender(failure), schedule)
    outcome = hooks.handle(job_id)
    assert outcome is not None and outcome.status is WebhookStatus.PENDING
    assert schedule.calls == [(job_id, 2, START + 10.0)]
    attempt = jobs.webhook_attempts(job_id)[0]
    if isinstance(failure, Response):
        assert attempt["status_code"] == failure.status
    else:
        assert attempt["status_code"] is None
        expected = "timeout" if isinstance(failure, httpx.TimeoutException) else "ConnectError"
        assert attempt["error"] == expected


def test_a_refused_url_is_a_failed_attempt(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner, webhook="http://10.0.0.1/hook")
    sender = ScriptedSender()
    outcome = dispatcher(jobs, api_keys, clock, sender).handle(job_id)
    assert outcome is not None and outcome.status is WebhookStatus.PENDING
    assert sender.sent == []
    assert jobs.webhook_attempts(job_id)[0]["error"].startswith("refused")


def test_an_early_message_is_republished_not_attempted(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    sender, schedule = ScriptedSender(), Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, sender, schedule)
    assert hooks.handle(job_id, 1, START + 500) is None
    assert schedule.calls == [(job_id, 1, START + 500)]
    assert sender.sent == []


def test_a_duplicate_message_sends_once(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    sender = ScriptedSender(Response(200), Response(200))
    hooks = dispatcher(jobs, api_keys, clock, sender)
    assert hooks.handle(job_id) is not None
    assert hooks.handle(job_id) is None
    assert len(sender.sent) == 1


def test_an_attempt_whose_dispatcher_died_is_retried_after_the_lease(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    # The first dispatcher claimed attempt 1 and was killed before recording it.
    assert jobs.claim_webhook_attempt(job_id, 1, lease_seconds=70)
    sender, schedule = ScriptedSender(Response(200)), Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, sender, schedule)
    # Its message is back while the claim is live (RabbitMQ requeues at once): not sent, and not
    # dropped either: it looks again once the claim (the dispatcher's lease, 70 s) has lapsed.
    outcome = hooks.handle(job_id)
    assert outcome is not None and outcome.again and sender.sent == []
    assert schedule.calls == [(job_id, 1, START + 71)]
    assert run_schedule(hooks, clock, schedule)[-1].status is WebhookStatus.SENT
    assert len(sender.sent) == 1
    assert [a["attempt"] for a in jobs.webhook_attempts(job_id)] == [1]


def test_a_copy_that_looked_again_is_dropped_when_the_attempt_was_made(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    assert jobs.claim_webhook_attempt(job_id, 1, lease_seconds=70)  # in flight elsewhere
    sender, schedule = ScriptedSender(), Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, sender, schedule)
    hooks.handle(job_id)  # a duplicate message: looks again later
    ((_, attempt, due_at),) = schedule.calls
    # Meanwhile the dispatcher holding the claim made the attempt.
    made = {
        "attempt": 1,
        "at": clock.now,
        "webhook_id": f"msg_{job_id}_success",
        "status_code": 200,
    }
    assert jobs.record_webhook_attempt(job_id, made, WebhookStatus.SENT)
    clock.now = due_at
    schedule.calls.clear()
    assert hooks.handle(job_id, attempt, due_at) is None
    assert sender.sent == [] and schedule.calls == []


def test_a_lost_next_attempt_is_rescheduled_by_the_redelivered_message(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    lost = Scheduled()  # the dispatcher died after recording attempt 1, before publishing 2
    dispatcher(jobs, api_keys, clock, ScriptedSender(Response(500)), lost).handle(job_id)
    clock.now += 3600
    schedule = Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, ScriptedSender(Response(200)), schedule)
    hooks.handle(job_id)  # attempt 1 again: redelivered after the visibility timeout
    assert schedule.calls == [(job_id, 2, clock.now)]
    assert run_schedule(hooks, clock, schedule)[-1].status is WebhookStatus.SENT


def test_rotation_signs_with_both_secrets_for_the_window(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    old = api_keys.webhook_secrets(owner).primary  # type: ignore[union-attr]
    rotated = api_keys.rotate_webhook_secret(owner, window_seconds=600, now=START)
    assert rotated is not None and rotated.previous == old and rotated.primary != old
    assert rotated.signing(START + 599) == [rotated.primary, old]
    assert rotated.signing(START + 600) == [rotated.primary]

    job_id = finished_job(jobs, owner)
    sender = ScriptedSender(Response(200))
    dispatcher(jobs, api_keys, clock, sender).handle(job_id)
    delivery = sender.sent[0]
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2
    assert signed_by(old, delivery) and signed_by(rotated.primary, delivery)


def test_replay_resends_with_the_same_id_and_is_recorded(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    job_id = finished_job(jobs, owner)
    sender, schedule = ScriptedSender(Response(500), Response(200)), Scheduled()
    hooks = dispatcher(jobs, api_keys, clock, sender, schedule, delays=())
    assert hooks.handle(job_id).status is WebhookStatus.FAILED  # type: ignore[union-attr]
    clock.now += 60
    replayed = hooks.replay(job_id)
    assert replayed is not None and replayed.status is WebhookStatus.SENT
    assert [d.headers["webhook-id"] for d in sender.sent] == [f"msg_{job_id}_success"] * 2
    assert sender.sent[1].headers["webhook-timestamp"] == str(int(START + 60))
    attempts = jobs.webhook_attempts(job_id)
    assert [(a["attempt"], a.get("replay")) for a in attempts] == [(1, None), (2, True)]
    assert jobs.get(job_id).webhook_status is WebhookStatus.SENT  # type: ignore[union-attr]


def test_nothing_to_deliver(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    sender = ScriptedSender()
    hooks = dispatcher(jobs, api_keys, clock, sender)
    assert hooks.handle(finished_job(jobs, owner, webhook=None)) is None
    assert hooks.handle(10**6) is None
    assert hooks.replay(10**6) is None
    assert sender.sent == []


def test_retry_policy_jitter_and_end() -> None:
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return high

    policy = RetryPolicy((5.0, 300.0), uniform=uniform)
    assert policy.next_delay(1) == 6.0
    assert policy.next_delay(2) == 360.0
    assert policy.next_delay(3) is None
    assert calls == [(0.8, 1.2)] * 2


def test_retry_schedule_setting() -> None:
    default = Settings().webhook_retry_delays
    assert sum(default) >= 24 * 3600
    assert parse_retry_schedule("0.2, 0.2") == (0.2, 0.2)
    assert parse_retry_schedule("") == ()
    for bad in ("5,soon", "-1", "inf"):
        with pytest.raises(ValueError):
            parse_retry_schedule(bad)
    with pytest.raises(ValueError):
        Settings(webhook_retry_schedule="5,x")
    with pytest.raises(ValueError):
        Settings(dev_webhook_secret="not-a-secret")
    Settings(dev_webhook_secret=new_secret())


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("DREAMQ_WEBHOOK_RETRY_SCHEDULE", "DREAMQ_DEV_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    yield


# --- the real sender: pinned connections, no redirects, one deadline (R14, R16-R18) -------------


def answer(status: int, extra: bytes = b"") -> Handler:
    """A receiver that records each request and answers `status` with an empty body."""

    def handle(connection: socket.socket, stop: threading.Event) -> None:
        read_request(connection)
        connection.sendall(
            b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n%s\r\n" % (status, extra)
        )

    return handle


def delivery(url: str) -> Delivery:
    return Delivery(url, b'{"status":"success"}', {"content-type": "application/json"})


@pytest.mark.parametrize("address", R16_ADDRESSES)
def test_r16_a_name_resolving_to_an_internal_address_is_refused_without_connecting(
    jobs: JobStore,
    api_keys: ApiKeyStore,
    owner: str,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    address: str,
) -> None:
    attempts = refuse_connections(monkeypatch)
    with listener() as target:
        job_id = finished_job(jobs, owner, webhook=f"http://hooks.test:{target.port}/hook")
        hooks = WebhookDispatcher(
            jobs=jobs,
            sender=HttpWebhookSender(5.0, [], resolve=Answers([address])),
            schedule=Scheduled(),
        )
        outcome = hooks.handle(job_id)
        assert not target.reached()
    assert attempts == []
    assert outcome is not None and outcome.record is not None
    assert outcome.record["error"] == "refused: the host resolves to a non-public address"


@pytest.mark.parametrize("url", R16_ADDRESS_URLS + R16_NAME_URLS + R16_SCHEME_URLS)
def test_r16_every_internal_target_is_refused_before_any_lookup(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock, url: str
) -> None:
    job_id = finished_job(jobs, owner, webhook=url)
    sender = ScriptedSender()
    hooks = WebhookDispatcher(jobs=jobs, sender=sender, schedule=Scheduled())
    outcome = hooks.handle(job_id)
    assert sender.sent == []
    assert outcome is not None and outcome.record is not None
    assert outcome.record["error"].startswith("refused: ")


def test_r17_the_post_goes_to_the_address_it_validated() -> None:
    # Allowed first, the metadata address on any later lookup; rebind.test exists for no system
    # resolver, so a second lookup by httpx would have failed the POST.
    resolve = Answers(["127.0.0.1"], ["169.254.169.254"])
    with tcp_server(answer(204)) as receiver:
        sender = HttpWebhookSender(5.0, LOOPBACK, resolve=resolve)
        assert sender.send(delivery(f"http://rebind.test:{receiver.port}/hook")).status == 204
        sender.close()
    assert resolve.calls == [("rebind.test", receiver.port)]
    assert receiver.connections == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_r14_a_redirect_is_never_followed(status: int) -> None:
    with (
        listener() as target,
        tcp_server(answer(status, b"Location: http://169.254.169.254/\r\n")) as receiver,
        tcp_server(
            answer(status, f"Location: http://127.0.0.1:{target.port}/\r\n".encode())
        ) as to_loopback,
    ):
        sender = HttpWebhookSender(5.0, LOOPBACK)
        for server in (receiver, to_loopback):
            assert sender.send(delivery(f"http://127.0.0.1:{server.port}/hook")).status == status
            assert server.connections == 1
        sender.close()
        assert not target.reached()


def dribble(interval: float) -> Handler:
    """A receiver that reads the POST, then sends its status line and headers a byte at a time."""

    def handle(connection: socket.socket, stop: threading.Event) -> None:
        read_request(connection)
        for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10_000:
            connection.sendall(bytes([byte]))
            if stop.wait(interval):
                return

    return handle


def test_r18_a_receiver_dribbling_its_answer_is_cut_at_the_total_deadline() -> None:
    # Each byte comes well within the read timeout: only the total deadline ends this.
    with tcp_server(dribble(0.02)) as receiver:
        sender = HttpWebhookSender(0.5, LOOPBACK)
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            sender.send(delivery(f"http://127.0.0.1:{receiver.port}/hook"))
        elapsed = time.monotonic() - started
        sender.close()
    assert 0.5 <= elapsed < 1.5


def test_r18_a_dribbling_receiver_is_a_timed_out_attempt(
    jobs: JobStore, api_keys: ApiKeyStore, owner: str, clock: Clock
) -> None:
    with tcp_server(dribble(0.02)) as receiver:
        job_id = finished_job(jobs, owner, webhook=f"http://127.0.0.1:{receiver.port}/hook")
        hooks = WebhookDispatcher(
            jobs=jobs,
            sender=HttpWebhookSender(0.3, LOOPBACK),
            schedule=Scheduled(),
            allow=LOOPBACK,
        )
        outcome = hooks.handle(job_id)
    assert outcome is not None and outcome.record is not None
    assert (outcome.record["status_code"], outcome.record["error"]) == (None, "timeout")


def test_r18_a_huge_answer_is_not_read() -> None:
    finished = threading.Event()
    written: list[int] = []

    def huge(connection: socket.socket, stop: threading.Event) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
        chunk, sent = bytes(64 * 1024), 0
        try:
            while sent < 1024 * 1024 * 1024 and not stop.is_set():
                connection.sendall(chunk)
                sent += len(chunk)
        finally:
            written.append(sent)
            finished.set()

    with tcp_server(huge) as receiver:
        sender = HttpWebhookSender(5.0, LOOPBACK)
        started = time.monotonic()
        assert sender.send(delivery(f"http://127.0.0.1:{receiver.port}/hook")).status == 200
        elapsed = time.monotonic() - started
        sender.close()
        # The sender hung up: the receiver's next writes fail.
        assert finished.wait(5)
    assert elapsed < 1.0
    assert written[0] < 64 * 1024 * 1024  # what loopback socket buffers absorb, not 1 GB


def test_the_dispatcher_from_settings_gives_the_sender_its_allow_list(
    client: redis.Redis, jobs: JobStore, owner: str
) -> None:
    # 127.0.0.1 passes the early check only with loopback allowed; the POST then connects only
    # if the sender's pinned transport got the same allow-list.
    with tcp_server(answer(200)) as receiver:
        job_id = finished_job(jobs, owner, webhook=f"http://127.0.0.1:{receiver.port}/hook")
        settings = Settings(outbound_allow_cidrs="127.0.0.0/8", webhook_retry_schedule="")
        outcome = dispatcher_from_settings(settings, client, jobs).deliver(job_id)
    assert outcome is not None and outcome.status is WebhookStatus.SENT
    assert receiver.connections == 1


def test_the_pinned_sender_refuses_loopback_it_was_not_allowed() -> None:
    with listener() as target:
        sender = HttpWebhookSender(5.0, [])
        with pytest.raises(BlockedUrl):
            sender.send(delivery(f"http://127.0.0.1:{target.port}/hook"))
        sender.close()
        assert not target.reached()
