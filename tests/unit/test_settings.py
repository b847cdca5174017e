"""Settings that must agree with each other, and how the Celery app applies them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dreamq.queue import make_celery
from dreamq.settings import Settings


def test_refuses_a_visibility_timeout_below_twice_the_time_limit() -> None:
    with pytest.raises(ValidationError) as error:
        Settings(job_time_limit=600, visibility_timeout=1199)
    text = str(error.value)
    assert "DREAMQ_VISIBILITY_TIMEOUT (1199 s)" in text
    assert "DREAMQ_JOB_TIME_LIMIT (600 s)" in text


def test_refuses_it_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMQ_JOB_TIME_LIMIT", "100")
    monkeypatch.setenv("DREAMQ_VISIBILITY_TIMEOUT", "150")
    with pytest.raises(ValidationError, match="at least twice"):
        Settings()


def test_accepts_exactly_twice() -> None:
    settings = Settings(job_time_limit=600, visibility_timeout=1200)
    assert settings.soft_time_limit == 570
    assert settings.job_time_limit < settings.lease_seconds < settings.visibility_timeout


def test_short_limits_keep_their_order() -> None:
    settings = Settings(job_time_limit=3, visibility_timeout=6)
    assert 0 < settings.soft_time_limit < 3 < settings.lease_seconds < 6


def test_celery_gets_one_visibility_timeout_and_both_time_limits() -> None:
    settings = Settings(job_time_limit=60, visibility_timeout=300)
    conf = make_celery(settings).conf
    assert conf.broker_transport_options["visibility_timeout"] == 300
    assert conf.result_backend_transport_options["visibility_timeout"] == 300
    assert conf.visibility_timeout == 300
    assert conf.task_time_limit == 60
    assert conf.task_soft_time_limit == settings.soft_time_limit


def test_commands_refuse_to_start_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamq import cli

    monkeypatch.setenv("DREAMQ_JOB_TIME_LIMIT", "100")
    monkeypatch.setenv("DREAMQ_VISIBILITY_TIMEOUT", "150")
    with pytest.raises(SystemExit) as stop:
        cli.main(["worker"])
    assert "DREAMQ_VISIBILITY_TIMEOUT (150 s) must be at least twice" in str(stop.value.code)
