"""The GPU benchmark script runs end to end (here on CPU, at a tiny size)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_smoke_run_on_cpu():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_transformers.py"),
        "--config=tiny",
        "--device=cpu",
        "--no-write",
        "--reps=1",
        "--batches=1,2",
        "--ratios=1.0,0.25",
        "--text-tokens=16",
        "--decode-tokens=2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    table = [row.split("|")[1:-1] for row in rows if row.count("|") == 8]
    body = [[cell.strip() for cell in row] for row in table if row[0].strip().isdigit()]
    # batch, ratio, kept, prompt: the prompt is the kept visual tokens + 16 text tokens.
    assert [(r[0], r[1], r[2], r[3]) for r in body] == [
        ("1", "1.0", "576", "592"),
        ("1", "0.25", "144", "160"),
        ("2", "1.0", "576", "592"),
        ("2", "0.25", "144", "160"),
    ]
    overhead = [row for row in rows if row.count("|") == 6 and row[2].isdigit()]
    assert len(overhead) == 2


def test_gpu_script_refuses_cuda_without_a_gpu():
    import os

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a GPU machine
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_transformers.py"), "--device=cuda"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
