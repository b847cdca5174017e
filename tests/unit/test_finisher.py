"""The finisher on its own: tails run on one background thread, one at a time, with the
submitter's log context; a stuck tail is abandoned after the deadline; close drains; a soft time
limit (a signal) interrupts a submit that waits."""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
from collections.abc import Iterator

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from workers.finisher import InlineFinisher, ThreadFinisher

LONG = 10.0  # a bound no passing test waits for

job = contextvars.ContextVar("job", default="none")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def finisher() -> Iterator[ThreadFinisher]:
    finisher = ThreadFinisher(deadline=60)
    yield finisher
    assert finisher.close(timeout=LONG)


def test_a_tail_runs_on_the_finisher_thread_with_the_submitters_context(
    finisher: ThreadFinisher,
) -> None:
    seen: list[tuple[str, str]] = []
    job.set("job 7")
    finisher.submit(lambda: seen.append((threading.current_thread().name, job.get())))
    assert finisher.drain(timeout=LONG)
    assert seen == [("dreamq-finisher", "job 7")]


def test_submit_waits_while_the_previous_tail_runs(finisher: ThreadFinisher) -> None:
    running, release, submitted = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        running.set()
        release.wait(LONG)
        order.append("first")

    finisher.submit(first)
    assert running.wait(LONG)
    second = threading.Thread(
        target=lambda: (finisher.submit(lambda: order.append("second")), submitted.set())
    )
    second.start()
    # The bound: while the first tail runs, the second job's hand-off does not return.
    assert not submitted.wait(0.2)
    release.set()
    second.join(LONG)
    assert submitted.is_set()
    assert finisher.drain(timeout=LONG)
    assert order == ["first", "second"]


def test_a_tail_that_raises_is_logged_and_the_next_runs(
    finisher: ThreadFinisher, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("encoder exploded")

    done = threading.Event()
    with caplog.at_level(logging.ERROR, logger="dreamq.worker"):
        finisher.submit(broken)
        finisher.submit(done.set)
        assert done.wait(LONG)
    assert "a job's finishing step raised" in caplog.text
    assert "encoder exploded" in caplog.text


def test_a_tail_stuck_past_the_deadline_is_abandoned_for_a_fresh_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    finisher = ThreadFinisher(deadline=30, clock=clock)
    release, running, done = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def stuck() -> None:
        threads.append(threading.current_thread())
        running.set()
        release.wait(LONG)

    def fresh() -> None:
        threads.append(threading.current_thread())
        done.set()

    finisher.submit(stuck)
    assert running.wait(LONG)
    clock.now = 31.0  # the stuck tail was handed over 31 s ago
    with caplog.at_level(logging.ERROR, logger="dreamq.worker"):
        finisher.submit(fresh)  # does not wait for the stuck one
    assert done.wait(LONG)
    assert threads[0] is not threads[1]
    assert "it is abandoned" in caplog.text
    release.set()
    threads[0].join(LONG)  # the abandoned thread ends once its tail returns
    assert not threads[0].is_alive()
    assert finisher.close(timeout=LONG)


def test_close_drains_then_runs_later_tails_inline(finisher: ThreadFinisher) -> None:
    release = threading.Event()
    order: list[str] = []
    finisher.submit(lambda: (release.wait(LONG), order.append("last job")))
    closing = threading.Thread(target=lambda: order.append(f"closed {finisher.close(LONG)}"))
    closing.start()
    release.set()
    closing.join(LONG)
    assert order == ["last job", "closed True"]
    finisher.submit(lambda: order.append(threading.current_thread().name))
    assert order[-1] == threading.current_thread().name


def test_close_reports_a_tail_it_could_not_wait_for(caplog: pytest.LogCaptureFixture) -> None:
    finisher = ThreadFinisher(deadline=60)
    release, running = threading.Event(), threading.Event()
    finisher.submit(lambda: (running.set(), release.wait(LONG)))
    assert running.wait(LONG)
    with caplog.at_level(logging.ERROR, logger="dreamq.worker"):
        assert finisher.close(timeout=0.05) is False
    assert "still finishing when the process stopped" in caplog.text
    release.set()


def test_a_soft_time_limit_interrupts_a_waiting_submit_and_hands_nothing_over() -> None:
    """Celery's soft limit is SIGUSR1 in the pool process, raised in the main thread: a job
    waiting for the previous job's tail gets it there, and its own tail is not handed over."""

    def soft_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, soft_limit)
    finisher = ThreadFinisher(deadline=60)
    release, running = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        finisher.submit(lambda: (running.set(), release.wait(LONG), ran.append("previous")))
        assert running.wait(LONG)
        # The signal's handler runs in the main thread (pytest's), which by then waits in
        # submit (if it came sooner, submit raises all the same, before handing over).
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(SoftTimeLimitExceeded):
            finisher.submit(lambda: ran.append("this job"))
        release.set()
        assert finisher.drain(timeout=LONG)
        assert ran == ["previous"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        release.set()
        finisher.close(timeout=LONG)


def test_the_inline_finisher_runs_at_once_and_logs_what_escapes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finisher = InlineFinisher()
    ran: list[str] = []
    finisher.submit(lambda: ran.append(threading.current_thread().name))
    assert ran == [threading.current_thread().name]

    def broken() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="dreamq.worker"):
        finisher.submit(broken)
    assert "boom" in caplog.text
    assert finisher.drain() and finisher.close()
