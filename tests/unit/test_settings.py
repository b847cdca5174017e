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


def test_the_default_plans_follow_the_hosted_tiers_and_keys_default_to_unlimited() -> None:
    settings = Settings()
    assert [settings.plans[name].max_queued for name in ("basic", "standard", "premium")] == [
        5,
        10,
        15,
    ]
    assert settings.default_plan == "unlimited"
    assert settings.plan_limits(None) == settings.plans["unlimited"]
    assert settings.plan_limits(None).requests_per_minute is None
    assert settings.rate_limit_when_down == "open"
    assert settings.duplicate_window_seconds == 0


def test_plans_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMQ_PLANS", '{"trial": {"requests_per_minute": 6}, "open": {}}')
    monkeypatch.setenv("DREAMQ_DEFAULT_PLAN", "trial")
    settings = Settings()
    assert set(settings.plans) == {"trial", "open"}
    trial = settings.plan_limits(None)
    assert (trial.requests_per_minute, trial.effective_burst, trial.max_queued) == (6, 6, None)
    # A plan name a key still holds after the operator removed the plan: the default's limits.
    assert settings.plan_limits("retired") == trial


@pytest.mark.parametrize(
    ("plans", "default", "message"),
    [
        ("{not json", "unlimited", "DREAMQ_PLANS is not valid JSON"),
        ("[]", "unlimited", "DREAMQ_PLANS must be a JSON object"),
        ('{"a": {"rpm": 5}}', "a", "plan 'a': rpm: Extra inputs are not permitted"),
        ('{"a": {"burst": 5}}', "a", "plan 'a': limits: burst needs requests_per_minute"),
        ('{"a": {"max_queued": 0}}', "a", "plan 'a': max_queued: Input should be greater than"),
        ('{"a b": {}}', "a b", "plan name 'a b' must be"),
        ('{"basic": {}}', "unlimited", "DREAMQ_DEFAULT_PLAN 'unlimited' is not a plan of "
                                       "DREAMQ_PLANS (basic)"),
    ],
)  # fmt: skip
def test_bad_plans_stop_every_command_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, plans: str, default: str, message: str
) -> None:
    from dreamq import cli

    monkeypatch.setenv("DREAMQ_PLANS", plans)
    monkeypatch.setenv("DREAMQ_DEFAULT_PLAN", default)
    with pytest.raises(SystemExit) as stop:
        cli.main(["keys", "list"])
    assert message in str(stop.value.code)


def test_the_when_down_mode_is_open_or_closed() -> None:
    assert Settings(rate_limit_when_down="closed").rate_limit_when_down == "closed"
    with pytest.raises(ValidationError):
        Settings(rate_limit_when_down="maybe")
    with pytest.raises(ValidationError):
        Settings(duplicate_window_seconds=-1)


def test_a_plan_lane_needs_a_redis_broker() -> None:
    plans = '{"gold": {"priority": "high"}, "unlimited": {}}'
    assert Settings(plans=plans).priority_levels
    with pytest.raises(ValidationError, match="priority of plan gold needs a Redis broker"):
        Settings(plans=plans, broker_url="amqp://guest@localhost//")
    # Without lanes a RabbitMQ deployment starts, every job at level 0 (first come first served).
    assert not Settings(broker_url="amqp://guest@localhost//").priority_levels
