"""vLLM's processor-cache race: streaming and non-streaming requests for one new image.

    .venv/bin/python benchmarks/cache_race.py            # 4 servers, ~8 min; writes docs
    .venv/bin/python benchmarks/cache_race.py --rounds 5 # a quick look, no report

With vLLM's default processor cache (``lru``) the API server sends an
image's tensors to the engine only with the first request that carries it,
and assumes every later one finds them there. A streaming request reaches
the engine only once its response starts streaming, so a non-streaming
request for the same image, processed just after it, can overtake it and
arrive without tensors: vLLM 0.32 answers that request HTTP 500 (it logs
"P0/P1 cache drift"). Each round here sends 8 requests at once, streaming
and not, over 3 new images; every configuration gets the same rounds.
``hivtp-vllm serve`` picks the ``shm`` cache for this reason
(:data:`hivtp_vllm.cli.CACHE_TYPE`).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hivtp_vllm.cli import CACHE_TYPE  # noqa: E402
from hivtp_vllm.tools.local_server import VllmServer, image_data_url  # noqa: E402

DRIFT = "P0/P1 cache drift"  # vLLM 0.32's warning when the race is lost
PER_ROUND = 8
IMAGES_PER_ROUND = 3


def bursts(server: VllmServer, rounds: int, mm_kwargs: dict | None = None) -> Counter:
    """HTTP statuses of ``rounds`` bursts; each burst's images are new to the server."""
    url = server.url + "/v1/chat/completions"
    statuses: Counter = Counter()
    lock = threading.Lock()

    def send(image: str, stream: bool) -> None:
        content = [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "?"},
        ]
        body: dict = {
            "model": server.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 2,
            "stream": stream,
        }
        if mm_kwargs is not None:
            body["mm_processor_kwargs"] = mm_kwargs
        with requests.post(url, json=body, stream=stream, timeout=300) as response:
            for _ in response.iter_lines() if stream else ():
                pass
            with lock:
                statuses[response.status_code] += 1

    for r in range(rounds):
        images = [image_data_url(7000 + r * 10 + j, 64, 64) for j in range(IMAGES_PER_ROUND)]
        threads = [
            threading.Thread(target=send, args=(images[j % IMAGES_PER_ROUND], bool(j % 2)))
            for j in range(PER_ROUND)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return statuses


def drift_warnings(server: VllmServer) -> int:
    return Path(server.log.name).read_text().count(DRIFT)


CONFIGS = {
    "stock vLLM, lru (vLLM's default)": (False, []),
    "stock vLLM, shm": (False, CACHE_TYPE),
    "plugin r = 0.5, lru": (True, []),
    "plugin r = 0.5, shm (hivtp-vllm serve)": (True, CACHE_TYPE),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "tiny-llava")
    parser.add_argument("--report", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.model / "config.json").exists():
        from hivtp_vllm.tools.checkpoints import make_checkpoint

        make_checkpoint(args.model, size="tiny")
    rows = []
    for name, (plugin, options) in CONFIGS.items():
        kwargs = {"hivtp_retain_ratio": 0.5} if plugin else None
        server = VllmServer(args.model, options, plugin=plugin)
        server.start()
        try:
            statuses = bursts(server, args.rounds, kwargs)
            drifts = drift_warnings(server)
        finally:
            server.stop()
        total = sum(statuses.values())
        rows.append(f"| {name} | {total} | {statuses[500]} | {drifts} |")
        print(rows[-1], dict(statuses), flush=True)
    if args.report:
        from benchmarks.report import machine, write_section

        command = ".venv/bin/python benchmarks/cache_race.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        body = "\n".join(
            [
                "## vLLM's processor-cache race (why `hivtp-vllm serve` uses the shm cache)",
                "",
                f"Command: `{command.strip()}` (script: `benchmarks/cache_race.py`).",
                f"Machine: {machine()}; `tiny` LLaVA-1.5, vLLM CPU build.",
                "",
                f"{args.rounds} bursts of {PER_ROUND} concurrent requests (streaming and not) "
                f"over {IMAGES_PER_ROUND} images new to the server, per configuration.",
                "",
                "| server | requests | HTTP 500 | drift warnings in the log |",
                "|---|---|---|---|",
                *rows,
            ]
        )
        write_section("cache-race", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
