"""The API's Redis clients: a pool that makes a burst wait for a connection instead of failing.

redis-py's asyncio pool holds at most 100 connections and raises MaxConnectionsError at once when
all are in use: every request in flight holds one while it waits on Redis, so a burst of more
than 100 requests answered 500s (and clients retrying them made the burst worse; the admission
benchmark's open loop at 1,000/s collapsed that way). redis-py's BlockingConnectionPool waits
instead, but takes a condition, a timeout and an async context manager on every command, about
6% of an accepted request's CPU. This pool takes a semaphore slot per connection handed out: free
while one is, a first-come-first-served wait when none is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import MaxConnectionsError

POOL_SIZE = 100
"""Connections to one Redis per API process, at most (redis-py's default cap)."""
POOL_WAIT_SECONDS = 5.0
"""How long a command waits for a connection when all are in use, then MaxConnectionsError."""


class WaitingConnectionPool(aioredis.ConnectionPool):
    """A ConnectionPool whose callers, when all `max_connections` are in use, queue (in order,
    for `wait_seconds` at most) for one to be released."""

    def __init__(self, *, wait_seconds: float = POOL_WAIT_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wait_seconds = wait_seconds
        self._slots = asyncio.Semaphore(self.max_connections)
        self._holding: set[AbstractConnection] = set()
        """Connections handed out with a slot: their release frees it."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        await self._take_slot()
        try:
            connection = await super().get_connection(*args, **kwargs)
        except BaseException:
            self._slots.release()  # no connection went out with it
            raise
        self._holding.add(connection)
        return connection

    async def _take_slot(self) -> None:
        if not self._slots.locked():  # a slot is free and nobody queues: no timer, no wait
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self._wait_seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise MaxConnectionsError(
                f"all {self.max_connections} Redis connections stayed in use for "
                f"{self._wait_seconds:g} s"
            ) from None

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._slots.release()


def waiting_client(url: str, **options: Any) -> aioredis.Redis:
    """A client of `url` on a WaitingConnectionPool (it closes the pool when closed)."""
    pool = WaitingConnectionPool.from_url(url, max_connections=POOL_SIZE, **options)
    return aioredis.Redis.from_pool(pool)
