"""The API's hot-path Redis calls, and one multiplexed connection that serves them cheaply.

An API process answers thousands of submissions and fetches a second, each two or three short
Redis round trips. redis-py's asyncio client costs about 80-100 µs of CPU per round trip on the
project machine (its pool, retry wrapper, a `wait_for` task per write, a timeout context per
read, its command packer in Python): as much as the rest of a fetch. `Multiplexed` is the
design of aioredis 1 (and of ioredis): one connection per process, every request's commands
written to it as they come, many requests' commands in flight on it at once, replies matched to
callers in order (Redis answers a connection's commands in the order it received them). A
command is then a packed buffer (hiredis's packer, in C), a future, a `send`, and its share of
the `recv` that brings replies back (Redis answers what it read in one pass in one write).

Only short, non-blocking commands go through it: a blocking command (BRPOP, a long script)
would hold every other request's reply behind its own. Pub/sub, the broker and the workers keep
redis-py.

`Wire` is what the hot path asks of a connection (storage/eta.py, storage/jobs.py,
storage/apikeys.py): a command, several in one round trip, a Lua script by its SHA1. Two
implementations: `Multiplexed` (`dreamq api`), and `RedisPyWire` over any redis-py asyncio client
(fakeredis in unit tests, or a client an embedding application already has).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlparse

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

Command = Sequence[Any]
"""A command and its arguments: str, bytes, int or float each (packed as Redis does)."""


@dataclass(frozen=True)
class Script:
    """A Lua script: its text and SHA1 (EVALSHA sends the 40-character digest, not the body,
    so Redis neither receives nor hashes the text on every call)."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


class Wire(Protocol):
    """The Redis calls of the API's hot path. Replies are RESP2's, as redis-py gives them
    undecoded: bytes, int, None, lists (HGETALL's: a list from Redis, a dict from redis-py;
    `pairs` reads both)."""

    async def call(self, *args: Any) -> Any:
        """One command's reply; a Redis error reply raises ResponseError."""
        ...

    async def calls(self, commands: Sequence[Command]) -> list[Any]:
        """Several commands in one round trip (no transaction): their replies in order. A Redis
        error reply to any raises ResponseError once all have answered."""
        ...

    async def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script on NOSCRIPT (a restarted Redis has none)."""
        ...


def pairs(reply: Any) -> dict[bytes, bytes]:
    """HGETALL's reply as a dict: redis-py gives one, the raw protocol a flat list."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _evalsha(script: Script, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    return ["EVALSHA", script.sha, len(keys), *keys, *args]


class RedisPyWire:
    """`Wire` over a redis-py asyncio client (a real one, or fakeredis)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def call(self, *args: Any) -> Any:
        return await self.client.execute_command(*args)

    async def calls(self, commands: Sequence[Command]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute())

    async def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.client.execute_command(*_evalsha(script, keys, args))
        except NoScriptError:
            return await self.client.execute_command("EVAL", script.text, len(keys), *keys, *args)


def wire_of(client: aioredis.Redis | Wire) -> Wire:
    """`client` as a `Wire`: a redis-py client is wrapped."""
    return RedisPyWire(client) if isinstance(client, aioredis.Redis) else client


_INCOMPLETE = object()
"""hiredis.Reader's answer while a reply is incomplete (None is a reply: a nil)."""


class _Link(asyncio.Protocol):
    """One connection: commands out in order, replies back to their futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        """The event loop it belongs to (its transport's)."""
        self._timeout = timeout
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed: BaseException | None = None
        """Why the link is gone (every later command must use a new one); None while open."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._abort(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is _INCOMPLETE:
                return
            if not pending:
                self._abort(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future, _ = pending.popleft()
            if future.done():  # its caller was cancelled: the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            RedisConnectionError(
                f"Redis closed the connection{f': {exc}' if exc is not None else ''}"
            )
        )

    # the client's side

    def send(self, packed: bytes, count: int = 1) -> list[asyncio.Future[Any]]:
        """Write `count` packed commands at once; a future for each reply, in order.

        Written now, not gathered for the end of the event-loop iteration: gathering put every
        request's command in one write, so Redis worked through the whole wave while the API
        waited, then the API through the replies while Redis waited (measured: admission
        1,541 -> 1,845/s, fetch 1,755 -> 3,192/s when written at once). A request's own
        commands (`Multiplexed.calls`) still leave together."""
        loop = self.loop
        futures = [loop.create_future() for _ in range(count)]
        if self.closed is not None or self._transport is None:
            for future in futures:
                future.set_exception(self.closed or RedisConnectionError("not connected"))
            return futures
        self._transport.write(packed)
        now = loop.time()
        self._pending.extend((future, now) for future in futures)
        if self._watchdog is None:
            self._watchdog = loop.call_at(now + self._timeout, self._check)
        return futures

    def _check(self) -> None:
        """The oldest command waited `timeout` for its reply: Redis stopped answering (or the
        network did). Every later reply on this connection would queue behind it, so the
        connection is dropped and each command waiting on it fails."""
        self._watchdog = None
        if not self._pending or self.closed is not None:
            return
        oldest = self._pending[0][1]
        due = oldest + self._timeout
        if self.loop.time() >= due:
            self._abort(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._watchdog = self.loop.call_at(due, self._check)

    def _abort(self, reason: RedisError) -> None:
        self._fail(reason)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, reason: RedisError) -> None:
        if self.closed is None:
            self.closed = reason
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(reason)

    def close(self) -> None:
        self._fail(RedisConnectionError("the client was closed"))
        if self._transport is not None:
            self._transport.close()


def _error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


@dataclass(frozen=True)
class Address:
    """Where `Multiplexed` connects, parsed from a redis://, rediss:// or unix:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """unix:// socket path (host and port unused)."""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def of(cls, url: str) -> Address:
        parsed = urlparse(url)
        username = unquote(parsed.username) if parsed.username else None
        password = unquote(parsed.password) if parsed.password else None
        query = dict(part.split("=", 1) for part in parsed.query.split("&") if "=" in part)
        if parsed.scheme == "unix":
            db = int(query.get("db", "0"))
            return cls("", 0, parsed.path, db, username, password)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {url!r}")
        db_text = parsed.path.lstrip("/") or query.get("db", "0")
        return cls(
            parsed.hostname or "127.0.0.1",
            parsed.port or 6379,
            None,
            int(db_text),
            username,
            password,
            parsed.scheme == "rediss",
        )

    def handshake(self) -> list[list[Any]]:
        """The commands a new connection sends before any other."""
        commands: list[list[Any]] = []
        if self.password is not None:
            commands.append(
                ["AUTH", self.username, self.password] if self.username else ["AUTH", self.password]
            )
        if self.db:
            commands.append(["SELECT", self.db])
        return commands


class Multiplexed:
    """`Wire` over one pipelined connection per process (see the module's text).

    Connects on first use and again on the first command after the connection is lost; a
    command in flight when it is lost fails (RedisConnectionError), and is not sent again: a
    write may have been applied. `timeout` bounds how long the oldest command waits for its
    reply before the connection is dropped (RedisTimeoutError for every command on it).
    """

    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        self.address = Address.of(url)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None
        self.connections = 0
        """Connections opened so far (tests read it)."""

    async def _open(self) -> _Link:
        link = self._link_now()
        if link is not None:
            return link
        loop = asyncio.get_running_loop()
        connecting = self._connecting
        if connecting is None or connecting.done() or connecting.get_loop() is not loop:
            # One attempt for every caller waiting now; its error is read even if the caller
            # that started it was cancelled (no "exception never retrieved" at exit).
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        address = self.address
        link = _Link(loop, self._timeout)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if address.path is not None:
                    await loop.create_unix_connection(lambda: link, address.path)
                else:
                    context = ssl.create_default_context() if address.tls else None
                    await loop.create_connection(
                        lambda: link, address.host, address.port, ssl=context
                    )
                for command in address.handshake():
                    (reply,) = link.send(hiredis.pack_command(tuple(command)))
                    await reply
        except TimeoutError:
            link.close()
            raise RedisTimeoutError(
                f"could not connect to Redis within {self._connect_timeout:g} s"
            ) from None
        except OSError as exc:
            link.close()
            raise RedisConnectionError(f"could not connect to Redis: {exc}") from exc
        except RedisError:
            link.close()
            raise
        # A link of another loop is left to that loop (its transport is not this loop's to close).
        self._link = link
        self.connections += 1
        return link

    def _link_now(self) -> _Link | None:
        """The open link, if it serves this event loop (a link is bound to the loop that
        opened it: a test client that runs each request on a new loop gets a link per loop)."""
        link = self._link
        if link is None or link.closed is not None or link.loop is not asyncio.get_running_loop():
            return None
        return link

    async def call(self, *args: Any) -> Any:
        link = self._link_now() or await self._open()
        (reply,) = link.send(hiredis.pack_command(args))
        return await reply

    async def calls(self, commands: Sequence[Command]) -> list[Any]:
        link = self._link_now() or await self._open()
        packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)
        futures = link.send(packed, len(commands))
        replies: list[Any] = []
        failure: RedisError | None = None
        try:
            for future in futures:
                try:
                    replies.append(await future)
                except RedisError as exc:  # the rest are read too: none is left unretrieved
                    failure = failure or exc
                    replies.append(None)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # their replies are dropped as they come
            raise
        if failure is not None:
            raise failure
        return replies

    async def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.call(*_evalsha(script, keys, args))
        except NoScriptError:
            return await self.call("EVAL", script.text, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
