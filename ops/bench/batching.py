"""What one pipeline call for four compatible jobs buys over four calls, on this machine.

    .venv/bin/python -m ops.bench.batching

Runs `Generator.run` four times and `Generator.run_batch` once for the same four txt2img jobs
(own prompts and seeds) on the tiny demo models, five rounds each after a warm-up, and prints the
medians as a table. On a CPU the pipeline is compute-bound per image, so the gain is small; on a
GPU a batch fills the device (the GPU rows of docs/performance.md measure that when one is lent).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROUNDS = 5
CASES = (("demo", 64), ("demo", 128), ("demo-xl", 64))


def _median_seconds(call: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread, as the bench runs
    from dreamq.jobparams import JobParams
    from dreamq.registry import load_registry
    from workers.generate import Generator
    from workers.models import PipelineCache
    from workers.tiny import write_demo_registry

    registry = load_registry(write_demo_registry(Path(tempfile.mkdtemp(prefix="dreamq-batch-"))))
    generator = Generator(PipelineCache(registry, device="cpu"), registry)
    print("| model, size, 4 steps | 4 jobs, one call each | 4 jobs, one batched call | gain |")
    print("|---|---|---|---|")
    for model, size in CASES:
        jobs = [
            JobParams(kind="txt2img", prompt=f"a fox {i}", width=size, height=size, steps=4, seed=i)
            for i in range(4)
        ]

        def alone(model: str = model, jobs: list[JobParams] = jobs) -> None:
            for params in jobs:
                generator.run(model, params)

        def together(model: str = model, jobs: list[JobParams] = jobs) -> None:
            generator.run_batch(model, jobs, inputs=[None] * len(jobs))

        alone()
        together()  # warm-up: the load and the first calls
        one, batch = _median_seconds(alone), _median_seconds(together)
        print(
            f"| {model} {size}x{size} | {one * 1000:.0f} ms ({4 / one:.1f} img/s) "
            f"| {batch * 1000:.0f} ms ({4 / batch:.1f} img/s) | {one / batch:.2f}x |"
        )


if __name__ == "__main__":
    main()
