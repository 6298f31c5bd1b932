"""Prometheus metrics of the plugin, on vLLM's own ``/metrics``.

Two places produce them:

- the multimodal processor, in the API server process(es), counts each
  request's images and visual tokens and observes the effective ratio;
- the model, in the engine's worker process(es), observes the time spent
  scoring and selecting per forward.

vLLM serves ``/metrics`` from the API server. With several API servers it
runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
set before any process starts), and every process's metrics reach the
endpoint through their shared files: plain prometheus_client metrics are
enough. With one API server (the default) the API server shows only its own
in-memory registry, so the worker's histogram travels another way: the
worker writes a snapshot of it to a directory named by ``HIVTP_METRICS_DIR``
(created by the plugin in the API server before the engine starts, inherited
by its processes), and a collector registered in the API server's registry
reads the snapshots at each scrape.

Start-up work (vLLM's multimodal warm-up and memory profiling, which run on
dummy images) counts nothing: those items carry a marker from the processor.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

ENV_DIR = "HIVTP_METRICS_DIR"
RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PRUNING = "hivtp_pruning_seconds"
PRUNING_HELP = "Time spent scoring and selecting visual tokens in the model, per forward."

_lock = threading.Lock()
_frontend: tuple[Counter, Counter, Histogram] | None = None
_pruning: dict[str, object] = {}  # model name -> where its pruning time goes
_pruning_metric: Histogram | None = None
_collector_registered = False


def multiprocess_mode() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def is_server_root() -> bool:
    """True in the process that starts a server (API server or offline LLM).

    vLLM starts its engine and workers with multiprocessing; a process started
    any other way (a shell, a test runner's subprocess) begins a new server,
    even if its environment carries another server's directory.
    """
    return multiprocessing.parent_process() is None


def snapshot_dir() -> Path | None:
    """This server's snapshot directory (None in multiprocess mode)."""
    directory = os.environ.get(ENV_DIR)
    if not directory or multiprocess_mode():
        return None
    if is_server_root() and not _collector_registered:
        return None  # inherited from whoever started us: not ours
    return Path(directory)


def frontend_metrics() -> tuple[Counter, Counter, Histogram]:
    """The processor's counters (created once per process)."""
    global _frontend
    with _lock:
        if _frontend is None:
            _frontend = (
                Counter(
                    "hivtp_images",
                    "Images that went through the HIVTP processor, by selection "
                    "('hivtp' or the 'uniform' baseline).",
                    ["model_name", "selection"],
                ),
                Counter(
                    "hivtp_visual_tokens",
                    "Visual tokens per image: 'input' without pruning, 'retained' after it.",
                    ["model_name", "kind", "selection"],
                ),
                Histogram(
                    "hivtp_retain_ratio",
                    "Effective per-image ratio: kept grid tokens over grid tokens.",
                    ["model_name", "selection"],
                    buckets=RATIO_BUCKETS,
                ),
            )
        return _frontend


def record_images(
    model_name: str,
    input_tokens: Sequence[int],
    retained: Sequence[int],
    ratios: Sequence[float],
    selection: str = "hivtp",
) -> None:
    """Count one request's images (processor side), labelled with the selection
    that ran ('hivtp', or the 'uniform' baseline)."""
    images, tokens, ratio = frontend_metrics()
    images.labels(model_name, selection).inc(len(input_tokens))
    tokens.labels(model_name, "input", selection).inc(sum(input_tokens))
    tokens.labels(model_name, "retained", selection).inc(sum(retained))
    for value in ratios:
        ratio.labels(model_name, selection).observe(value)


class SnapshotHistogram:
    """A one-label histogram that a worker process snapshots to a JSON file."""

    def __init__(self, directory: Path, model_name: str) -> None:
        self.path = directory / f"pruning-{os.getpid()}.json"
        self.model_name = model_name
        self.buckets = [0] * (len(SECONDS_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(SECONDS_BUCKETS) if seconds <= b), -1)
        self.buckets[index] += 1
        self.total += seconds
        tmp = self.path.with_suffix(".tmp")
        state = {"model_name": self.model_name, "buckets": self.buckets, "sum": self.total}
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)  # a scrape never reads half a file


def pruning_histogram(model_name: str):
    """Where the model observes its pruning time (worker side)."""
    global _pruning_metric
    with _lock:
        if model_name not in _pruning:
            directory = snapshot_dir()
            if directory is not None:
                _pruning[model_name] = SnapshotHistogram(directory, model_name)
            else:
                if _pruning_metric is None:
                    _pruning_metric = Histogram(
                        PRUNING, PRUNING_HELP, ["model_name"], buckets=SECONDS_BUCKETS
                    )
                _pruning[model_name] = _pruning_metric.labels(model_name)
        return _pruning[model_name]


class SnapshotCollector(Collector):
    """Serves the workers' pruning-time snapshots from the API server."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[HistogramMetricFamily]:
        merged: dict[str, tuple[list[int], float]] = {}
        for path in sorted(self.directory.glob("pruning-*.json")):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a worker that is gone or mid-start
            buckets, total = merged.get(state["model_name"], ([0] * len(state["buckets"]), 0.0))
            merged[state["model_name"]] = (
                [a + b for a, b in zip(buckets, state["buckets"], strict=True)],
                total + state["sum"],
            )
        family = HistogramMetricFamily(PRUNING, PRUNING_HELP, labels=["model_name"])
        for model_name, (buckets, total) in merged.items():
            cumulative, running = [], 0
            for bound, count in zip([*SECONDS_BUCKETS, float("inf")], buckets, strict=True):
                running += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
            family.add_metric([model_name], cumulative, total)
        yield family


def setup_server_side() -> None:
    """Called in every vLLM process when the plugin loads (idempotent).

    The first process of a server (the API server, or an offline ``LLM``)
    makes the snapshot directory, before the engine's processes start, and
    registers the collector that serves it; processes it starts inherit the
    directory. Multiprocess mode needs neither.
    """
    global _collector_registered
    if multiprocess_mode() or _collector_registered or not is_server_root():
        return
    os.environ[ENV_DIR] = tempfile.mkdtemp(prefix="hivtp-metrics-")
    REGISTRY.register(SnapshotCollector(Path(os.environ[ENV_DIR])))
    _collector_registered = True
