"""api/redisclient.py against a real redis-server: when every connection of the pool is in use,
a command waits for one to be released instead of failing at once with MaxConnectionsError (what
gave 500s under a burst), and gives up after its wait. A BLPOP on an empty list holds the pool's
only connection until the test pushes to that list from another client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import MaxConnectionsError

from api.redisclient import WaitingConnectionPool
from tests.support.processes import RedisServer

HOLD = "test:redisclient:hold"


class ObservedPool(WaitingConnectionPool):
    """Tells when a caller holds a connection and how many started waiting, so a test acts once
    they do, not after a nap."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.waits = 0
        self.waiting = asyncio.Condition()

    async def _take_slot(self) -> None:
        if self._slots.locked():  # this caller is going to wait
            async with self.waiting:
                self.waits += 1
                self.waiting.notify_all()
        await super()._take_slot()

    async def until_waits(self, count: int) -> None:
        async with self.waiting:
            await self.waiting.wait_for(lambda: self.waits >= count)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super().get_connection(*args, **kwargs)
        async with self.waiting:
            self.waiting.notify_all()
        return connection

    async def until_connected(self) -> None:
        """Until a caller holds the (only) connection."""
        async with self.waiting:
            await self.waiting.wait_for(lambda: bool(self._in_use_connections))


def one_connection(url: str, wait_seconds: float = 5.0) -> tuple[aioredis.Redis, ObservedPool]:
    pool = ObservedPool.from_url(url, max_connections=1, wait_seconds=wait_seconds)
    return aioredis.Redis.from_pool(pool), pool


async def hold(client: aioredis.Redis) -> Any:
    """Holds a connection until something is pushed to HOLD."""
    return await client.blpop([HOLD], 0)


async def ping(client: aioredis.Redis) -> Any:
    return await client.ping()


async def push(client: aioredis.Redis, name: str, value: str) -> Any:
    return await client.rpush(name, value)


async def bounded(awaitable: Awaitable[Any]) -> Any:
    """A test that would hang fails instead."""
    return await asyncio.wait_for(awaitable, 20)


def test_a_command_waits_for_a_busy_connection(redis_proc: RedisServer) -> None:
    async def scenario() -> None:
        client, pool = one_connection(redis_proc.url)
        holder = asyncio.create_task(hold(client))
        waiter = asyncio.create_task(ping(client))
        await bounded(pool.until_waits(1))  # one of the two holds the connection
        redis_proc.client().rpush(HOLD, "go")  # the BLPOP returns and releases it
        popped, pinged = await bounded(asyncio.gather(holder, waiter))
        assert tuple(popped) == (HOLD.encode(), b"go")
        assert pinged is True
        await client.aclose()

    asyncio.run(scenario())


def test_a_command_gives_up_after_its_wait(redis_proc: RedisServer) -> None:
    async def scenario() -> None:
        client, pool = one_connection(redis_proc.url, wait_seconds=0.2)
        holder = asyncio.create_task(hold(client))
        await bounded(pool.until_connected())
        with pytest.raises(MaxConnectionsError):
            await bounded(ping(client))
        redis_proc.client().rpush(HOLD, "go")
        await bounded(holder)
        await client.aclose()

    asyncio.run(scenario())


def test_waiting_commands_run_in_the_order_they_came(redis_proc: RedisServer) -> None:
    async def scenario() -> None:
        client, pool = one_connection(redis_proc.url)
        order = "test:redisclient:order"
        await client.delete(order)
        holder = asyncio.create_task(hold(client))
        await bounded(pool.until_connected())
        pushes = []
        for waits, name in enumerate("abc", start=1):
            pushes.append(asyncio.create_task(push(client, order, name)))
            await bounded(pool.until_waits(waits))
        redis_proc.client().rpush(HOLD, "go")
        await bounded(asyncio.gather(holder, *pushes))
        assert await client.lrange(order, 0, -1) == [b"a", b"b", b"c"]
        await client.aclose()

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_turn_to_the_next(redis_proc: RedisServer) -> None:
    async def scenario() -> None:
        client, pool = one_connection(redis_proc.url)
        holder = asyncio.create_task(hold(client))
        await bounded(pool.until_connected())
        first = asyncio.create_task(ping(client))
        await bounded(pool.until_waits(1))
        second = asyncio.create_task(ping(client))
        await bounded(pool.until_waits(2))
        first.cancel()
        redis_proc.client().rpush(HOLD, "go")
        await bounded(holder)
        assert await bounded(second) is True
        with pytest.raises(asyncio.CancelledError):
            await first
        assert not pool._holding  # every slot came back
        await client.aclose()

    asyncio.run(scenario())
