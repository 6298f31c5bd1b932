"""The locust file against a real server: requests succeed, series are recorded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hivtp_vllm.tools.local_server import metric

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


def uniform_images(server) -> float:
    return metric(server.scrape(), "hivtp_images_total", selection="uniform")


def test_locust_records_ttft_e2e_and_prompt_size(shared_plugin_server, tmp_path):
    server = shared_plugin_server  # the plugin with vLLM's defaults, as a user starts it
    full = run_locust(server.url, tmp_path / "full")
    pruned = run_locust(server.url, tmp_path / "pruned", "--hivtp-ratio", "0.25")
    before = uniform_images(server)
    record = tmp_path / "uniform.jsonl"
    uniform = run_locust(
        server.url,
        tmp_path / "uniform",
        "--hivtp-ratio",
        "0.25",
        "--hivtp-selection",
        "uniform",
        "--record",
        str(record),
    )
    for stats in (full, pruned, uniform):
        for name in ("request", "TTFT", "E2E", "OUTPUT_TPS"):
            assert int(stats[name]["Request Count"]) > 0, name
            assert int(stats[name]["Failure Count"]) == 0, name
    # TTFT's content size is the prompt's tokens: 576 -> 144 per image.
    size = {
        k: float(v["TTFT"]["Average Content Size"])
        for k, v in [("full", full), ("pruned", pruned), ("uniform", uniform)]
    }
    assert size["full"] - size["pruned"] == 576 - 144
    assert size["uniform"] == size["pruned"]  # the same K tokens, spread evenly
    # The server ran the uniform baseline on every one of those requests (the
    # per-request records: locust's CSV is written before the last ones end).
    records = [json.loads(line) for line in record.read_text().splitlines()]
    assert records and not any("error" in r for r in records)
    assert uniform_images(server) - before == len(records)
