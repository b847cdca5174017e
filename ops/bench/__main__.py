"""`python -m ops.bench [--quick] [--write docs/performance.md]`: run every figure, print the table.

Phase one: one redis-server; `dreamq api`, then the naive and the floor reference apps, each
alone, driven by the same load generator (admission, fetch). Phase two: a fresh redis-server,
`dreamq api` and a real `dreamq worker` (a second one for the ETA figure) running tiny models.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from ops.bench import admission, jobs
from ops.bench.processes import dreamq, dreamq_worker, free_port, http_server, redis_server
from ops.bench.report import Row, progress, section, table, write
from storage.apikeys import ApiKeyStore


@dataclass(frozen=True)
class Config:
    admission: admission.AdmissionConfig
    jobs: jobs.JobsConfig


FULL = Config(
    admission.AdmissionConfig(seconds=10, warmup=2, connections=16, open_seconds=10),
    jobs.JobsConfig(
        overhead_jobs=50, backlog=40, residency_rounds=3, eta_waves=4, eta_wave_size=10, eta_warm=2
    ),
)
QUICK = Config(
    admission.AdmissionConfig(seconds=1, warmup=0.3, connections=16, open_seconds=1),
    jobs.JobsConfig(
        overhead_jobs=4, backlog=5, residency_rounds=1, eta_waves=1, eta_wave_size=4, eta_warm=0
    ),
)

GPU_ROW = Row(
    "GPU: SD 1.5 / SDXL s per image and images/s at batch 1, 2, 4, 8 (bf16, SDPA, "
    "channels_last, torch.compile)",
    "not measured (no GPU lent): `python -m ops.bench.gpu` on a CUDA machine",
    "FLOP floor (counted): SD 1.5 512² 25 steps 42.7 TFLOP, 54 ms; SDXL 1024² 30 steps "
    "416 TFLOP, 527 ms at 790 TFLOP/s",
    "measured when a GPU is lent",
    None,
)


def demo_models(directory: Path) -> Path:
    """The tiny demo registry, written by a child so torch stays out of this process."""
    code = (
        "import sys, pathlib; from workers.tiny import write_demo_registry as w; "
        "print(w(pathlib.Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(directory)], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def base_env(redis_url: str, models: Path, outputs: Path) -> dict[str, str]:
    return {
        "DREAMQ_REDIS_URL": redis_url,
        "DREAMQ_BROKER_URL": redis_url,
        "DREAMQ_STORAGE_URL": f"file://{outputs}",
        "DREAMQ_MODELS_FILE": str(models),
        # img2img and inpaint inputs come from a loopback HTTP server.
        "DREAMQ_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
        "HF_HUB_OFFLINE": "1",
        # One torch thread per worker process: two workers on two cores, each with torch's
        # default of a thread per core, oversubscribe the CPU and run many times slower. A GPU
        # worker has its device to itself the same way.
        "OMP_NUM_THREADS": "1",
    }


def phase_admission(cfg: Config, work: Path, models: Path) -> list[Row]:
    (work / "redis1").mkdir()
    with redis_server(str(work / "redis1")) as url:
        env = base_env(url, models, work / "outputs1")
        figures = admission.measure(url, env, cfg.admission)
    return admission.rows(figures, cfg.admission)


FIGURES = ("admission", "residency", "overhead", "duty", "eta")


def phase_jobs(cfg: Config, work: Path, models: Path, only: set[str]) -> list[Row]:
    (work / "redis2").mkdir()
    with redis_server(str(work / "redis2")) as url, jobs.image_server() as images:
        key, _ = ApiKeyStore(redis.Redis.from_url(url)).create("bench")
        port, metrics_port = free_port(), free_port()
        env = {
            **base_env(url, models, work / "outputs2"),
            "DREAMQ_PUBLIC_URL": f"http://127.0.0.1:{port}",
        }
        api = dreamq("api", "--host", "127.0.0.1", "--port", str(port))
        with (
            http_server(api, env, "dreamq api", port, probe="/ready") as base,
            dreamq_worker({**env, "DREAMQ_METRICS_PORT": str(metrics_port)}) as worker,
        ):
            progress("phase two: API and worker up")
            bench = jobs.Bench(base, url, key, images)
            rows: list[Row] = []
            if "residency" in only:
                rows += jobs.residency(bench, worker, metrics_port, cfg.jobs.residency_rounds)
                progress("residency measured")
            bench.wait([bench.submit()[0] for _ in range(2)])  # warm before timing
            if "overhead" in only:
                rows.append(jobs.queue_overhead(bench, cfg.jobs.overhead_jobs))
                progress("queue overhead measured")
            if "duty" in only:
                rows += jobs.duty_rows(bench, cfg.jobs.backlog)
                progress("duty cycle measured")
            if "eta" in only:
                rows.append(jobs.eta_accuracy(bench, env, cfg.jobs))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small configuration (< 60 s)")
    parser.add_argument("--write", type=Path, help="rewrite this page's table section")
    parser.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        help="measure only this figure (repeatable); --write needs every figure",
    )
    args = parser.parse_args()
    only = set(args.only or FIGURES)
    if args.write and only != set(FIGURES):
        parser.error("--write records the whole table: leave out --only")
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dreamq-bench-") as folder:
        work = Path(folder)
        models = demo_models(work / "models")
        progress("tiny models written")
        rows: list[Row] = []
        if "admission" in only:
            rows += phase_admission(cfg, work, models)
            progress("admission and fetch measured")
        if only - {"admission"}:
            rows += phase_jobs(cfg, work, models, only)
    rows.append(GPU_ROW)
    print(f"\n{table(rows)}\n\n({time.perf_counter() - started:.0f} s)")
    if args.write:
        command = "python -m ops.bench" + (" --quick" if args.quick else "")
        write(args.write, section(rows, [], command))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
