"""The per-key limiter (storage/limits.py) on fakeredis with an injected clock, and against a
Redis nobody listens on for both DREAMQ_RATE_LIMIT_WHEN_DOWN modes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import fakeredis
import pytest
import redis.asyncio as aioredis

from dreamq.errors import RateLimited, ServiceUnavailable
from dreamq.settings import PlanLimits
from storage import keys
from storage.limits import UNAVAILABLE, RateLimiter, WhenDown, fingerprint
from tests.support.processes import free_port

T = TypeVar("T")
TIGHT = PlanLimits(requests_per_minute=60, burst=3)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await scenario()

    return asyncio.run(main())


def limiter(
    server: fakeredis.FakeServer, clock: Clock | None = None, when_down: WhenDown = "open"
) -> RateLimiter:
    return RateLimiter(
        fakeredis.aioredis.FakeRedis(server=server), when_down=when_down, clock=clock
    )


def dead_limiter(when_down: WhenDown) -> RateLimiter:
    """A limiter whose Redis is a loopback port nobody listens on."""
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    return RateLimiter(client, when_down=when_down, clock=Clock())


async def admitted(limits: RateLimiter, key_id: str, plan: PlanLimits, count: int) -> int:
    """How many of `count` requests at the current instant the limiter admits."""
    allowed = 0
    for _ in range(count):
        try:
            await limits.hit(key_id, plan)
        except RateLimited:
            continue
        allowed += 1
    return allowed


def test_a_rested_key_gets_its_burst_then_429_with_retry_after(
    server: fakeredis.FakeServer,
) -> None:
    limits = limiter(server, Clock())

    async def scenario() -> RateLimited:
        assert await admitted(limits, "k", TIGHT, 3) == 3
        with pytest.raises(RateLimited) as refused:
            await limits.hit("k", TIGHT)
        return refused.value

    refused = run(scenario)
    assert refused.message == "Rate limit exceeded"  # [compat] the hosted API's exact text
    assert refused.http_status == 429
    assert refused.retry_after == 1  # one request per second at 60 a minute


def test_tokens_come_back_at_the_plan_rate_and_no_more_than_the_burst(
    server: fakeredis.FakeServer,
) -> None:
    clock = Clock()
    limits = limiter(server, clock)

    async def scenario() -> list[int]:
        counts = [await admitted(limits, "k", TIGHT, 10)]
        clock.now += 1.0
        counts.append(await admitted(limits, "k", TIGHT, 10))
        clock.now += 2.5
        counts.append(await admitted(limits, "k", TIGHT, 10))
        clock.now += 3600
        counts.append(await admitted(limits, "k", TIGHT, 10))
        return counts

    assert run(scenario) == [3, 1, 2, 3]


def test_retry_after_rounds_the_wait_up_to_whole_seconds(server: fakeredis.FakeServer) -> None:
    clock = Clock()
    limits = limiter(server, clock)
    plan = PlanLimits(requests_per_minute=40, burst=1)  # one request every 1.5 s

    async def scenario() -> list[int]:
        await limits.hit("k", plan)
        waits = []
        for step in (0.0, 1.0, 0.45):
            clock.now += step
            with pytest.raises(RateLimited) as refused:
                await limits.hit("k", plan)
            waits.append(refused.value.retry_after)
        clock.now += 0.06
        await limits.hit("k", plan)  # 1.51 s after the first
        return waits

    assert run(scenario) == [2, 1, 1]


def test_keys_are_limited_apart_and_the_burst_defaults_to_the_rate(
    server: fakeredis.FakeServer,
) -> None:
    limits = limiter(server, Clock())
    per_minute = PlanLimits(requests_per_minute=5)

    async def scenario() -> tuple[int, int]:
        return await admitted(limits, "a", per_minute, 9), await admitted(
            limits, "b", per_minute, 9
        )

    assert run(scenario) == (5, 5)


def test_redis_time_is_the_clock_when_none_is_injected(server: fakeredis.FakeServer) -> None:
    limits = limiter(server, clock=None)

    async def scenario() -> int:
        return await admitted(limits, "k", PlanLimits(requests_per_minute=1, burst=2), 5)

    assert run(scenario) == 2
    # The state is a timestamp on Redis's clock, expiring once the key has rested.
    sync = fakeredis.FakeRedis(server=server)
    assert 0 < sync.pttl(keys.rate_limit("k")) <= 121_000


def test_concurrent_requests_never_take_more_than_the_burst(server: fakeredis.FakeServer) -> None:
    plan = PlanLimits(requests_per_minute=60, burst=7)
    # Separate clients, as separate API processes would have.
    limiters = [limiter(server, Clock()) for _ in range(4)]

    async def one(limits: RateLimiter) -> bool:
        try:
            await limits.hit("k", plan)
        except RateLimited:
            return False
        return True

    async def scenario() -> list[bool]:
        return await asyncio.gather(*(one(limiters[i % 4]) for i in range(40)))

    assert sum(run(scenario)) == 7


def test_a_plan_without_a_rate_never_touches_redis() -> None:
    # Closed mode would answer 503 if the unlimited plan made a call to the dead Redis.
    limits = dead_limiter("closed")

    async def scenario() -> int:
        return await admitted(limits, "k", PlanLimits(max_queued=3), 50)

    assert run(scenario) == 50


def test_duplicates_are_refused_for_the_window_with_the_time_left(
    server: fakeredis.FakeServer,
) -> None:
    clock = Clock()
    limits = limiter(server, clock)
    body = fingerprint("txt2img", {"key": "dq_a", "prompt": "a fox", "seed": 1})

    async def scenario() -> list[Any]:
        seen: list[Any] = [await limits.check_duplicate("k", body, 30)]
        clock.now += 10.2
        with pytest.raises(RateLimited) as refused:
            await limits.check_duplicate("k", body, 30)
        seen.append(refused.value)
        # Another key, or another body, is no duplicate.
        seen.append(await limits.check_duplicate("other", body, 30))
        other_body = fingerprint("txt2img", {"prompt": "a fox", "seed": 2})
        seen.append(await limits.check_duplicate("k", other_body, 30))
        clock.now += 20
        seen.append(await limits.check_duplicate("k", body, 30))  # the window has passed
        return seen

    first, refused, other_key, other_body, after = run(scenario)
    assert first == keys.duplicate_request("k", body)
    assert refused.retry_after == 20  # 19.8 s left, rounded up
    assert "limit exceeded" in refused.message  # [compat] what clients match
    assert "less than 30 seconds ago" in refused.message
    assert other_key and other_body and after


def test_a_forgotten_request_is_no_duplicate(server: fakeredis.FakeServer) -> None:
    limits = limiter(server, Clock())

    async def scenario() -> str | None:
        marker = await limits.check_duplicate("k", "digest", 30)
        await limits.forget(marker)
        return await limits.check_duplicate("k", "digest", 30)

    assert run(scenario) is not None


def test_the_duplicate_filter_is_off_with_a_zero_window(server: fakeredis.FakeServer) -> None:
    limits = limiter(server, Clock())

    async def scenario() -> list[str | None]:
        return [await limits.check_duplicate("k", "digest", 0) for _ in range(3)]

    assert run(scenario) == [None, None, None]
    assert fakeredis.FakeRedis(server=server).keys() == []


def test_the_fingerprint_ignores_the_key_and_key_order_but_not_the_endpoint() -> None:
    body = {"model_id": "demo", "prompt": "a fox", "width": 512}
    same = fingerprint("txt2img", {"width": 512, "key": "dq_other", **body})
    assert fingerprint("txt2img", body) == same
    assert fingerprint("img2img", body) != same
    assert fingerprint("txt2img", {**body, "width": 256}) != same


def test_redis_down_open_admits_and_warns_once_per_outage(
    server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = limiter(server, Clock(), when_down="open")
    caplog.set_level(logging.INFO, logger="dreamq.limits")

    async def scenario() -> list[int]:
        counts = [await admitted(limits, "k", TIGHT, 5)]  # 3: Redis up
        server.connected = False
        counts.append(await admitted(limits, "k", TIGHT, 10))  # all: open
        counts.append(len(caplog.records))
        server.connected = True
        counts.append(await admitted(limits, "k", TIGHT, 5))  # 0: the bucket is still empty
        server.connected = False
        counts.append(await admitted(limits, "k", TIGHT, 2))
        return counts

    counts = run(scenario)
    assert counts == [3, 10, 1, 0, 2]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3  # down, back, down again: one line each, not one per request
    assert "unreachable" in messages[0] and "DREAMQ_RATE_LIMIT_WHEN_DOWN=open" in messages[0]
    assert "reachable again" in messages[1]
    assert caplog.records[0].levelno == logging.WARNING


@pytest.mark.parametrize("when_down", ["open", "closed"])
def test_redis_nobody_listens_on(when_down: WhenDown) -> None:
    limits = dead_limiter(when_down)

    async def scenario() -> list[Any]:
        outcomes: list[Any] = []
        for call in (
            lambda: limits.hit("k", TIGHT),
            lambda: limits.check_duplicate("k", "digest", 30),
        ):
            try:
                outcomes.append(await call())
            except ServiceUnavailable as exc:
                outcomes.append(exc)
        await limits.forget("marker")  # best effort: never raises, even closed
        return outcomes

    outcomes = run(scenario)
    if when_down == "open":
        assert outcomes == [None, None]  # admitted, unthrottled, no marker
    else:
        assert all(isinstance(o, ServiceUnavailable) for o in outcomes)
        assert outcomes[0].message == UNAVAILABLE
        assert outcomes[0].http_status == 503


def test_retry_after_is_a_whole_number_of_at_least_one_second() -> None:
    assert RateLimited(0.0).retry_after == 1
    assert RateLimited(0.001).retry_after == 1
    assert RateLimited(1.0).retry_after == 1
    assert RateLimited(1.01).retry_after == 2
    assert RateLimited(2, "5 requests already queued").message == (
        "Rate limit exceeded: 5 requests already queued"
    )
