"""The load generator: an asyncio HTTP/1.1 keep-alive client, closed-loop and open-loop.

One client process on a 2-core machine shares the CPU with the server it drives, so the client
must cost far less per request than the server: httpx spends roughly as much CPU per request as
a small FastAPI route, which would make the figures the client's. This client writes each
request as pre-formatted bytes and reads the answer by Content-Length, a few microseconds of
Python per request; `client_cpu` reports what it used, so a reader can see it is not the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MakeRequest = Callable[[int], tuple[str, bytes]]
"""Request number -> (path, JSON body)."""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class LoadResult:
    seconds: float
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    client_cpu: float = 0.0
    """Fraction of one core the client process used while driving."""

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, base_url: str) -> Connection:
        parts = urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self._host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        self._writer.write(head + body)
        status_and_headers = await self._reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.close()


async def closed_loop(
    base_url: str, make: MakeRequest, *, connections: int, seconds: float, keep_bodies: bool = False
) -> LoadResult:
    """`connections` clients each sending the next request as soon as the last is answered."""
    pool = [await Connection.open(base_url) for _ in range(connections)]
    counter = iter(range(10**9))
    cpu0, start = time.process_time(), time.perf_counter()
    end = start + seconds
    result = LoadResult(seconds=seconds)

    async def drive(conn: Connection) -> None:
        while time.perf_counter() < end:
            path, body = make(next(counter))
            sent = time.perf_counter()
            status, answer = await conn.post(path, body)
            result.latencies.append(time.perf_counter() - sent)
            if status == 200:
                result.ok += 1
                if keep_bodies:
                    result.bodies.append(answer)
            else:
                result.errors += 1

    await asyncio.gather(*(drive(conn) for conn in pool))
    result.seconds = time.perf_counter() - start
    result.client_cpu = (time.process_time() - cpu0) / result.seconds
    for conn in pool:
        conn.close()
    return result


async def open_loop(
    base_url: str, make: MakeRequest, *, rate: float, seconds: float, max_connections: int = 256
) -> LoadResult:
    """Requests sent on a fixed schedule (`rate` per second) whatever the answers do; latency is
    counted from each request's scheduled time, so a stalled server cannot hide its backlog
    (no coordinated omission)."""
    idle: list[Connection] = [await Connection.open(base_url) for _ in range(16)]
    opened = len(idle)
    total = int(rate * seconds)
    result = LoadResult(seconds=seconds)
    tasks: set[asyncio.Task[None]] = set()
    cpu0, start = time.process_time(), time.perf_counter()

    async def one(number: int, due: float) -> None:
        nonlocal opened
        if idle:
            conn = idle.pop()
        else:
            opened += 1
            conn = await Connection.open(base_url)
        path, body = make(number)
        try:
            status, _ = await conn.post(path, body)
        except (OSError, asyncio.IncompleteReadError):
            # An overloaded server drops connections: an error, and the connection is gone.
            result.errors += 1
            opened -= 1
            conn.close()
            return
        result.latencies.append(time.perf_counter() - due)
        if status == 200:
            result.ok += 1
        else:
            result.errors += 1
        idle.append(conn)

    for number in range(total):
        due = start + number / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if opened >= max_connections and not idle:
            result.errors += 1  # the server is so far behind that the client gave up pacing
            continue
        task = asyncio.create_task(one(number, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    result.seconds = time.perf_counter() - start
    result.client_cpu = (time.process_time() - cpu0) / result.seconds
    for conn in idle:
        conn.close()
    return result
