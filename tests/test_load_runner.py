"""The load-test runner: phase parsing, figures, and one short real run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))

import runner  # noqa: E402

from hivtp_vllm.families import FAMILIES  # noqa: E402


def test_phases_parse_and_refuse_with_the_allowed_forms():
    names = ("1", "0.25", "k64", "uniform0.25", "uniform.5", "ceiling", "stock")
    assert [runner.Phase.parse(p).name for p in names] == [
        "1.0",
        "0.25",
        "k64",
        "uniform0.25",
        "uniform0.5",
        "ceiling",
        "stock",
    ]
    for bad in ("0", "1.5", "k0", "kx", "half", "uniform", "uniform0", "uniformk64", "stock2"):
        with pytest.raises(Exception, match=r"ratio in \(0, 1\], kN .* uniformR"):
            runner.Phase.parse(bad)


@pytest.mark.parametrize(
    "name, server, args, kwargs, label",
    [
        ("k64", "plugin", ["--hivtp-num-tokens", "64"], {"hivtp_num_tokens": 64}, "k = 64"),
        ("0.5", "plugin", ["--hivtp-ratio", "0.5"], {"hivtp_retain_ratio": 0.5}, "r = 0.5"),
        (
            "uniform0.25",
            "plugin",
            ["--hivtp-ratio", "0.25", "--hivtp-selection", "uniform"],
            {"hivtp_retain_ratio": 0.25, "hivtp_selection": "uniform"},
            "uniform r = 0.25",
        ),
        ("ceiling", "ceiling", [], None, "ceiling (168 px, no plugin)"),
        ("stock", "stock", [], None, "stock (no plugin)"),
    ],
)
def test_each_phase_sends_its_kwargs_to_its_server(name, server, args, kwargs, label):
    phase = runner.Phase.parse(name)
    assert (phase.server, phase.locust_args(), phase.mm_kwargs(), phase.label()) == (
        server,
        args,
        kwargs,
        label,
    )
    load = runner.Load(2, 2, 6, 4, 1, "336x336")
    cmd = runner.locust_command("http://h:1", phase, load, Path("r.jsonl"), 3 << 20)
    assert cmd[-len(args) - 2 :] == ["--stamp-base", str(3 << 20), *args]


class StuckServer:
    """A loopback HTTP server that answers /v1/models and /metrics but never
    answers a chat request: a server that hangs, for the runner to face."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = b'{"data": [{"id": "m"}]}' if self.path == "/v1/models" else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                threading.Event().wait(60)  # never answers in the test's time

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def scrape(self) -> dict:
        return {}


def test_a_phase_whose_requests_all_hang_fails_with_what_locust_recorded(tmp_path):
    """A CI run once saw every request of a phase hang: locust waited out its
    --stop-timeout, recorded nothing, and the report died on a division by
    zero. A request past --request-timeout is now a recorded error, and a
    phase that completes no request stops the run and says why."""
    # Three seconds of run, so the one user has surely sent its request on a
    # busy machine (a one-second run once ended before it had).
    load = runner.Load(1, 1, 3, 4, 1, "336x336", stop_timeout=30, request_timeout=2)
    assert "--request-timeout" in runner.locust_command(
        "u", runner.Phase.parse("1"), load, Path("r"), 0
    )
    server = StuckServer()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"phase r = 1.0: no request completed") as info:
        runner.run_phase(server, runner.Phase.parse("1"), load, tmp_path)
    assert "Read timed out" in str(info.value)
    assert time.monotonic() - started < 25  # the request timeout, not the stop timeout
    server.httpd.shutdown()


def test_rounds_rotate_and_every_run_gets_its_own_images():
    phases = [runner.Phase.parse(p) for p in ("1.0", "0.25", "stock")]
    order = [(r, p.name) for r, p in runner.round_order(phases, 2)]
    assert order == [
        (0, "1.0"),
        (0, "0.25"),
        (0, "stock"),
        (1, "0.25"),
        (1, "stock"),
        (1, "1.0"),
    ]
    assert runner.spread([1.0, 1.2, 1.1]) == pytest.approx(0.2 / 1.1)
    assert runner.spread([3.0]) == 0.0


@pytest.mark.parametrize(
    "arch, ceiling_dir, images, section",
    [
        ("llava", "tiny-llava-168", "336x336,672x336,500x500", "load-llava-1.5"),
        ("llava-next", "tiny-llava-next-168", "672x672", "load-llava-next"),
        ("llava-onevision", None, "768x768", "load-llava-onevision"),
        ("qwen2.5-vl", None, "896x896", "load-qwen2.5-vl"),
        ("qwen3-vl", None, "896x896", "load-qwen3-vl"),
    ],
)
def test_arch_selects_checkpoints_phases_and_names(
    arch, ceiling_dir, images, section, tmp_path, monkeypatch, capsys
):
    made = []

    def fake_make(out_dir, size, arch, image_size=None):
        made.append((Path(out_dir).name, size, arch, image_size))
        (Path(out_dir)).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")

    import hivtp_vllm.tools.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "make_checkpoint", fake_make)
    family = FAMILIES[arch]
    dirs = runner.ensure_models(tmp_path, "tiny", family)
    assert dirs["plugin"] == dirs["stock"] == tmp_path / f"tiny-{arch}"
    want = [(f"tiny-{arch}", "tiny", arch, None)]
    if ceiling_dir:
        want.append((ceiling_dir, "tiny", arch, 168))
        assert dirs["ceiling"] == tmp_path / ceiling_dir
    else:
        assert "ceiling" not in dirs
    assert made == want
    runner.ensure_models(tmp_path, "tiny", family)  # made once
    assert len(made) == len(want)

    assert runner.main([f"--arch={arch}", "--size=tiny", f"--models={tmp_path}", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert f"images {images};" in plan and f"section {section} of" in plan
    slug = section.removeprefix("load-")
    for chart, *_ in runner.CHARTS:
        assert f"load-{slug}-{chart}.png" in plan
    assert "uniform r = 0.25" in plan and "stock (no plugin)" in plan
    assert ("ceiling (168 px" in plan) == bool(ceiling_dir)
    if not ceiling_dir:
        assert "--max-model-len 8192" in plan
        with pytest.raises(SystemExit):
            runner.main([f"--arch={arch}", "--phases=1.0,ceiling", "--plan"])
        assert family.load.ceiling_note in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_every_row_of_the_table_plans_from_its_own_defaults(family, tmp_path, capsys):
    """A new row needs no change to the runner: its plan comes from ``family.load``."""
    assert runner.main([f"--arch={family.name}", f"--models={tmp_path}", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith(f"[runner] {family.title}: 1 x ")
    assert f"images {family.load.image_sizes};" in plan
    assert f"section load-{family.slug} of" in plan
    assert f"server args {' '.join(family.load.server_args) or '(none)'};" in plan
    assert f"bench-{family.name}" in plan
    ceiling = f"ceiling on {tmp_path / f'bench-{family.name}-{family.load.ceiling_px}'}"
    assert (ceiling in plan) == ("ceiling" in family.load.phases.split(","))
    assert not list(tmp_path.iterdir())  # a plan makes no checkpoint


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


def test_comparisons_name_what_they_measure_and_read_the_goals():
    base = {
        "ttft_p50": 1.0,
        "ttft_p90": 2.0,
        "output_tps": 100.0,
        "request_rps": 1.0,
        "peak_waiting": 3,
        "waiting_share": 0.5,
        "rounds": 1,
    }
    results = {
        "1.0": base,
        "0.5": {**base, "ttft_p50": 0.66},
        "0.25": {**base, "ttft_p50": 0.30, "output_tps": 89.0},
        "uniform0.25": {**base, "ttft_p50": 0.25, "output_tps": 100.0},
        "ceiling": {**base, "ttft_p50": 0.28, "output_tps": 100.0},
        "stock": {**base, "ttft_p50": 0.98},
    }
    lines = runner.comparisons(results)
    text = "\n".join(lines)
    assert "HIVTP r = 0.25 vs uniform r = 0.25" in lines[0]
    assert "scoring and" in lines[0] and "p50 TTFT +20.0%" in lines[0]
    assert "output tokens/s -11.0%" in lines[0]
    assert "r = 1.0 vs stock" in lines[1] and "when it does" in lines[1]
    assert "p50 TTFT +2.0%" in lines[1] and "one round gives no noise estimate" in lines[1]
    assert "r = 0.25 vs the ceiling" in lines[2] and "must see all patches" in lines[2]
    assert "p50 TTFT +7.1%" in lines[2] and "-11.0%" in lines[2] and "missed" in lines[2]
    assert "uniform r = 0.25 vs the ceiling" in lines[3] and "tower alone" in lines[3]
    assert "by 34.0%" in lines[4] and "missed" in lines[4]
    assert "Requests waiting at r = 1.0: peak 3" in text
    results["0.25"]["output_tps"] = 95.0
    assert "met" in runner.comparisons(results)[2]
    # Rounds give a noise band: +2% TTFT is within a 5% spread, not within 1%.
    for name in ("1.0", "stock"):
        results[name] = {**results[name], "rounds": 2, "output_tps_spread": 0.01}
        results[name]["ttft_p50_spread"] = 0.05
    assert "over 2 rounds: met" in runner.comparisons(results)[1]
    results["stock"]["ttft_p50_spread"] = results["1.0"]["ttft_p50_spread"] = 0.01
    assert "over 2 rounds: missed" in runner.comparisons(results)[1]
    # Only the comparisons whose phases ran.
    assert runner.comparisons({"0.25": base, "stock": base}) == []


@pytest.mark.server
def test_short_run_writes_table_charts_and_exact_prompt_sizes(tmp_path):
    report, img, figures = tmp_path / "bench.md", tmp_path / "img", tmp_path / "figures.json"
    phases = ["1.0", "0.25", "uniform0.25", "k64", "ceiling", "stock"]
    cmd = [
        sys.executable,
        str(ROOT / "loadtest" / "runner.py"),
        "--size=tiny",
        f"--models={tmp_path / 'models'}",
        f"--phases={','.join(phases)}",
        "--duration=5",
        "--users=2",
        "--spawn-rate=2",
        "--max-tokens=4",
        f"--report={report}",
        f"--img-dir={img}",
        f"--json={figures}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[runner] phase 6/6 (round 1): stock (no plugin)" in done.stdout  # progress
    assert (tmp_path / "models" / "tiny-llava" / "config.json").exists()
    results = json.loads(figures.read_text())
    assert sorted(results) == sorted(phases)
    for name, figures_of in results.items():
        assert figures_of["requests"] > 0 and figures_of["errors"] == 0, name
        # The client's usage and vLLM's own prompt-token counter agree.
        assert figures_of["server_prompt_tokens"] == figures_of["prompt_tokens"], name
    prompt = {name: r["prompt_tokens"] for name, r in results.items()}
    assert prompt["1.0"] - prompt["0.25"] == 576 - 144
    assert prompt["1.0"] - prompt["k64"] == 576 - 64
    assert prompt["uniform0.25"] == prompt["0.25"]  # same K, spread evenly
    assert prompt["ceiling"] == prompt["0.25"]  # 168 px: 144 visual tokens, no pruning
    assert prompt["stock"] == prompt["1.0"]  # same checkpoint, nothing pruned
    # The servers say what ran: the plugin's counters by selection on its own
    # server; stock and the ceiling export no hivtp series at all.
    for name in ("1.0", "0.25", "k64"):
        assert results[name]["hivtp_images"] == results[name]["requests"], name
        assert results[name]["uniform_images"] == 0, name
    uniform = results["uniform0.25"]
    assert (uniform["uniform_images"], uniform["hivtp_images"]) == (uniform["requests"], 0)
    assert all(results[name]["plugin_metrics"] == 1 for name in ("1.0", "0.25", "uniform0.25"))
    for name in ("stock", "ceiling"):
        assert results[name]["plugin_metrics"] == 0, name
        assert results[name]["hivtp_images"] == results[name]["uniform_images"] == 0, name

    text = report.read_text()
    assert "<!-- load-llava-1.5: begin -->" in text
    assert "## LLaVA-1.5 under load" in text
    for row in (
        "| r = 1.0 |",
        "| r = 0.25 |",
        "| uniform r = 0.25 |",
        "| k = 64 |",
        "| ceiling (168 px, no plugin) |",
        "| stock (no plugin) |",
    ):
        assert row in text
    for comparison in (
        "**HIVTP r = 0.25 vs uniform r = 0.25**",
        "cost of HIVTP's scoring and selection under continuous batching",
        "**r = 1.0 vs stock**",
        "what the plugin costs when it does not prune",
        "**r = 0.25 vs the ceiling**",
        "the tower's cost that HIVTP pays by design",
    ):
        assert comparison in text
    charts = sorted(p.name for p in img.glob("*.png"))
    assert charts == sorted(f"load-llava-1.5-{name}.png" for name, *_ in runner.CHARTS)
    for chart in charts:
        assert f"(img/{chart})" in text
        with Image.open(img / chart) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 200
