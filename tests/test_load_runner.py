"""The load-test runner: phase parsing, figures, and one short real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))

import runner  # noqa: E402


def test_phases_parse_and_refuse_with_the_allowed_forms():
    assert [runner.Phase.parse(p).name for p in ("1", "0.25", "k64", "ceiling")] == [
        "1.0",
        "0.25",
        "k64",
        "ceiling",
    ]
    assert runner.Phase.parse("k64").locust_args() == ["--hivtp-num-tokens", "64"]
    assert runner.Phase.parse("0.5").locust_args() == ["--hivtp-ratio", "0.5"]
    assert runner.Phase.parse("ceiling").locust_args() == []
    assert runner.Phase.parse("k64").mm_kwargs() == {"hivtp_num_tokens": 64}
    assert runner.Phase.parse("0.5").mm_kwargs() == {"hivtp_retain_ratio": 0.5}
    assert runner.Phase.parse("ceiling").mm_kwargs() is None
    for bad in ("0", "1.5", "k0", "kx", "half"):
        with pytest.raises(Exception, match=r"ratio in \(0, 1\], kN"):
            runner.Phase.parse(bad)


def test_percentile_matches_linear_interpolation():
    values = [4.0, 1.0, 3.0, 2.0]
    assert runner.percentile(values, 50) == 2.5
    assert runner.percentile(values, 90) == pytest.approx(3.7)
    assert runner.percentile([7.0], 90) == 7.0


def test_summary_throughput_is_tokens_over_the_busy_span():
    records = [
        {"start": 10.0, "ttft": 0.5, "e2e": 2.0, "prompt_tokens": 100, "output_tokens": 10},
        {"start": 11.0, "ttft": 1.5, "e2e": 3.0, "prompt_tokens": 100, "output_tokens": 30},
        {"start": 11.5, "error": "HTTP 500"},
    ]
    samples = runner.Samples(running=[1, 2, 0], waiting=[0, 3, 0], kv_usage=[0.1, 0.4, 0])
    samples.first = dict.fromkeys(runner.COUNTERS, 0.0)
    samples.last = {runner.COUNTERS[0]: 200.0, runner.COUNTERS[1]: 40.0, runner.COUNTERS[2]: 2.0}
    got = runner.summarise(records, samples)
    assert got["requests"] == 2 and got["errors"] == 1
    assert got["output_tps"] == pytest.approx(40 / 4.0)  # 10.0 .. 14.0
    assert got["request_rps"] == pytest.approx(2 / 4.0)
    assert got["ttft_p50"] == pytest.approx(1.0)
    assert got["server_prompt_tokens"] == 100
    assert (got["peak_running"], got["peak_waiting"]) == (2, 3)
    assert got["waiting_share"] == pytest.approx(1 / 3)
    assert got["peak_kv"] == pytest.approx(40.0)


def test_goals_read_the_issue_thresholds():
    base = {"ttft_p50": 1.0, "output_tps": 100.0, "peak_waiting": 3, "waiting_share": 0.5}
    results = {
        "1.0": base,
        "0.5": {**base, "ttft_p50": 0.66},
        "0.25": {**base, "ttft_p50": 0.30, "output_tps": 89.0},
        "ceiling": {**base, "ttft_p50": 0.28, "output_tps": 100.0},
    }
    lines = "\n".join(runner.goals(results))
    assert "by 34.0%" in lines and "missed" in lines.split("\n")[0]
    assert "TTFT +7.1%" in lines and "-11.0%" in lines and "missed" in lines.split("\n")[1]
    results["0.25"]["output_tps"] = 95.0
    assert "met" in runner.goals(results)[1]


@pytest.mark.server
def test_short_run_writes_table_charts_and_exact_prompt_sizes(tmp_path):
    report, img, figures = tmp_path / "bench.md", tmp_path / "img", tmp_path / "figures.json"
    cmd = [
        sys.executable,
        str(ROOT / "loadtest" / "runner.py"),
        "--size=tiny",
        f"--models={tmp_path / 'models'}",
        "--phases=1.0,0.25,k64,ceiling",
        "--duration=6",
        "--users=2",
        "--spawn-rate=2",
        "--max-tokens=4",
        f"--report={report}",
        f"--img-dir={img}",
        f"--json={figures}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[runner] phase 4/4: ceiling" in done.stdout  # progress is shown
    results = json.loads(figures.read_text())
    for name, figures_of in results.items():
        assert figures_of["requests"] > 0 and figures_of["errors"] == 0, name
        # The client's usage and vLLM's own prompt-token counter agree.
        assert figures_of["server_prompt_tokens"] == figures_of["prompt_tokens"], name
    prompt = {name: r["prompt_tokens"] for name, r in results.items()}
    assert prompt["1.0"] - prompt["0.25"] == 576 - 144
    assert prompt["1.0"] - prompt["k64"] == 576 - 64
    assert prompt["ceiling"] == prompt["0.25"]  # 168 px: 144 visual tokens, no pruning
    text = report.read_text()
    for row in ("| r = 1.0 |", "| r = 0.25 |", "| k = 64 |", "| ceiling (168 px, no plugin) |"):
        assert row in text
    charts = sorted(p.name for p in img.glob("*.png"))
    assert charts == sorted(name for name, *_ in runner.CHARTS)
    for chart in charts:
        assert f"(img/{chart})" in text
        with Image.open(img / chart) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 200
