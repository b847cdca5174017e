"""Admission and fetch on one real API process, beside the naive and floor designs.

Each server (dreamq's `dreamq api`, then `bare_apps.naive_app`, then `bare_apps.floor_app`) runs
alone as one uvicorn process on the same redis-server and is driven by the same client
(`load.py`), so the three figures differ only by what the route does.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from ops.bench.load import LoadResult, closed_loop, open_loop
from ops.bench.processes import child, dreamq, free_port, http_server, uvicorn_app, wait_http
from ops.bench.report import Row
from storage.apikeys import ApiKeyStore

SUBMIT = "/api/v4/dreambooth"
OFFERED_RATE = 1000.0


@dataclass(frozen=True)
class AdmissionConfig:
    seconds: float
    warmup: float
    connections: int
    open_seconds: float


def submission(key: str) -> tuple[bytes, bytes]:
    """The body around its seed: every request is distinct, as a client's would be."""
    text = json.dumps(
        {
            "key": key,
            "model_id": "demo",
            "prompt": "a red fox in the snow",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "seed": 0,
        }
    )
    head, tail = text.rsplit("0}", 1)
    return head.encode(), b"}" + tail.encode()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(result: LoadResult) -> str:
    return f"{result.rate:,.0f}/s (p50 {ms(result.p(50))}, p99 {ms(result.p(99))})"


@dataclass(frozen=True)
class ServerCpu:
    """What serving a load cost the servers: CPU per answered request, of the API process and
    of redis-server (which every API process shares), and the share of a core the API used."""

    api_us: float
    redis_us: float
    api_core: float

    def __str__(self) -> str:
        return (
            f"API process {self.api_us:,.0f} µs of CPU per answer ({self.api_core:.0%} of a "
            f"core), redis-server {self.redis_us:,.0f} µs"
        )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def metered(
    drive: Callable[[], LoadResult], api_pid: int, client: redis.Redis
) -> tuple[LoadResult, ServerCpu]:
    """`drive()`'s result and what it cost the API process and Redis per answered request."""
    api0, redis0 = process_cpu_seconds(api_pid), redis_cpu_seconds(client)
    result = drive()
    api, used = process_cpu_seconds(api_pid) - api0, redis_cpu_seconds(client) - redis0
    answers = max(1, result.ok + result.errors)
    return result, ServerCpu(1e6 * api / answers, 1e6 * used / answers, api / result.seconds)


@dataclass
class AdmissionFigures:
    dreamq: LoadResult
    naive: LoadResult
    floor: LoadResult
    paced: LoadResult
    fetch: LoadResult
    fetch_paced: LoadResult
    submit_cpu: ServerCpu
    fetch_cpu: ServerCpu


def _drive_submit(
    base: str,
    key: str,
    cfg: AdmissionConfig,
    *,
    keep: bool = False,
    measured: Callable[[Callable[[], LoadResult]], LoadResult] = lambda drive: drive(),
) -> LoadResult:
    """A warm-up, then the closed loop that counts, run through `measured`."""
    head, tail = submission(key)

    def make(n: int) -> tuple[str, bytes]:
        return SUBMIT, head + str(n).encode() + tail

    asyncio.run(closed_loop(base, make, connections=cfg.connections, seconds=cfg.warmup))
    return measured(
        lambda: asyncio.run(
            closed_loop(
                base, make, connections=cfg.connections, seconds=cfg.seconds, keep_bodies=keep
            )
        )
    )


def measure(redis_url: str, env: Mapping[str, str], cfg: AdmissionConfig) -> AdmissionFigures:
    client = redis.Redis.from_url(redis_url)
    key, _ = ApiKeyStore(client).create("bench")
    port = free_port()
    api_env = {**env, "DREAMQ_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    api = dreamq("api", "--host", "127.0.0.1", "--port", str(port))
    with child(api, api_env, "dreamq api") as server:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/ready", process=server)
        pid = server.process.pid
        costs: list[ServerCpu] = []

        def metering(drive: Callable[[], LoadResult]) -> LoadResult:
            result, cost = metered(drive, pid, client)
            costs.append(cost)
            return result

        accepted = _drive_submit(base, key, cfg, keep=True, measured=metering)
        (submit_cpu,) = costs
        head, tail = submission(key)
        paced = asyncio.run(
            open_loop(
                base,
                lambda n: (SUBMIT, head + str(10**8 + n).encode() + tail),
                rate=OFFERED_RATE,
                seconds=cfg.open_seconds,
            )
        )
        ids = [json.loads(body)["id"] for body in accepted.bodies[-5000:]]
        fetch_body = json.dumps({"key": key}).encode()

        def fetch(n: int) -> tuple[str, bytes]:
            return f"{SUBMIT}/fetch/{ids[n % len(ids)]}", fetch_body

        asyncio.run(closed_loop(base, fetch, connections=cfg.connections, seconds=cfg.warmup))
        fetched, fetch_cpu = metered(
            lambda: asyncio.run(
                closed_loop(base, fetch, connections=cfg.connections, seconds=cfg.seconds)
            ),
            pid,
            client,
        )
        fetch_paced = asyncio.run(
            open_loop(base, fetch, rate=OFFERED_RATE, seconds=cfg.open_seconds)
        )
    bare_env = {"BENCH_REDIS_URL": redis_url}
    results = {}
    for name in ("naive", "floor"):
        port = free_port()
        command = uvicorn_app(f"ops.bench.bare_apps:{name}_app", port)
        with http_server(command, bare_env, f"{name} app", port) as base:
            results[name] = _drive_submit(base, key, cfg)
    return AdmissionFigures(
        dreamq=accepted,
        naive=results["naive"],
        floor=results["floor"],
        paced=paced,
        fetch=fetched,
        fetch_paced=fetch_paced,
        submit_cpu=submit_cpu,
        fetch_cpu=fetch_cpu,
    )


def rows(f: AdmissionFigures, cfg: AdmissionConfig) -> list[Row]:
    ratio = f.dreamq.rate / f.naive.rate
    conns = f"{cfg.connections} connections, {cfg.seconds:.0f} s"
    return [
        Row(
            f"Admission: accepted/s, one API process ({conns})",
            f"{summary(f.dreamq)}; {ratio:.2f}x naive; {f.dreamq.errors} refused",
            f"naive send_task route {summary(f.naive)}; floor (one Redis pipeline) "
            f"{summary(f.floor)}; {f.submit_cpu}",
            "≥ 2,000/s and ≥ 1.5x naive",
            f.dreamq.rate >= 2000 and ratio >= 1.5,
        ),
        Row(
            f"Admission: p99 at {OFFERED_RATE:,.0f}/s offered "
            f"(open loop, {cfg.open_seconds:.0f} s)",
            f"p99 {ms(f.paced.p(99))}, p50 {ms(f.paced.p(50))}; achieved {f.paced.rate:,.0f}/s, "
            f"{f.paced.errors} errors",
            f"client used {f.paced.client_cpu:.0%} of a core",
            "p99 ≤ 25 ms",
            f.paced.p(99) <= 0.025 and f.paced.errors == 0,
        ),
        Row(
            f"Fetch: fetches/s, one API process ({conns})",
            summary(f.fetch),
            f"{f.fetch_cpu}; client used {f.fetch.client_cpu:.0%} of a core; at "
            f"{OFFERED_RATE:,.0f}/s offered: p99 {ms(f.fetch_paced.p(99))}",
            "≥ 5,000/s, p99 ≤ 10 ms",
            f.fetch.rate >= 5000 and f.fetch.p(99) <= 0.010,
        ),
    ]
