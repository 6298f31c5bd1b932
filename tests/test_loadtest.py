"""The locust file against a real server: requests succeed, series are recorded."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.server


def run_locust(host: str, out: Path, *extra: str) -> dict[str, dict[str, str]]:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "-u",
        "2",
        "-r",
        "2",
        "-t",
        "12s",
        "--stop-timeout",
        "30",
        "--host",
        host,
        "--csv",
        str(out),
        "--only-summary",
        "--max-tokens",
        "4",
        "--image-sizes",
        "336x336,500x300",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(f"{out}_stats.csv") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_locust_records_ttft_e2e_and_prompt_size(server_factory, tiny_llava, tmp_path):
    server = server_factory(tiny_llava)
    full = run_locust(server.url, tmp_path / "full")
    pruned = run_locust(server.url, tmp_path / "pruned", "--hivtp-ratio", "0.25")
    for stats in (full, pruned):
        for name in ("request", "TTFT", "E2E", "OUTPUT_TPS"):
            assert int(stats[name]["Request Count"]) > 0, name
            assert int(stats[name]["Failure Count"]) == 0, name
    # TTFT's content size is the prompt's tokens: 576 -> 144 per image.
    drop = float(full["TTFT"]["Average Content Size"]) - float(
        pruned["TTFT"]["Average Content Size"]
    )
    assert drop == 576 - 144
    server.stop()
