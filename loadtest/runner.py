"""Load-test runner: one server, locust phases at several ratios, one report.

    .venv/bin/python loadtest/runner.py                     # ~8 minutes on 2 cores

What it does, bounded and on loopback only:

1. Makes (once) the random-weight ``bench`` LLaVA-1.5 checkpoint and its
   ceiling twin, the same checkpoint built for 168 px images (12 x 12 = 144
   visual tokens: as many as r = 0.25 keeps, with no pruner to pay for).
2. Starts vLLM with the plugin on the bench model, and stock vLLM (plugin
   off) on the ceiling model, each once, on 127.0.0.1.
3. Drives ``locust --headless`` through the phases (default r = 1.0, 0.5,
   0.25, k = 64, then the ceiling), every phase with the same users, spawn
   rate and duration; ``--rounds 2`` repeats them in rotated order and takes
   medians. While a phase runs, vLLM's own ``/metrics`` are sampled twice a
   second (running and waiting requests, KV-cache usage, prompt tokens);
   progress is printed every 10 s.
4. Writes a markdown table and PNG charts (TTFT p50/p90, output and request
   throughput, peak running requests, each against the share of visual
   tokens kept) into docs/benchmarks.md and docs/img/.

Client-side figures come from the locust file's per-request records
(``--record``): TTFT = time to the first streamed content chunk; output
throughput = output tokens of all requests / (last end - first start).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, write_section  # noqa: E402
from hivtp_vllm.tools.local_server import VllmServer, metric  # noqa: E402

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SECTION = "load-llava-1.5"
CEILING = "ceiling"


@dataclass(frozen=True)
class Phase:
    """One locust run: a per-request pruning setting, or the ceiling model."""

    name: str  # "1.0", "0.5", "k64", "ceiling"

    @classmethod
    def parse(cls, text: str) -> Phase:
        text = text.strip()
        if text == CEILING:
            return cls(text)
        if text.startswith("k") and text[1:].isdigit() and int(text[1:]) > 0:
            return cls(text)
        try:
            ratio = float(text)
        except ValueError:
            ratio = -1.0
        if not 0 < ratio <= 1:
            raise argparse.ArgumentTypeError(
                f"phase {text!r}: expected a ratio in (0, 1], kN (N > 0 tokens) or 'ceiling'"
            )
        return cls(str(ratio))

    @property
    def is_ceiling(self) -> bool:
        return self.name == CEILING

    def locust_args(self) -> list[str]:
        if self.is_ceiling:
            return []
        if self.name.startswith("k"):
            return ["--hivtp-num-tokens", self.name[1:]]
        return ["--hivtp-ratio", self.name]

    def mm_kwargs(self) -> dict | None:
        """The request's ``mm_processor_kwargs``, as the locust file sends them."""
        if self.is_ceiling:
            return None
        if self.name.startswith("k"):
            return {"hivtp_num_tokens": int(self.name[1:])}
        return {"hivtp_retain_ratio": float(self.name)}

    def label(self) -> str:
        if self.is_ceiling:
            return "ceiling (168 px, no plugin)"
        return f"k = {self.name[1:]}" if self.name.startswith("k") else f"r = {self.name}"


@dataclass
class Samples:
    """vLLM's own gauges and counters, sampled while a phase runs."""

    running: list[float] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)
    kv_usage: list[float] = field(default_factory=list)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)


COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
)


def sample_once(server: VllmServer, into: Samples) -> None:
    m = server.scrape()
    into.running.append(metric(m, "vllm:num_requests_running"))
    into.waiting.append(metric(m, "vllm:num_requests_waiting"))
    into.kv_usage.append(metric(m, "vllm:kv_cache_usage_perc"))
    counters = {name: metric(m, name) for name in COUNTERS}
    into.first = into.first or counters
    into.last = counters


class Sampler(threading.Thread):
    """Polls /metrics every ``period`` seconds until stopped."""

    def __init__(self, server: VllmServer, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.samples = Samples()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                sample_once(self.server, self.samples)
            except Exception:  # a slow scrape under load: skip this sample
                pass
            self.done.wait(self.period)

    def stop(self) -> Samples:
        self.done.set()
        self.join()
        sample_once(self.server, self.samples)  # final counters, server idle now
        return self.samples


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(records: list[dict], samples: Samples) -> dict[str, float]:
    """Figures of one phase from the locust records and the /metrics samples."""
    ok = [r for r in records if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    start = min((r["start"] for r in ok), default=0.0)
    end = max((r["start"] + r["e2e"] for r in ok), default=0.0)
    span = max(end - start, 1e-9)
    served = samples.last.get(COUNTERS[2], 0) - samples.first.get(COUNTERS[2], 0)
    prompt = samples.last.get(COUNTERS[0], 0) - samples.first.get(COUNTERS[0], 0)
    return {
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "prompt_tokens": statistics.median([r["prompt_tokens"] for r in ok]) if ok else 0,
        "server_prompt_tokens": prompt / served if served else 0.0,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "e2e_p50": percentile([r["e2e"] for r in ok], 50),
        "output_tps": sum(r["output_tokens"] for r in ok) / span,
        "request_rps": len(ok) / span,
        "peak_running": max(samples.running, default=0.0),
        "peak_waiting": max(samples.waiting, default=0.0),
        "waiting_share": (
            sum(w > 0 for w in samples.waiting) / len(samples.waiting) if samples.waiting else 0.0
        ),
        "peak_kv": 100 * max(samples.kv_usage, default=0.0),
    }


@dataclass(frozen=True)
class Load:
    """What every phase shares."""

    users: int
    spawn_rate: float
    duration: int
    max_tokens: int
    images: int
    image_sizes: str
    stop_timeout: int = 120


def run_phase(server: VllmServer, phase: Phase, load: Load, workdir: Path) -> dict[str, float]:
    """One headless locust run against ``server``; returns its summary."""
    record = workdir / f"{phase.name}-{time.monotonic_ns()}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--loglevel",
        "WARNING",
        "-u",
        str(load.users),
        "-r",
        str(load.spawn_rate),
        "-t",
        f"{load.duration}s",
        "--stop-timeout",
        str(load.stop_timeout),
        "--host",
        server.url,
        "--max-tokens",
        str(load.max_tokens),
        "--images",
        str(load.images),
        "--image-sizes",
        load.image_sizes,
        "--record",
        str(record),
        *phase.locust_args(),
    ]
    sampler = Sampler(server)
    sampler.start()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    limit = load.duration + load.stop_timeout + 60
    next_report = 10.0
    while proc.poll() is None:
        elapsed = time.monotonic() - started
        if elapsed > limit:
            proc.kill()
            raise TimeoutError(f"locust phase {phase.name} ran past {limit}s")
        if elapsed >= next_report:
            s = sampler.samples
            done = record.read_text().count("\n") if record.exists() else 0
            print(
                f"  [{phase.label()}] {elapsed:4.0f}/{load.duration}s  done {done:4d}  "
                f"running {s.running[-1] if s.running else 0:.0f}  "
                f"waiting {s.waiting[-1] if s.waiting else 0:.0f}  "
                f"KV {100 * (s.kv_usage[-1] if s.kv_usage else 0):.0f}%",
                flush=True,
            )
            next_report += 10.0
        time.sleep(0.5)
    output = proc.stdout.read() if proc.stdout else ""
    samples = sampler.stop()
    if proc.returncode not in (0, 1):  # 1: some requests failed, counted below
        raise RuntimeError(f"locust failed ({proc.returncode}):\n{output[-3000:]}")
    records = (
        [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    )
    return summarise(records, samples)


def warm_up(server: VllmServer, phases: list[Phase]) -> None:
    """First requests compile kernels and fill caches: keep them out of phase 1."""
    from hivtp_vllm.tools.local_server import image_data_url

    for i, phase in enumerate(phases):
        server.timed_stream([image_data_url(9000 + i)], phase.mm_kwargs(), max_tokens=4)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def run_all(
    model: Path,
    ceiling_model: Path | None,
    phases: list[Phase],
    load: Load,
    rounds: int,
    server_args: list[str],
) -> dict[str, dict[str, float]]:
    """Every phase ``rounds`` times, rotated per round; medians per phase."""
    servers: dict[bool, VllmServer] = {}
    try:
        print(f"[runner] starting vLLM with the plugin on {model}", flush=True)
        servers[False] = VllmServer(model, server_args)
        servers[False].start()
        warm_up(servers[False], [p for p in phases if not p.is_ceiling])
        if any(p.is_ceiling for p in phases):
            if ceiling_model is None:
                raise ValueError("the ceiling phase needs --ceiling-model")
            print(f"[runner] starting stock vLLM on the ceiling {ceiling_model}", flush=True)
            servers[True] = VllmServer(ceiling_model, server_args, plugin=False)
            servers[True].start()
            warm_up(servers[True], [Phase(CEILING)])
        runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in phases}
        total = rounds * len(phases)
        for r in range(rounds):
            order = phases[r % len(phases) :] + phases[: r % len(phases)]
            for i, phase in enumerate(order):
                n = r * len(phases) + i + 1
                print(f"[runner] phase {n}/{total}: {phase.label()}", flush=True)
                result = run_phase(servers[phase.is_ceiling], phase, load, Path(tempfile.mkdtemp()))
                runs[phase.name].append(result)
                print(
                    f"[runner]   {result['requests']} requests, {result['errors']} errors, "
                    f"TTFT p50 {result['ttft_p50']:.3f}s, {result['output_tps']:.1f} output tok/s, "
                    f"peak waiting {result['peak_waiting']:.0f}",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    return {name: median_of(results) for name, results in runs.items()}


def kept_share(phase: Phase, tokens_per_image: int = 576) -> float:
    """Share of the full model's visual tokens the phase's prompt carries."""
    if phase.is_ceiling:
        return 0.25
    if phase.name.startswith("k"):
        return int(phase.name[1:]) / tokens_per_image
    return float(phase.name)


def goals(results: dict[str, dict[str, float]]) -> list[str]:
    """The issue's goals, checked on this run's figures (where the phases ran)."""
    lines = []
    full, half, quarter = results.get("1.0"), results.get("0.5"), results.get("0.25")
    ceiling = results.get(CEILING)
    if full and half:
        cut = 1 - half["ttft_p50"] / full["ttft_p50"]
        verdict = "met" if cut >= 0.35 else "missed"
        lines.append(
            f"- r = 0.5 cuts p50 TTFT by {100 * cut:.1f}% against r = 1.0 (goal >= 35%: {verdict})."
        )
    if quarter and ceiling:
        ttft = quarter["ttft_p50"] / ceiling["ttft_p50"] - 1
        tps = quarter["output_tps"] / ceiling["output_tps"] - 1
        ok = ttft <= 0.10 and tps >= -0.10  # better than the ceiling counts as within
        lines.append(
            f"- r = 0.25 against the ceiling: p50 TTFT {100 * ttft:+.1f}%, output tokens/s "
            f"{100 * tps:+.1f}% (goal: within 10%: {'met' if ok else 'missed'})."
        )
    if full:
        lines.append(
            f"- Requests waiting at r = 1.0: peak {full['peak_waiting']:.0f}, in "
            f"{100 * full['waiting_share']:.0f}% of the samples."
        )
    return lines


CHARTS = (
    ("load-ttft.png", "TTFT (s)", ("ttft_p50", "p50"), ("ttft_p90", "p90")),
    ("load-output-throughput.png", "output tokens / s", ("output_tps", "output tokens/s"), None),
    ("load-request-throughput.png", "requests / s", ("request_rps", "requests/s"), None),
    ("load-peak-running.png", "peak running requests", ("peak_running", "peak running"), None),
)


def charts(
    results: dict[str, dict[str, float]], phases: list[Phase], img_dir: Path, title: str
) -> list[Path]:
    """One PNG per figure against the share of visual tokens kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = sorted((p for p in phases if not p.is_ceiling), key=kept_share)
    ceiling = next((p for p in phases if p.is_ceiling), None)
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, ylabel, *series in CHARTS:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for spec, marker in zip(series, ("o-", "s--"), strict=True):
            if spec is None:
                continue
            key, name = spec
            xs = [kept_share(p) for p in pruned]
            ax.plot(xs, [results[p.name][key] for p in pruned], marker, label=f"HIVTP {name}")
            for p, x in zip(pruned, xs, strict=True):
                if p.name.startswith("k") and marker == "o-":  # label the first series only
                    ax.annotate(p.label(), (x, results[p.name][key]), fontsize=7)
            if ceiling:
                ax.plot(
                    [kept_share(ceiling)],
                    [results[ceiling.name][key]],
                    "*",
                    markersize=12,
                    label=f"ceiling {name}",
                )
        ax.set_xlabel("visual tokens kept (share of 576 per image)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = img_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


READING = [
    "Reading: the ceiling is cheaper than r = 0.25 in one way pruning cannot be: its",
    "vision tower sees 144 patches, where HIVTP's must see all 576 to score them (the",
    "bench tower takes about 56 ms an image at 336 px and a quarter of that at 168 px;",
    "scoring and selection add 5 ms, see the single-request section). Under continuous",
    "batching each new image's encoding runs inside an engine step, so it delays every",
    "running request's next token, not only its own first one. The LLaVA-1.5-7B tower",
    "is a smaller share of a step, so the gap there should be smaller; it is measured",
    "here only for the bench model.",
]


def report(
    results: dict[str, dict[str, float]],
    phases: list[Phase],
    load: Load,
    rounds: int,
    command: str,
    images: list[Path],
    doc: Path,
) -> str:
    rel = [os.path.relpath(p, doc.parent) for p in images]
    lines = [
        "## LLaVA-1.5 under load: continuous batching with locust",
        "",
        f"Command: `{command}` (script: `loadtest/runner.py`).",
        f"Machine: {machine()}; vLLM CPU build, float32, `--enforce-eager`; locust on the "
        "same machine.",
        "",
        f"Load per phase: {load.users} users (spawn {load.spawn_rate}/s), {load.duration} s, "
        f"streaming chat, {load.images} image(s) per request from {load.image_sizes}, "
        f"{load.max_tokens} output tokens; {rounds} round(s), phases rotated, medians. "
        "The ceiling is the same `bench` checkpoint made for 168 px images (144 visual "
        "tokens, like r = 0.25) on stock vLLM: pruning that costs nothing.",
        "",
        "| phase | prompt tokens | requests | TTFT p50 (s) | TTFT p90 (s) | E2E p50 (s) | "
        "output tok/s | requests/s | peak running | peak waiting | waiting > 0 | peak KV |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        r = results[p.name]
        lines.append(
            f"| {p.label()} | {r['prompt_tokens']:.0f} | {r['requests']:.0f} | "
            f"{r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['e2e_p50']:.2f} | "
            f"{r['output_tps']:.1f} | {r['request_rps']:.2f} | {r['peak_running']:.0f} | "
            f"{r['peak_waiting']:.0f} | {100 * r['waiting_share']:.0f}% | {r['peak_kv']:.1f}% |"
        )
    lines += ["", "Goals (issue #4), this run:", *goals(results), "", *READING, ""]
    lines += [f"![{Path(p).stem}]({p})" for p in rel]
    return "\n".join(lines)


def ensure_models(models: Path, size: str) -> tuple[Path, Path]:
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    model, ceiling = models / f"{size}-llava", models / f"{size}-llava-168"
    if not (model / "config.json").exists():
        make_checkpoint(model, size=size)
    if not (ceiling / "config.json").exists():
        make_checkpoint(ceiling, size=size, image_size=168)
    return model, ceiling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench", help="make-model size (default bench)")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--phases", default="1.0,0.5,0.25,k64,ceiling")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=8)
    parser.add_argument("--duration", type=int, default=60, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--image-sizes", default="336x336,672x336,500x500")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--section", default=SECTION)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra vLLM option (repeatable)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    phases = [Phase.parse(p) for p in args.phases.split(",")]
    load = Load(
        args.users, args.spawn_rate, args.duration, args.max_tokens, args.images, args.image_sizes
    )
    model, ceiling = ensure_models(args.models, args.size)
    bound = args.rounds * len(phases) * (args.duration + 30)
    print(
        f"[runner] {args.rounds} x {len(phases)} phases of {args.duration}s, ~{bound}s", flush=True
    )
    results = run_all(model, ceiling, phases, load, args.rounds, args.server_arg)
    title = f"{args.size} LLaVA-1.5, {args.users} users, {args.max_tokens} output tokens"
    images = charts(results, phases, args.img_dir, title)
    command = ".venv/bin/python loadtest/runner.py " + " ".join(argv or sys.argv[1:])
    body = report(results, phases, load, args.rounds, command.strip(), images, args.report)
    write_section(args.section, body, args.report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
