"""A local vLLM OpenAI server in a subprocess, and a small client for it.

Used by the tests, the benchmarks and the load-test runner: each needs the
real server (real HTTP, real engine) started the way the README starts it,
on a free loopback port, and stopped cleanly.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import requests
from PIL import Image

# The CPU backend otherwise reserves a fraction of the machine's memory for
# the KV cache; a fixed size keeps several servers side by side. float32:
# on AVX2-only CPUs vLLM's bfloat16 matmuls run tens of times slower.
SERVER_ARGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "4096",
    "--kv-cache-memory-bytes",
    "536870912",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_data_url(seed: int, width: int = 336, height: int = 336) -> str:
    """A random-noise PNG as a data URL (no network, deterministic)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metric(metrics: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """Sum of a scraped series over the samples that carry ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in metrics.get(name, {}).items() if want <= set(k))


def read_stream(lines: Iterable[bytes]) -> tuple[float | None, dict]:
    """Consume an OpenAI chat completion stream (server-sent events).

    Returns the ``perf_counter`` time of the first chunk that carries content
    (None if none did) and the usage of the final chunk.
    """
    first, usage = None, {}
    for line in lines:
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        deltas = (c.get("delta", {}) for c in chunk.get("choices", []))
        if first is None and any(d.get("content") for d in deltas):
            first = time.perf_counter()
        usage = chunk.get("usage") or usage
    return first, usage


@contextlib.contextmanager
def in_process_llm(model: Path | str, **overrides: object) -> Iterator[object]:
    """vLLM's ``LLM`` engine in this process, so ``apply_model`` can return
    tensors from the loaded model (tests, overhead benchmarks)."""
    # An earlier in-process engine that is no longer referenced resets vLLM's
    # process-wide parallel state when collected: collect it before this one
    # starts, not while it runs.
    gc.collect()
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.distributed import parallel_state

    # The process-wide parallel groups are made by the first engine for its
    # model (the expert-parallel group only for a MoE one): an engine that
    # made them takes them down when it ends, so the next one makes its own.
    # An engine opened inside another's block shares that one's.
    fresh = not parallel_state.model_parallel_is_initialized()
    options = dict(
        dtype="float32", enforce_eager=True, max_model_len=4096, kv_cache_memory_bytes=1 << 28
    )
    try:
        yield LLM(model=str(model), **{**options, **overrides})
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
        if fresh:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


class VllmServer:
    """Starts ``python -m vllm.entrypoints.openai.api_server`` on a free port.

    ``plugin=False`` gives stock vLLM: ``VLLM_PLUGINS`` names no installed
    plugin, so vLLM loads none of them.
    """

    def __init__(
        self,
        model: Path,
        args: list[str],
        *,
        plugin: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = str(model)
        self.args = args
        self.plugin = plugin
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(
            "w+", prefix=f"vllm-{self.port}-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process; :meth:`wait_ready` waits for it (several servers
        can start side by side)."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", **self.env)
        if not self.plugin:
            env["VLLM_PLUGINS"] = "none-stock-vllm"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *SERVER_ARGS,
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited early:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "".join(Path(self.log.name).read_text().splitlines(True)[-lines:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of the server's processes, by name (API server,
        ``VLLM::EngineCore``, ``VLLM::Worker``...), so growth can be placed."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total: dict[str, int] = {}
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                name = "api_server" if proc.pid == root.pid else proc.name()
                total[name] = total.get(name, 0) + proc.memory_info().rss
        return total

    def scrape(self) -> dict[str, dict[tuple, float]]:
        """``{sample name: {labels: value}}`` from the server's /metrics text."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url + "/metrics", timeout=30).text
        out: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                if "le" in sample.labels:
                    labels += (("le", sample.labels["le"]),)
                out.setdefault(sample.name, {})[labels] = sample.value
        return out

    # -- client ----------------------------------------------------------
    def chat(
        self,
        images: list[str],
        mm_kwargs: dict | None = None,
        *,
        text: str = "Describe the picture.",
        max_tokens: int = 8,
        **extra: object,
    ) -> requests.Response:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
        content.append({"type": "text", "text": text})
        body: dict = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **extra,
        }
        if mm_kwargs is not None:
            body["mm_processor_kwargs"] = mm_kwargs
        return requests.post(self.url + "/v1/chat/completions", json=body, timeout=300)

    def completion(self, prompt: str, mm_kwargs: dict | None = None, **extra) -> requests.Response:
        body: dict = {"model": self.model, "prompt": prompt, "max_tokens": 4, **extra}
        if mm_kwargs is not None:
            body["mm_processor_kwargs"] = mm_kwargs
        return requests.post(self.url + "/v1/completions", json=body, timeout=300)

    def timed_stream(
        self, images: list[str], mm_kwargs: dict | None = None, *, max_tokens: int = 4
    ) -> dict[str, float]:
        """One streaming chat request: TTFT (first content chunk), latency, tokens."""
        content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
        content.append({"type": "text", "text": "Describe the picture."})
        body: dict = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if mm_kwargs is not None:
            body["mm_processor_kwargs"] = mm_kwargs
        start = time.perf_counter()
        with requests.post(
            self.url + "/v1/chat/completions", json=body, stream=True, timeout=600
        ) as response:
            response.raise_for_status()
            first, usage = read_stream(response.iter_lines())
        end = time.perf_counter()
        latency = end - start
        return {
            "ttft": (first or end) - start,
            "latency": latency,
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
        }
