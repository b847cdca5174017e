"""storage/wire.py against a real redis-server: the multiplexed connection answers each caller
its own reply when many share it, keeps replies in step through error replies and cancelled
callers, reconnects after the connection is lost, gives up on a Redis that stops answering, and
logs in and selects its database; `RedisPyWire` (fakeredis in the API's unit tests) answers the
same calls alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fakeredis
import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.wire import Address, Multiplexed, RedisPyWire, Script, Wire, pairs
from tests.support.processes import RedisServer, redis_server
from tests.support.tcp import listener

ECHO = Script("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1] .. ':calls')}")


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(test())


@pytest.fixture(params=["multiplexed", "redis-py"])
def make_wire(request: pytest.FixtureRequest, redis_proc: RedisServer) -> Callable[[], Wire]:
    if request.param == "multiplexed":
        return lambda: Multiplexed(redis_proc.url)
    return lambda: RedisPyWire(aioredis.Redis.from_url(redis_proc.url))


async def closed(wire: Wire) -> None:
    if isinstance(wire, Multiplexed):
        await wire.aclose()
    else:
        assert isinstance(wire, RedisPyWire)
        await wire.client.aclose()


def test_calls_scripts_and_hashes_answer_alike(make_wire: Callable[[], Wire]) -> None:
    async def test() -> None:
        wire = make_wire()
        try:
            await wire.call("DEL", "wire:h", "wire:s", "wire:s:calls")
            assert await wire.call("HSET", "wire:h", "a", "1", "b", 2.5) == 2
            assert await wire.call("HMGET", "wire:h", "a", "b", "c") == [b"1", b"2.5", None]
            assert pairs(await wire.call("HGETALL", "wire:h")) == {b"a": b"1", b"b": b"2.5"}
            replies = await wire.calls([("HGET", "wire:h", "a"), ("HGETALL", "wire:none")])
            assert replies[0] == b"1" and not replies[1]
            await wire.call("SCRIPT", "FLUSH")  # as after a Redis restart: EVAL, then EVALSHA
            assert await wire.script(ECHO, ["wire:s"], [7]) == [b"wire:s", b"7", 1]
            assert await wire.script(ECHO, ["wire:s"], ["x"]) == [b"wire:s", b"x", 2]
        finally:
            await closed(wire)

    run(test)


def test_an_error_reply_fails_its_caller_and_the_replies_stay_in_step(
    make_wire: Callable[[], Wire],
) -> None:
    async def test() -> None:
        wire = make_wire()
        try:
            await wire.call("SET", "wire:text", "abc")
            with pytest.raises(ResponseError, match="not an integer"):
                await wire.call("INCR", "wire:text")
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await wire.calls([("GET", "wire:text"), ("HGET", "wire:text", "f")])
            assert await wire.call("GET", "wire:text") == b"abc"
            assert await wire.calls([("ECHO", "1"), ("ECHO", "2")]) == [b"1", b"2"]
        finally:
            await closed(wire)

    run(test)


def test_many_callers_share_one_connection_and_each_gets_its_own_reply(
    redis_proc: RedisServer,
) -> None:
    async def test() -> None:
        wire = Multiplexed(redis_proc.url)

        async def caller(i: int) -> None:
            await wire.call("SET", f"wire:many:{i}", i)
            assert await wire.call("GET", f"wire:many:{i}") == str(i).encode()
            pair = await wire.calls([("ECHO", f"a{i}"), ("ECHO", f"b{i}")])
            assert pair == [f"a{i}".encode(), f"b{i}".encode()]
            assert await wire.script(ECHO, [f"wire:many:{i}"], [i]) == [
                f"wire:many:{i}".encode(),
                str(i).encode(),
                1,
            ]

        try:
            await asyncio.gather(*(caller(i) for i in range(300)))
            assert wire.connections == 1
        finally:
            await wire.aclose()

    run(test)


def test_a_cancelled_caller_does_not_shift_the_next_reply(redis_proc: RedisServer) -> None:
    async def test() -> None:
        wire = Multiplexed(redis_proc.url)
        try:
            await wire.call("PING")  # connected
            await wire.call("SET", "wire:first", "first")
            link = wire._link_now()  # the connection itself: its command is sent at once
            assert link is not None
            (gone,) = link.send(hiredis.pack_command(("GET", "wire:first")))
            gone.cancel()  # its caller went away before the reply came
            assert await wire.call("ECHO", "second") == b"second"
            assert gone.cancelled()
        finally:
            await wire.aclose()

    run(test)


def test_a_lost_connection_fails_what_was_in_flight_and_the_next_call_reconnects(
    redis_proc: RedisServer,
) -> None:
    async def test() -> None:
        wire = Multiplexed(redis_proc.url)
        admin = aioredis.Redis.from_url(redis_proc.url)
        try:
            own_id = await wire.call("CLIENT", "ID")
            # A command that stays in flight: a blocking pop (never sent through it in dreamq).
            waiting = asyncio.ensure_future(wire.call("BLPOP", "wire:never", 0))
            deadline = time.monotonic() + 10
            while b"cmd=blpop" not in await admin.execute_command("CLIENT", "LIST", "ID", own_id):
                assert time.monotonic() < deadline, "the BLPOP never reached Redis"
            await admin.execute_command("CLIENT", "KILL", "ID", own_id)
            with pytest.raises(RedisConnectionError):
                await waiting
            assert await wire.call("PING") == b"PONG"
            assert wire.connections == 2
        finally:
            await wire.aclose()
            await admin.aclose()

    run(test)


def test_a_redis_that_stops_answering_times_out_and_the_connection_is_dropped(
    redis_proc: RedisServer,
) -> None:
    async def test() -> None:
        wire = Multiplexed(redis_proc.url, timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await wire.call("BLPOP", "wire:never", 0)
            assert 0.3 <= time.monotonic() - started < 5
            assert await wire.call("PING") == b"PONG"  # on a new connection
            assert wire.connections == 2
        finally:
            await wire.aclose()

    run(test)


def test_a_server_that_never_answers_times_out() -> None:
    async def test() -> None:
        with listener() as silent:
            wire = Multiplexed(f"redis://127.0.0.1:{silent.port}/0", timeout=0.2)
            with pytest.raises(RedisTimeoutError, match="did not answer"):
                await wire.call("PING")
            await wire.aclose()

    run(test)


def test_nothing_listening_is_a_connection_error() -> None:
    async def test() -> None:
        with listener() as gone:
            port = gone.port
        wire = Multiplexed(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(RedisConnectionError, match="could not connect"):
            await wire.call("PING")

    run(test)


def test_it_logs_in_and_selects_the_database_of_its_url(tmp_path: Path) -> None:
    async def test(server: RedisServer) -> None:
        admin = aioredis.Redis.from_url(server.url)
        await admin.config_set("requirepass", "s3cr:t")
        await admin.aclose()
        wire = Multiplexed(f"redis://:s3cr%3At@127.0.0.1:{server.port}/3")
        try:
            await wire.call("SET", "wire:db", "three")
        finally:
            await wire.aclose()
        check = aioredis.Redis(port=server.port, password="s3cr:t", db=3)
        assert await check.get("wire:db") == b"three"
        await check.aclose()
        refused = Multiplexed(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(ResponseError):
            await refused.call("PING")

    with redis_server(tmp_path) as server:
        asyncio.run(test(server))


def test_a_new_event_loop_gets_a_connection_of_its_own(redis_proc: RedisServer) -> None:
    wire = Multiplexed(redis_proc.url)
    assert asyncio.run(wire.call("ECHO", "one")) == b"one"
    assert asyncio.run(wire.call("ECHO", "two")) == b"two"
    assert wire.connections == 2


def test_fakeredis_serves_the_same_calls() -> None:
    async def test() -> None:
        wire = RedisPyWire(fakeredis.aioredis.FakeRedis())
        await wire.call("HSET", "h", "a", "1")
        assert pairs(await wire.call("HGETALL", "h")) == {b"a": b"1"}
        assert await wire.calls([("HMGET", "h", "a"), ("ECHO", "x")]) == [[b"1"], b"x"]
        assert await wire.script(ECHO, ["k"], [1]) == [b"k", b"1", 1]

    run(test)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6380/2", Address("127.0.0.1", 6380, None, 2)),
        ("redis://redis", Address("redis", 6379, None, 0)),
        (
            "rediss://user:p%40ss@cache.example:6390/0",
            Address("cache.example", 6390, None, 0, "user", "p@ss", tls=True),
        ),
        ("unix:///run/redis.sock?db=4", Address("", 0, "/run/redis.sock", 4)),
    ],
)
def test_addresses(url: str, address: Address) -> None:
    assert Address.of(url) == address


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        Address.of("http://127.0.0.1:6379")
