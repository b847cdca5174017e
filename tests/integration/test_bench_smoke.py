"""`python -m ops.bench --quick` runs end to end: redis-server, `dreamq api`, the reference apps
and real workers, and prints a table with a number in every row (the GPU row excepted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "Admission: accepted/s",
    "Admission: p99 at",
    "Fetch: fetches/s",
    "Model residency: weight loads",
    "Model residency: cost of switching",
    "Queue overhead",
    "Worker duty cycle: txt2img",
    "Worker duty cycle: img2img",
    "ETA accuracy",
    "GPU:",
)


def test_quick_benchmark_prints_every_row() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ops.bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    for figure in FIGURES:
        found = [row for row in rows if row.startswith(f"| {figure}")]
        assert found, f"no row for {figure!r}:\n{done.stdout}"
        measured = found[0].split(" | ")[1]
        if figure == "GPU:":
            assert "not measured" in measured
        else:
            assert any(char.isdigit() for char in measured), found[0]
