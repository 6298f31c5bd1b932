"""The soak's 60 s short form against a real server with the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runners import RUNNERS, assert_runs, runner_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.server


@pytest.mark.parametrize("runner", RUNNERS)
def test_short_soak_passes_every_check(tiny_llava, tmp_path, runner):
    """The same shape mix on vLLM's V1 and V2 model runners."""
    summary_file = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(ROOT / "loadtest" / "soak.py"),
        "--duration=60",
        f"--model={tiny_llava}",
        f"--json={summary_file}",
    ]
    env = {**os.environ, **runner_env(runner)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    summary = json.loads(summary_file.read_text())
    assert_runs(summary["server_log"], runner)
    assert done.returncode == 0, json.dumps(summary["checks"]) + str(summary["failures"])
    assert all(summary["checks"].values())
    counts = summary["counts"]
    # Every kind of traffic was really sent, and the totals are not vacuous.
    assert counts["good"] > 50 and counts["dropped"] > 5
    assert sum(1 for key in counts if key.startswith("bad: ")) == 12
    assert summary["metrics"]["images"] == summary["sent"]["images"] > 0
    assert summary["metrics"]["retained"] < summary["metrics"]["input"]
