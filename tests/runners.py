"""The two model runners of vLLM 0.32/0.33, for the tests' servers and engines.

On a GPU vLLM runs Model Runner V2 (``vllm/v1/worker/gpu/``); the CPU build
runs V1 because PyPI's Triton has no CPU backend. ``V2`` here runs V2 on this
machine through the test-only shim ``tests/v2_runner_shim/sitecustomize.py``
(Triton's interpreter and a stand-in CPU backend): see that file. The plugin
never imports either.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNNERS = ("V1", "V2")
SHIM = Path(__file__).resolve().parent / "v2_runner_shim"
# What each runner's worker logs at start-up (vllm/v1/worker/cpu_worker.py,
# vllm/config/vllm.py): a server is checked to run the runner it was asked for.
LOG_LINE = {
    "V1": "Model Runner V2 requires Triton; using the V1 model runner instead",
    "V2": "Using V2 Model Runner",
}


def runner_env(runner: str) -> dict[str, str]:
    """Environment that makes a vLLM process (and its children) use ``runner``."""
    if runner == "V1":
        return {}
    if runner != "V2":
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    path = os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p)
    return {"HIVTP_TEST_V2_RUNNER": "1", "PYTHONPATH": path}


def assert_runs(log: str | Path, runner: str) -> None:
    """The server log at ``log`` says its worker runs ``runner``."""
    text = Path(log).read_text()
    tail = "".join(text.splitlines(True)[-40:])
    assert LOG_LINE[runner] in text, f"{runner} not in use:\n{tail}"
    other = LOG_LINE["V2" if runner == "V1" else "V1"]
    assert other not in text, f"{runner} asked, the other runner in use:\n{tail}"
