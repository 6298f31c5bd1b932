"""Load-test runner: the plugin's server, stock vLLM, locust phases, one report.

    .venv/bin/python loadtest/runner.py                     # LLaVA-1.5: 7 phases, ~14 min
    .venv/bin/python loadtest/runner.py --arch llava-next   # any row of hivtp_vllm/families.py
    .venv/bin/python loadtest/runner.py --plan              # what it would run, then exit

What it does, bounded and on loopback only:

1. Makes (once) the random-weight checkpoint of the family (``--arch``,
   ``--size``, default ``bench``) and, where it means something, its ceiling
   twin: the same checkpoint built for half-size tiles (168 px), so the
   tower sees a quarter of the patches and the prompt carries as many
   visual tokens as r = 0.25 keeps, with no pruner to pay for.
2. Starts, side by side on 127.0.0.1, the servers the phases need: vLLM with
   the plugin (phases r, kN and uniformR), stock vLLM on the *same*
   checkpoint (phase ``stock``: ``VLLM_PLUGINS`` names no plugin, requests
   carry no hivtp keys) and stock vLLM on the ceiling twin (``ceiling``).
3. Drives ``locust --headless`` through the phases (LLaVA-1.5 default:
   r = 1.0, 0.5, 0.25, uniform r = 0.25, k = 64, ceiling, stock), every
   phase with the same users, spawn rate and duration; ``--rounds N``
   repeats them, rotated by one each round (round 1's phases, then round
   2's...) and takes medians. Every request's image is new, also across
   phases and rounds. While a phase runs, vLLM's own ``/metrics`` are
   sampled twice a second (running and waiting requests, KV-cache usage,
   prompt tokens, the plugin's image counters); progress every 10 s.
4. Writes a markdown table, the comparisons below, and PNG charts (TTFT
   p50/p90, output and request throughput, peak running requests, against
   the prompt's tokens) into its own section of docs/benchmarks.md
   (``load-<family>``) and docs/img/load-<family>-*.png.

The comparisons, each within one run and one machine:

- HIVTP r = 0.25 vs uniform r = 0.25 (same server, tokens and tower; the
  uniform baseline computes no scores): HIVTP's scoring and selection cost
  under continuous batching.
- r = 1.0 vs stock (same checkpoint, plugin loaded but not pruning vs not
  loaded): what the plugin costs when it does not prune; it should cost
  nothing, i.e. stay within the round-to-round noise.
- r = 0.25 (and uniform r = 0.25) vs the ceiling: the vision tower's cost
  that HIVTP pays by design, since it must see all patches to score them.

Each family's defaults (images, phases, ceiling twin, server options and
the report's notes) are its row's ``Family.load`` in hivtp_vllm/families.py,
the one table of architectures, so a new family needs no change here.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, write_section  # noqa: E402
from hivtp_vllm.families import FAMILIES, Family  # noqa: E402
from hivtp_vllm.tools.local_server import VllmServer, image_data_url, metric  # noqa: E402

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
CEILING, STOCK, UNIFORM = "ceiling", "stock", "uniform"
PLUGIN = "plugin"  # the server a phase runs on: PLUGIN, STOCK or CEILING


@dataclass(frozen=True)
class Phase:
    """One locust run: a per-request pruning setting, or one of the stock servers."""

    name: str  # "1.0", "0.5", "k64", "uniform0.25", "ceiling", "stock"

    @classmethod
    def parse(cls, text: str) -> Phase:
        text = text.strip()
        if text in (CEILING, STOCK):
            return cls(text)
        if text.startswith("k") and text[1:].isdigit() and int(text[1:]) > 0:
            return cls(text)
        prefix = UNIFORM if text.startswith(UNIFORM) else ""
        try:
            ratio = float(text[len(prefix) :])
        except ValueError:
            ratio = -1.0
        if not 0 < ratio <= 1:
            raise argparse.ArgumentTypeError(
                f"phase {text!r}: expected a ratio in (0, 1], kN (N > 0 tokens), uniformR "
                "(the uniform baseline at ratio R), 'ceiling' or 'stock'"
            )
        return cls(f"{prefix}{ratio}")

    @property
    def server(self) -> str:
        """The server this phase runs on."""
        return self.name if self.name in (CEILING, STOCK) else PLUGIN

    @property
    def is_ceiling(self) -> bool:
        return self.name == CEILING

    @property
    def is_uniform(self) -> bool:
        return self.name.startswith(UNIFORM)

    def locust_args(self) -> list[str]:
        if self.server != PLUGIN:
            return []
        if self.name.startswith("k"):
            return ["--hivtp-num-tokens", self.name[1:]]
        if self.is_uniform:
            return ["--hivtp-ratio", self.name[len(UNIFORM) :], "--hivtp-selection", UNIFORM]
        return ["--hivtp-ratio", self.name]

    def mm_kwargs(self) -> dict | None:
        """The request's ``mm_processor_kwargs``, as the locust file sends them."""
        if self.server != PLUGIN:
            return None
        if self.name.startswith("k"):
            return {"hivtp_num_tokens": int(self.name[1:])}
        if self.is_uniform:
            return {
                "hivtp_retain_ratio": float(self.name[len(UNIFORM) :]),
                "hivtp_selection": UNIFORM,
            }
        return {"hivtp_retain_ratio": float(self.name)}

    def label(self) -> str:
        if self.is_ceiling:
            return "ceiling (168 px, no plugin)"
        if self.name == STOCK:
            return "stock (no plugin)"
        if self.name.startswith("k"):
            return f"k = {self.name[1:]}"
        if self.is_uniform:
            return f"uniform r = {self.name[len(UNIFORM) :]}"
        return f"r = {self.name}"


@dataclass
class Samples:
    """vLLM's own gauges and counters, sampled while a phase runs."""

    running: list[float] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)
    kv_usage: list[float] = field(default_factory=list)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    plugin_series: bool = False  # any hivtp_* series in the server's /metrics


COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
)
# The plugin's image counter, by the selection that ran (absent on stock vLLM).
IMAGES = "hivtp_images_total"
SELECTIONS = ("hivtp", UNIFORM)


def sample_once(server: VllmServer, into: Samples) -> None:
    m = server.scrape()
    into.running.append(metric(m, "vllm:num_requests_running"))
    into.waiting.append(metric(m, "vllm:num_requests_waiting"))
    into.kv_usage.append(metric(m, "vllm:kv_cache_usage_perc"))
    counters = {name: metric(m, name) for name in COUNTERS}
    for selection in SELECTIONS:
        counters[f"{IMAGES}:{selection}"] = metric(m, IMAGES, selection=selection)
    into.first = into.first or counters
    into.last = counters
    into.plugin_series = into.plugin_series or any(name.startswith("hivtp_") for name in m)


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

    def delta(name: str) -> float:
        return samples.last.get(name, 0) - samples.first.get(name, 0)

    served, prompt = delta(COUNTERS[2]), delta(COUNTERS[0])
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
        # What the server says it did: images through the plugin's processor by
        # selection, and whether it exports the plugin's series at all.
        "hivtp_images": delta(f"{IMAGES}:hivtp"),
        "uniform_images": delta(f"{IMAGES}:{UNIFORM}"),
        "plugin_metrics": float(samples.plugin_series),
    }


@dataclass(frozen=True)
class Load:
    """What every phase shares: the family's defaults (``Family.load``) as the
    command line overrides them."""

    users: int
    spawn_rate: float
    duration: int
    max_tokens: int
    images: int
    image_sizes: str
    stop_timeout: int = 120
    # Below stop_timeout: a stuck request ends as a recorded error before
    # locust stops waiting for it.
    request_timeout: int = 100


# Each locust run stamps its images from its own base, so no image repeats
# across phases or rounds (vLLM's encoder and prefix caches would answer).
STAMPS_PER_RUN = 1 << 20


def locust_command(url: str, phase: Phase, load: Load, record: Path, stamp_base: int) -> list[str]:
    """The headless locust command line of one phase."""
    return [
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
        url,
        "--max-tokens",
        str(load.max_tokens),
        "--images",
        str(load.images),
        "--image-sizes",
        load.image_sizes,
        "--record",
        str(record),
        "--request-timeout",
        str(load.request_timeout),
        "--stamp-base",
        str(stamp_base),
        *phase.locust_args(),
    ]


def run_phase(
    server: VllmServer, phase: Phase, load: Load, workdir: Path, stamp_base: int = 0
) -> dict[str, float]:
    """One headless locust run against ``server``; returns its summary."""
    record = workdir / f"{phase.name}-{time.monotonic_ns()}.jsonl"
    cmd = locust_command(server.url, phase, load, record, stamp_base)
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
    if not any("error" not in r for r in records):
        # Nothing to compare: say what locust and the records said, not a
        # division by zero in the report.
        errors = sorted({r["error"] for r in records})[:5]
        raise RuntimeError(
            f"phase {phase.label()}: no request completed in {time.monotonic() - started:.0f}s "
            f"({len(records)} failed: {errors}); locust said:\n{output[-3000:]}"
        )
    return summarise(records, samples)


def warm_up(server: VllmServer, phases: list[Phase], image_sizes: str) -> None:
    """First requests compile kernels and fill caches: keep them out of phase 1.
    One request per phase and image size (noise images, never sent again)."""
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in image_sizes.split(",")]
    seed = 9000
    for phase in phases:
        for width, height in sizes:
            seed += 1
            server.timed_stream([image_data_url(seed, width, height)], phase.mm_kwargs())


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def spread(values: list[float]) -> float:
    """Round-to-round range relative to the median (0 for one round)."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if len(values) > 1 and middle else 0.0


def round_order(phases: list[Phase], rounds: int) -> list[tuple[int, Phase]]:
    """(round, phase) in run order: each round rotated by one against the last."""
    order = []
    for r in range(rounds):
        shift = r % len(phases)
        order += [(r, p) for p in phases[shift:] + phases[:shift]]
    return order


def start_servers(models: dict[str, Path], server_args: list[str]) -> dict[str, VllmServer]:
    """The servers by kind (PLUGIN, STOCK, CEILING), started side by side."""
    servers = {
        kind: VllmServer(model, server_args, plugin=kind == PLUGIN)
        for kind, model in models.items()
    }
    for kind, server in servers.items():
        what = "vLLM with the plugin" if kind == PLUGIN else f"stock vLLM ({kind})"
        print(f"[runner] starting {what} on {server.model}", flush=True)
    with ThreadPoolExecutor(len(servers)) as pool:
        failures = [f for f in [pool.submit(s.start) for s in servers.values()] if f.exception()]
    if failures:
        for server in servers.values():
            server.stop()
        raise failures[0].exception()
    return servers


def run_all(
    models: dict[str, Path],
    phases: list[Phase],
    load: Load,
    rounds: int,
    server_args: list[str],
) -> dict[str, dict[str, float]]:
    """Every phase ``rounds`` times, rotated per round; medians per phase.

    ``models`` maps each server kind the phases need to its checkpoint."""
    kinds = {p.server for p in phases}
    missing = kinds - set(models)
    if missing:
        raise ValueError(f"no checkpoint for the {sorted(missing)} server(s)")
    servers = start_servers({k: models[k] for k in models if k in kinds}, server_args)
    try:
        for kind, server in servers.items():
            warm_up(server, [p for p in phases if p.server == kind], load.image_sizes)
        runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in phases}
        order = round_order(phases, rounds)
        for n, (r, phase) in enumerate(order, 1):
            print(f"[runner] phase {n}/{len(order)} (round {r + 1}): {phase.label()}", flush=True)
            result = run_phase(
                servers[phase.server], phase, load, Path(tempfile.mkdtemp()), n * STAMPS_PER_RUN
            )
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
    results = {}
    for name, per_round in runs.items():
        results[name] = median_of(per_round)
        results[name]["rounds"] = len(per_round)
        for key in ("ttft_p50", "output_tps"):
            results[name][f"{key}_spread"] = spread([run[key] for run in per_round])
    return results


def change(results: dict[str, dict[str, float]], a: str, b: str, key: str) -> float:
    """Relative change of ``key`` from phase ``b`` to phase ``a``."""
    return results[a][key] / results[b][key] - 1


def versus(results: dict[str, dict[str, float]], a: str, b: str) -> str:
    """'p50 TTFT +x%, p90 TTFT +y%, output tokens/s -z%, requests/s -w%' of a against b."""
    return (
        f"p50 TTFT {100 * change(results, a, b, 'ttft_p50'):+.1f}%, "
        f"p90 TTFT {100 * change(results, a, b, 'ttft_p90'):+.1f}%, "
        f"output tokens/s {100 * change(results, a, b, 'output_tps'):+.1f}%, "
        f"requests/s {100 * change(results, a, b, 'request_rps'):+.1f}%"
    )


def comparisons(results: dict[str, dict[str, float]]) -> list[str]:
    """Each comparison the run allows (where both phases ran): what it measures,
    this run's figures, and the issue's goal where it sets one."""
    lines = []
    full, half, quarter = results.get("1.0"), results.get("0.5"), results.get("0.25")
    uniform, ceiling, stock = (
        results.get(f"{UNIFORM}0.25"),
        results.get(CEILING),
        results.get(STOCK),
    )
    if quarter and uniform:
        lines.append(
            "- **HIVTP r = 0.25 vs uniform r = 0.25** (same server, same kept tokens, same "
            "tower; the uniform baseline computes no scores): the cost of HIVTP's scoring and "
            f"selection under continuous batching. HIVTP against uniform: "
            f"{versus(results, '0.25', f'{UNIFORM}0.25')}."
        )
    if full and stock:
        ttft, tps = (
            change(results, "1.0", STOCK, "ttft_p50"),
            change(results, "1.0", STOCK, "output_tps"),
        )
        rounds = int(min(full.get("rounds", 1), stock.get("rounds", 1)))
        if rounds > 1:
            noise_ttft = max(full.get("ttft_p50_spread", 0), stock.get("ttft_p50_spread", 0))
            noise_tps = max(full.get("output_tps_spread", 0), stock.get("output_tps_spread", 0))
            costs = ttft > noise_ttft or tps < -noise_tps
            verdict = (
                f"goal: no cost beyond the round-to-round spread of {100 * noise_ttft:.1f}% "
                f"(TTFT) and {100 * noise_tps:.1f}% (tokens/s) over {rounds} rounds: "
                f"{'missed' if costs else 'met'}"
            )
        else:
            verdict = "goal: no cost; one round gives no noise estimate, run --rounds 2 or more"
        lines.append(
            "- **r = 1.0 vs stock** (same checkpoint; the plugin loaded but not pruning vs not "
            "loaded, same images, no hivtp keys to stock): what the plugin costs when it does "
            f"not prune. r = 1.0 against stock: {versus(results, '1.0', STOCK)} ({verdict})."
        )
    if quarter and ceiling:
        ttft = change(results, "0.25", CEILING, "ttft_p50")
        tps = change(results, "0.25", CEILING, "output_tps")
        ok = ttft <= 0.10 and tps >= -0.10  # better than the ceiling counts as within
        line = (
            "- **r = 0.25 vs the ceiling** (as many visual tokens; the ceiling's tower sees a "
            "quarter of the patches): the tower's cost that HIVTP pays by design, since it must "
            f"see all patches to score them, plus scoring and selection. r = 0.25 against the "
            f"ceiling: {versus(results, '0.25', CEILING)} (goal: p50 TTFT and output tokens/s "
            f"within 10%: {'met' if ok else 'missed'})."
        )
        lines.append(line)
        if uniform:
            lines.append(
                "- **uniform r = 0.25 vs the ceiling**: the full-resolution tower alone (no "
                "scores). Uniform against the ceiling: "
                f"{versus(results, f'{UNIFORM}0.25', CEILING)}."
            )
    if full and half:
        cut = 1 - half["ttft_p50"] / full["ttft_p50"]
        verdict = "met" if cut >= 0.35 else "missed"
        lines.append(
            f"- **r = 0.5 vs r = 1.0**: p50 TTFT cut by {100 * cut:.1f}% (goal >= 35%: {verdict})."
        )
    if full:
        lines.append(
            f"- Requests waiting at r = 1.0: peak {full['peak_waiting']:.0f}, in "
            f"{100 * full['waiting_share']:.0f}% of the samples."
        )
    return lines


CHARTS = (
    ("ttft", "TTFT (s)", ("ttft_p50", "p50"), ("ttft_p90", "p90")),
    ("output-throughput", "output tokens / s", ("output_tps", "output tokens/s"), None),
    ("request-throughput", "requests / s", ("request_rps", "requests/s"), None),
    ("peak-running", "peak running requests", ("peak_running", "peak running"), None),
)


def chart_path(img_dir: Path, slug: str, chart: str) -> Path:
    return img_dir / f"load-{slug}-{chart}.png"


# Marker per phase kind: (first series, second series).
MARKERS = {UNIFORM: ("X", "x"), CEILING: ("*", "P"), STOCK: ("D", "d")}


def charts(
    results: dict[str, dict[str, float]],
    phases: list[Phase],
    img_dir: Path,
    slug: str,
    title: str,
) -> list[Path]:
    """One PNG per figure against the prompt's tokens (median per request):
    HIVTP's phases as a line, uniform, ceiling and stock as single marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tokens(p: Phase) -> float:
        return results[p.name]["prompt_tokens"]

    hivtp = sorted((p for p in phases if p.server == PLUGIN and not p.is_uniform), key=tokens)
    marks = [p for p in phases if p.is_uniform or p.server != PLUGIN]
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chart, ylabel, *series in CHARTS:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for which, spec in enumerate(series):
            if spec is None:
                continue
            key, name = spec
            xs = [tokens(p) for p in hivtp]
            ax.plot(
                xs,
                [results[p.name][key] for p in hivtp],
                ("o-", "s--")[which],
                label=f"HIVTP {name}",
            )
            if which == 0:  # label the first series only
                for p, x in zip(hivtp, xs, strict=True):
                    ax.annotate(p.label(), (x, results[p.name][key]), fontsize=7)
            for p in marks:
                kind = UNIFORM if p.is_uniform else p.server
                ax.plot(
                    [tokens(p)],
                    [results[p.name][key]],
                    MARKERS[kind][which],
                    markersize=10 if which == 0 else 8,
                    alpha=0.8,
                    zorder=1,  # under HIVTP's line: uniform r = 0.25 sits on r = 0.25
                    label=f"{p.label()} {name}",
                )
        ax.set_xlabel("prompt tokens per request (median)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = chart_path(img_dir, slug, chart)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def report(
    results: dict[str, dict[str, float]],
    phases: list[Phase],
    family: Family,
    size: str,
    load: Load,
    rounds: int,
    command: str,
    images: list[Path],
    doc: Path,
) -> str:
    rel = [os.path.relpath(p, doc.parent) for p in images]
    servers = ["the plugin's (phases r, k and uniform)"]
    if any(p.server == STOCK for p in phases):
        servers.append("stock vLLM on the same checkpoint (`VLLM_PLUGINS` names no plugin; stock)")
    if any(p.is_ceiling for p in phases):
        servers.append("stock vLLM on the ceiling twin (ceiling)")
    ceiling = family.load.ceiling_note
    lines = [
        f"## {family.title} under load: continuous batching with locust",
        "",
        f"Command: `{command}` (script: `loadtest/runner.py`).",
        f"Machine: {machine()}; vLLM CPU build, float32, `--enforce-eager`; locust on the "
        "same machine.",
        "",
        f"Model: random-weight `{size}` {family.title} (`make-model --size {size} --arch "
        f"{family.name}`). Servers, side by side: {'; '.join(servers)}.",
        "",
        f"Load per phase: {load.users} users (spawn {load.spawn_rate}/s), {load.duration} s, "
        f"streaming chat, {load.images} image(s) per request from {load.image_sizes}, every "
        f"image new, {load.max_tokens} output tokens; {rounds} round(s), phases rotated, "
        f"medians. {ceiling}",
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
    lines += ["", "What each comparison measures, and this run's figures (issues #4, #14):"]
    lines += [*comparisons(results), ""]
    if family.load.reading:  # the family's own paragraph, where its results need one
        lines += [*family.load.reading, ""]
    lines += [f"![{Path(p).stem}]({p})" for p in rel]
    return "\n".join(lines)


def model_dirs(models: Path, size: str, family: Family) -> dict[str, Path]:
    """Checkpoint directory by server kind (PLUGIN and STOCK share one)."""
    model = models / f"{size}-{family.name}"
    dirs = {PLUGIN: model, STOCK: model}
    if family.load.ceiling_px:
        dirs[CEILING] = models / f"{size}-{family.name}-{family.load.ceiling_px}"
    return dirs


def ensure_models(models: Path, size: str, family: Family) -> dict[str, Path]:
    """Makes the family's checkpoints that are missing; returns model_dirs."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    dirs = model_dirs(models, size, family)
    for kind, path in dirs.items():
        if not (path / "config.json").exists():
            image_size = family.load.ceiling_px if kind == CEILING else None
            make_checkpoint(path, size=size, arch=family.name, image_size=image_size)
    return dirs


def estimate_s(phases: list[Phase], load: Load, rounds: int) -> int:
    """A rough bound on the run's wall time on 2 cores: each phase's duration
    plus locust start and drain, plus starting the servers and warming up."""
    servers = len({p.server for p in phases})
    return rounds * len(phases) * (load.duration + 30) + 60 * servers + 10 * len(phases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch", choices=list(FAMILIES), default="llava", help="model family (families.py)"
    )
    parser.add_argument("--size", default="bench", help="make-model size (default bench)")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--phases", help="comma-separated (default: the family's)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=8)
    parser.add_argument("--duration", type=int, default=60, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--image-sizes", help="WxH list (default: the family's)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--section", help="report section (default load-<family>)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra vLLM option (repeatable)"
    )
    parser.add_argument("--plan", action="store_true", help="print what would run, then exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    family = FAMILIES[args.arch]
    phases = [Phase.parse(p) for p in (args.phases or family.load.phases).split(",")]
    if any(p.is_ceiling for p in phases) and not family.load.ceiling_px:
        parser.error(f"no ceiling phase for {family.name}: {family.load.ceiling_note}")
    section = args.section or f"load-{family.slug}"
    load = Load(
        args.users,
        args.spawn_rate,
        args.duration,
        args.max_tokens,
        args.images,
        args.image_sizes or family.load.image_sizes,
    )
    server_args = [*family.load.server_args, *args.server_arg]  # the user's come last and win
    dirs = {
        k: v
        for k, v in model_dirs(args.models, args.size, family).items()
        if k in {p.server for p in phases}
    }
    bound = estimate_s(phases, load, args.rounds)
    print(
        f"[runner] {family.title}: {args.rounds} x {len(phases)} phases of {args.duration}s "
        f"({', '.join(p.label() for p in phases)}), about {bound // 60} min",
        flush=True,
    )
    print(f"[runner] servers: {', '.join(f'{k} on {v}' for k, v in dirs.items())}", flush=True)
    print(
        f"[runner] images {load.image_sizes}; server args {' '.join(server_args) or '(none)'}; "
        f"section {section} of {args.report}; charts "
        f"{', '.join(chart_path(args.img_dir, family.slug, c).name for c, *_ in CHARTS)}",
        flush=True,
    )
    if args.plan:
        return 0
    models = ensure_models(args.models, args.size, family)
    results = run_all(models, phases, load, args.rounds, server_args)
    title = f"{args.size} {family.title}, {args.users} users, {args.max_tokens} output tokens"
    images = charts(results, phases, args.img_dir, family.slug, title)
    command = ".venv/bin/python loadtest/runner.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    body = report(
        results, phases, family, args.size, load, args.rounds, command.strip(), images, args.report
    )
    write_section(section, body, args.report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
