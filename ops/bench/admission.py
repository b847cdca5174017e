"""Admission and fetch on one real API process, beside the naive and floor designs.

Each server (dreamq's `dreamq api`, then `bare_apps.naive_app`, then `bare_apps.floor_app`) runs
alone as one uvicorn process on the same redis-server and is driven by the same client
(`load.py`), so the three figures differ only by what the route does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from ops.bench.load import LoadResult, closed_loop, open_loop
from ops.bench.processes import dreamq, free_port, http_server, uvicorn_app
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


@dataclass
class AdmissionFigures:
    dreamq: LoadResult
    naive: LoadResult
    floor: LoadResult
    paced: LoadResult
    fetch: LoadResult
    fetch_paced: LoadResult


def _drive_submit(base: str, key: str, cfg: AdmissionConfig, *, keep: bool = False) -> LoadResult:
    head, tail = submission(key)

    def make(n: int) -> tuple[str, bytes]:
        return SUBMIT, head + str(n).encode() + tail

    asyncio.run(closed_loop(base, make, connections=cfg.connections, seconds=cfg.warmup))
    return asyncio.run(
        closed_loop(base, make, connections=cfg.connections, seconds=cfg.seconds, keep_bodies=keep)
    )


def measure(redis_url: str, env: Mapping[str, str], cfg: AdmissionConfig) -> AdmissionFigures:
    key, _ = ApiKeyStore(redis.Redis.from_url(redis_url)).create("bench")
    port = free_port()
    api_env = {**env, "DREAMQ_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    api = dreamq("api", "--host", "127.0.0.1", "--port", str(port))
    with http_server(api, api_env, "dreamq api", port, probe="/ready") as base:
        accepted = _drive_submit(base, key, cfg, keep=True)
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
        fetched = asyncio.run(
            closed_loop(base, fetch, connections=cfg.connections, seconds=cfg.seconds)
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
    )


def rows(f: AdmissionFigures, cfg: AdmissionConfig) -> list[Row]:
    ratio = f.dreamq.rate / f.naive.rate
    conns = f"{cfg.connections} connections, {cfg.seconds:.0f} s"
    return [
        Row(
            f"Admission: accepted/s, one API process ({conns})",
            f"{summary(f.dreamq)}; {ratio:.2f}x naive; {f.dreamq.errors} refused",
            f"naive send_task route {summary(f.naive)}; floor (one Redis pipeline) "
            f"{summary(f.floor)}",
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
            f"client used {f.fetch.client_cpu:.0%} of a core; at {OFFERED_RATE:,.0f}/s "
            f"offered: p99 {ms(f.fetch_paced.p(99))}",
            "≥ 5,000/s, p99 ≤ 10 ms",
            f.fetch.rate >= 5000 and f.fetch.p(99) <= 0.010,
        ),
    ]
