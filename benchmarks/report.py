"""Write one benchmark's section into docs/benchmarks.md, replacing its last run.

Each benchmark owns a section between two HTML comment markers, so several
benchmarks (LLaVA-1.5, LLaVA-NeXT, load tests) share one report and rerunning
one leaves the others as they were.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here was written by the script named in its section, with the\n"
    "command shown; rerun the command to refresh it. Timings are medians of\n"
    "interleaved runs against one server in one process, compared as ratios.\n"
)


def machine() -> str:
    """A line that says where the figures were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        model = subprocess.run(
            ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        cpu = model or cpu
    except OSError:
        pass
    import os

    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_section(name: str, body: str, report: Path = REPORT) -> None:
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = report.read_text() if report.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
