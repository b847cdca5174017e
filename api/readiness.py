"""Readiness (`GET /ready`): can this API process accept work? It needs Redis (job records,
keys) and the broker (it publishes every job). `/health` is liveness only: it never looks out.

When the broker is the job Redis, one ping answers both. Another Redis broker gets a ping of its
own; RabbitMQ a connection attempt with a short timeout, in a thread (kombu blocks), so a hung
broker costs the probe `timeout` seconds and never the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.to_thread
import redis.asyncio as aioredis

CHECK_TIMEOUT_SECONDS = 2.0


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


def broker_client(redis_url: str, broker_url: str) -> aioredis.Redis | None:
    """A client of the broker's Redis when it is not the job Redis; None otherwise (the same
    Redis, or AMQP)."""
    if broker_url == redis_url or not is_redis_url(broker_url):
        return None
    return aioredis.Redis.from_url(
        broker_url,
        socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
        socket_timeout=CHECK_TIMEOUT_SECONDS,
    )


class Readiness:
    def __init__(
        self,
        client: aioredis.Redis,
        broker_url: str,
        *,
        broker: aioredis.Redis | None = None,
        same_redis: bool = True,
        timeout: float = CHECK_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self._broker_url = broker_url
        self._broker = broker
        self._same_redis = same_redis
        self._timeout = timeout

    async def check(self) -> dict[str, bool]:
        """{"redis": up, "broker": up}."""
        redis_up = await _answers(self._client.ping, self._timeout)
        if self._same_redis:
            broker_up = redis_up
        elif self._broker is not None:
            broker_up = await _answers(self._broker.ping, self._timeout)
        else:
            broker_up = await anyio.to_thread.run_sync(
                _amqp_answers, self._broker_url, self._timeout
            )
        return {"redis": redis_up, "broker": broker_up}


async def _answers(ping: Callable[[], Awaitable[object]], seconds: float) -> bool:
    try:
        with anyio.fail_after(seconds):
            await ping()
    except Exception:
        return False
    return True


def _amqp_answers(url: str, timeout: float) -> bool:
    from kombu import Connection  # the API's publisher depends on it already

    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.connect()
            return bool(connection.connected)
    except Exception:
        return False
