"""The table: one row per figure, printed as Markdown and written into docs/performance.md."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BEGIN = "<!-- bench:begin (written by `python -m ops.bench --write`) -->"
END = "<!-- bench:end -->"


_STARTED = time.perf_counter()


def progress(text: str) -> None:
    """A line on stderr with the seconds since the suite started."""
    print(
        f"ops.bench: {time.perf_counter() - _STARTED:5.1f} s: {text}", file=sys.stderr, flush=True
    )


@dataclass(frozen=True)
class Row:
    figure: str
    measured: str
    reference: str
    target: str
    met: bool | None
    """None: no target, or not measured."""


def verdict(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**not met**")


def table(rows: list[Row]) -> str:
    lines = ["| figure | measured | beside it, same run | target | |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.figure} | {r.measured} | {r.reference} | {r.target} | {verdict(r.met)} |"
        for r in rows
    ]
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or platform.machine()
    with_cpu = Path("/proc/cpuinfo")
    if with_cpu.exists():
        found = re.search(r"model name\s*:\s*(.+)", with_cpu.read_text())
        model = found.group(1).strip() if found else model
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        found = re.search(r"MemTotal:\s*(\d+) kB", meminfo.read_text())
        memory = f", {int(found.group(1)) / 2**20:.0f} GiB" if found else ""
    return (
        f"{os.cpu_count()} cores ({model}){memory}, no GPU, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def section(rows: list[Row], notes: list[str], command: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = [
        BEGIN,
        f"Measured {stamp} on {machine()} with `{command}`.",
        "",
        table(rows),
        "",
        *(f"- {note}" for note in notes),
        END,
    ]
    return "\n".join(body)


def write(path: Path, text: str) -> None:
    """Replace the marked section of the page; append it when the page has none yet."""
    page = path.read_text() if path.exists() else "# Performance\n"
    if BEGIN in page and END in page:
        before, rest = page.split(BEGIN, 1)
        _, after = rest.split(END, 1)
        page = before + text + after
    else:
        page = page.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(page)
