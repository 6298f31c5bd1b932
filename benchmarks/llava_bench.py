"""LLaVA-1.5 with HIVTP: single-request TTFT by ratio, and the pruning overhead.

    .venv/bin/python benchmarks/llava_bench.py            # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/llava_bench.py --arch qwen2.5-vl   # any family with a bench row

1. TTFT. One vLLM server with the plugin serves the ``bench`` checkpoint
   (its language model costs >10x its vision tower per image, as in
   LLaVA-1.5-7B). Requests at r = 1.0, 0.5, 0.25 are interleaved round by
   round (order rotated), each with a fresh image so no cache helps, one at a
   time; TTFT is the time to the first streamed content chunk.
2. Overhead. The same engine code in-process (``LLM.apply_model``) times the
   vision tower alone, the tower with the band's attention recorded, and the
   selection, interleaved: overhead = (recorded - plain + selection) / plain.
   Measured on the bench tower at batch 1 and 16, and on a full-size CLIP-L
   tower (24 layers, 1024 wide, random weights; the one LLaVA-1.5-7B uses) at
   batch 1 and 4.

What differs per family is its row in hivtp_vllm/families.py: ``Family.bench``
(images, views, the bench model's sizes; ``--arch`` offers the rows that have
one), ``Family.layout`` (which probe times its tower) and ``Bench.full_tower``
(which full-size tower, of :data:`FULL_TOWERS`, its section adds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, median, write_section  # noqa: E402
from hivtp_vllm.families import FAMILIES, Bench, Family, Layout  # noqa: E402
from hivtp_vllm.tools.local_server import VllmServer, image_data_url, in_process_llm  # noqa: E402

RATIOS = (1.0, 0.5, 0.25)


def ensure_model(path: Path, size: str, arch: str = "llava") -> Path:
    if not (path / "config.json").exists():
        from hivtp_vllm.tools.checkpoints import make_checkpoint

        make_checkpoint(path, size=size, arch=arch)
    return path


# Qwen2.5-VL-7B-Instruct's published vision tower (its config.json).
QWEN_7B_TOWER = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
}


# Qwen3.5's published tower (transformers' Qwen3_5VisionConfig defaults):
# full attention in every layer, no DeepStack.
QWEN3_5_TOWER = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16}


def config_only_tower(models: Path, arch: str, name: str, tower: dict) -> Path:
    """A config-only checkpoint: the tiny ``arch`` with a published vision
    tower (weights from vLLM's ``--load-format dummy``; the merger projects
    to the tiny language model's width)."""
    import json
    import shutil

    tiny = ensure_model(models / f"tiny-{arch}", "tiny", arch)
    out = models / name
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in tiny.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and "index" not in f.name:
                shutil.copy(f, out / f.name)
        config = json.loads((tiny / "config.json").read_text())
        config["vision_config"].update(tower)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def qwen_7b_tower(models: Path) -> Path:
    """The tiny Qwen2.5-VL with the 7B's vision tower."""
    return config_only_tower(models, "qwen2.5-vl", "qwen2.5-vl-7b-tower", QWEN_7B_TOWER)


def qwen3_5_tower(models: Path) -> Path:
    """The tiny Qwen3.5 with the published vision tower."""
    return config_only_tower(models, "qwen3.5", "qwen3.5-tower", QWEN3_5_TOWER)


def measure_ttft(model: Path, requests: int, bench: Bench, dtype: str) -> dict:
    # A KV cache that holds a whole max-length prompt of the bench LM.
    image, max_len = bench.image, bench.max_model_len
    kv = max(1 << 29, max_len * bench.kv_per_token)
    options = ["--max-num-seqs", "16", "--max-model-len", str(max_len), "--dtype", dtype]
    server = VllmServer(model, [*options, "--kv-cache-memory-bytes", str(kv)])
    print(f"[ttft] starting server on {server.url} ...", flush=True)
    server.start()
    try:
        seed = 10_000
        for ratio in RATIOS:  # warm-up, not recorded
            seed += 1
            server.timed_stream([image_data_url(seed, *image)], {"hivtp_retain_ratio": ratio})
        runs: dict[float, list[dict]] = {r: [] for r in RATIOS}
        for i in range(requests):
            order = RATIOS[i % 3 :] + RATIOS[: i % 3]
            for ratio in order:
                seed += 1
                result = server.timed_stream(
                    [image_data_url(seed, *image)], {"hivtp_retain_ratio": ratio}, max_tokens=2
                )
                runs[ratio].append(result)
            print(f"[ttft] round {i + 1}/{requests}", flush=True)
    finally:
        server.stop()
    return {
        r: {
            "ttft": median([x["ttft"] for x in xs]),
            "prompt_tokens": xs[0]["prompt_tokens"],
            "n": len(xs),
        }
        for r, xs in runs.items()
    }


def interleaved(reps: int, tower, recorded, select) -> dict:
    """Medians of ``reps`` interleaved rounds: the plain tower, the tower
    while recording (and the time inside the scoring hooks), selection.

    ``recorded(timer)`` runs the tower with the recorder listening and its
    span timed by ``timer``; ``select()`` makes the scores and selects.
    """
    import torch

    from hivtp_vllm.timing import PruningTimer

    plain, recording, hooks, selecting = [], [], [], []
    with torch.inference_mode():
        tower()  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            tower()
            t1 = time.perf_counter()
            timed: list[float] = []
            timer = PruningTimer(timed.append)
            recorded(timer)
            timer.finish(counted=True)
            t2 = time.perf_counter()
            select()
            t3 = time.perf_counter()
            plain.append(t1 - t0)
            recording.append(t2 - t1)
            hooks.append(timed[0])
            selecting.append(t3 - t2)
    return {
        "plain": median(plain),
        "recorded": median(recording),
        "hooks": median(hooks),
        "select": median(selecting),
    }


def overhead_probe(batches: tuple[int, ...], reps: int, bench: Bench):
    """Runs inside the engine: times plain tower, recorded tower, selection.

    ``batch`` counts images; each has ``bench.tiles`` tower inputs and its
    views are selected at r = 0.25, as the model would.
    """

    def probe(model):
        import torch

        from hivtp_vllm.models.common import select_views
        from hivtp_vllm.pruning import num_retained

        size = model.config.vision_config.image_size
        rec = model.hivtp_recorder
        results = {}
        for batch in batches:
            pv = torch.randn(batch * bench.tiles, 3, size, size).to(model.vision_tower.dtype)
            views = [torch.rand(h, w) for h, w in bench.views] * batch
            budgets = [num_retained(v.numel(), 0.25) for v in views]

            def tower(pv=pv):
                return model._image_pixels_to_features(model.vision_tower, pv)

            def recorded(timer, pv=pv, tower=tower):
                rec.span = timer.span
                with rec.recording(torch.arange(pv.shape[0])):
                    tower()

            def select(views=views, budgets=budgets):
                rec.patch_scores()
                grids = [tuple(v.shape) for v in views]
                select_views(grids, views, budgets, [0.5] * len(views), (2, 2))

            results[batch] = interleaved(reps, tower, recorded, select)
        return results

    return probe


def merged_overhead_probe(batches: tuple[int, ...], reps: int, bench: Bench):
    """As :func:`overhead_probe`, for the "merged" layout's packed tower
    (Qwen-VL): ``batch`` images of ``bench.image`` in one tower call, each
    scored over its own segment and selected on its merged grid at r = 0.25."""

    def probe(model):
        import torch

        from hivtp_vllm.models.common import select_views
        from hivtp_vllm.pruning import num_retained

        (rows, cols) = bench.views[0]
        vision = model.config.vision_config
        per_patch = 3 * vision.temporal_patch_size * vision.patch_size**2
        rec = model.hivtp_recorder
        results = {}
        for batch in batches:
            grid = [[1, 2 * rows, 2 * cols]] * batch
            lengths = [4 * rows * cols] * batch
            pv = torch.randn(sum(lengths), per_patch).to(model.visual.dtype)
            views = [torch.rand(rows, cols)] * batch
            budgets = [num_retained(rows * cols, 0.25)] * batch

            def tower(pv=pv, grid=grid):
                return model.hivtp_run_tower(pv, grid)

            def recorded(timer, lengths=lengths, batch=batch, tower=tower):
                rec.span = timer.span
                with rec.recording_segments(lengths, range(batch)):
                    tower()

            def select(lengths=lengths, views=views, budgets=budgets, batch=batch):
                rec.position_scores(lengths)
                select_views([(rows, cols)] * batch, views, budgets, [0.5] * batch, (2, 2))

            results[batch] = interleaved(reps, tower, recorded, select)
        return results

    return probe


# The probe that times a layout's tower: one call per tower input for the LLaVA
# layouts, one packed call with per-image segments for the merged one.
PROBES: dict[Layout, Callable[[tuple[int, ...], int, Bench], Callable]] = {
    "single": overhead_probe,
    "anyres": overhead_probe,
    "merged": merged_overhead_probe,
}


def measure_overhead(
    model: Path, batches: tuple[int, ...], reps: int, family: Family, **llm_kwargs
) -> dict:
    """The overhead probe of ``family``'s layout, on ``model``, with its bench sizes."""
    bench = family.bench
    assert bench is not None, f"{family.name} has no bench row"
    llm_kwargs.setdefault("max_model_len", bench.max_model_len)
    kv = max(1 << 28, bench.max_model_len * bench.kv_per_token)
    llm_kwargs.setdefault("kv_cache_memory_bytes", kv)
    llm_kwargs.setdefault("dtype", family.dtype)
    probe = PROBES[family.layout]
    with in_process_llm(model, **llm_kwargs) as llm:
        (result,) = llm.apply_model(probe(batches, reps, bench))
    return result


def overhead_rows(name: str, result: dict) -> list[str]:
    rows = []
    for batch, t in result.items():
        total = t["recorded"] - t["plain"] + t["select"]
        rows.append(
            f"| {name} | {batch} | {t['plain'] * 1e3:.1f} | {t['hooks'] * 1e3:.2f} | "
            f"{t['select'] * 1e3:.2f} | {100 * total / t['plain']:.2f}% | "
            f"{100 * (t['hooks'] + t['select']) / t['plain']:.2f}% |"
        )
    return rows


READING = [
    "",
    "Reading: scoring recomputes softmax(q k^T) in the band's layers (2 of the 11 layers",
    "the 12-layer bench tower runs, 3 of CLIP-L's 23), so its cost follows the share of",
    "attention in a layer, about S / (6 x hidden) of the linear work: 75% for the bench",
    "tower (hidden 128, S = 577) against 9% for CLIP-L (hidden 1024). The bench tower is",
    "built for the LM/vision cost split, not for this ratio; the CLIP-L rows are the",
    "LLaVA-1.5-7B tower. The wall-clock column subtracts two multi-second CLIP-L runs and",
    "is within their run-to-run noise; the in-hook column times the work itself.",
]


QWEN_READING = [
    "",
    "Reading: the bench tower is 64 wide with 2 heads, built for the LM/vision cost split;",
    "at S = 5476 patches an image, one layer's softmax(q k^T) costs more than several",
    "layers' linear work, and scoring recomputes it for the one scored layer (3, the full",
    "attention layer nearest the middle). The Qwen2.5-VL-7B row is the published 7B tower",
    "(vLLM's dummy weights, the tiny language model behind it), scoring its layer 7: there",
    "the 32 layers' linear work dominates, and the overhead is the share to expect at",
    "full size. Both are CPU timings; a GPU's share may differ (its attention kernels are",
    "fused, the scoring's softmax is not).",
]
QWEN_READING_NO_7B = QWEN_READING[:4] + [
    "attention layer nearest the middle). The full-size tower was not run",
    "(`--skip-clip-l`).",
]
QWEN3_5_READING = [
    "",
    "Reading: the bench tower is 64 wide with 2 heads, built for the LM/vision cost split;",
    "every layer attends over the whole image, and scoring recomputes softmax(q k^T) in",
    "the band's layers (3 of 8). The Qwen3.5 row is the published tower (27 x 1152, vLLM's",
    "dummy weights, the tiny language model behind it), scoring layers 7-9: there the",
    "linear work of 27 layers dominates, and the overhead is the share to expect at full",
    "size. Both are CPU timings in bfloat16 (vLLM's CPU kernels for Qwen3.5's Gated",
    "DeltaNet layers take bfloat16 only); a GPU's share may differ.",
]
QWEN3_5_READING_SKIPPED = QWEN3_5_READING[:4] + [
    "dummy weights) was not run (`--skip-clip-l`).",
]
SEE_LLAVA = ["", "(For the full-size CLIP-L tower see LLaVA-1.5's section.)"]


@dataclass(frozen=True)
class FullTower:
    """A published model's full-size tower, timed beside the bench tower: the
    bench checkpoints keep the LM/vision cost split, not the tower's own
    attention-to-linear ratio, so the overhead to expect at full size needs
    the real shapes. A family's ``Bench.full_tower`` names one."""

    name: str  # in the progress line
    row: str  # the overhead table's tower column
    family: str  # the family whose layout and bench images probe it
    checkpoint: Callable[[Path], Path]  # makes it (once) under --models
    batches: tuple[int, ...]
    reps: int
    reading: list[str]  # the section's closing paragraph when it ran
    skipped: list[str]  # ... when --skip-clip-l left it out
    load_format: str | None = None  # vLLM's, for a config-only checkpoint
    max_model_len: int = 2048


FULL_TOWERS: dict[str, FullTower] = {
    # CLIP-L costs seconds per image on 2 CPU cores: 1 and 4 tower inputs.
    "clip-l": FullTower(
        name="CLIP-L",
        row="CLIP-L (24 x 1024, runs 23)",
        family="llava",
        checkpoint=lambda models: ensure_model(models / "clip-l-probe", "clip-l", "llava"),
        batches=(1, 4),
        reps=3,
        reading=READING,
        skipped=SEE_LLAVA,
    ),
    # About a minute a tower pass on 2 CPU cores: one image, 3 rounds.
    "qwen2.5-vl-7b": FullTower(
        name="Qwen2.5-VL-7B",
        row="Qwen2.5-VL-7B (32 x 1280, full attention in 4, scores 7)",
        family="qwen2.5-vl",
        checkpoint=qwen_7b_tower,
        batches=(1,),
        reps=3,
        reading=QWEN_READING,
        skipped=QWEN_READING_NO_7B,
        load_format="dummy",
    ),
    "qwen3.5": FullTower(
        name="Qwen3.5",
        row="Qwen3.5 published (27 x 1152, scores 7-9)",
        family="qwen3.5",
        checkpoint=qwen3_5_tower,
        batches=(1,),
        reps=3,
        reading=QWEN3_5_READING,
        skipped=QWEN3_5_READING_SKIPPED,
        load_format="dummy",
    ),
}


def main(argv: list[str] | None = None) -> int:
    benched = [name for name, family in FAMILIES.items() if family.bench]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=benched, default="llava")
    parser.add_argument("--requests", type=int, default=12, help="requests per ratio")
    parser.add_argument("--reps", type=int, default=7, help="overhead repetitions")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument(
        "--skip-clip-l",
        action="store_true",
        help=f"no full-size tower run ({', '.join(t.name for t in FULL_TOWERS.values())})",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    family = FAMILIES[args.arch]
    arch = family.bench
    assert arch is not None  # --arch offers only the rows with one
    full = FULL_TOWERS[arch.full_tower] if arch.full_tower else None
    command = f".venv/bin/python benchmarks/llava_bench.py --arch {args.arch}"

    bench = ensure_model(args.models / f"bench-{args.arch}", "bench", args.arch)
    ttft = measure_ttft(bench, args.requests, arch, family.dtype)
    base = ttft[1.0]["ttft"]
    print("[overhead] bench tower ...", flush=True)
    over_bench = measure_overhead(bench, arch.batches, args.reps, family)
    over_full: dict = {}
    if full and not args.skip_clip_l:
        print(f"[overhead] {full.name} tower ...", flush=True)
        extra = {"load_format": full.load_format} if full.load_format else {}
        over_full = measure_overhead(
            full.checkpoint(args.models),
            full.batches,
            full.reps,
            FAMILIES[full.family],
            **extra,
            max_model_len=full.max_model_len,
        )

    from hivtp_vllm.pruning import num_retained

    width, height = arch.image
    lines = [
        f"## {family.title}: single-request TTFT and pruning overhead",
        "",
        f"Command: `{command}` (script: `benchmarks/llava_bench.py`).",
        f"Machine: {machine()}; vLLM CPU build, {family.dtype}, `--enforce-eager`.",
        "",
        f"Model: random-weight `bench` {family.title} (`make-model --size bench --arch "
        f"{args.arch}`: {arch.model}).",
        f"Images {width} x {height}: views {' + '.join(f'{h} x {w}' for h, w in arch.views)}"
        + (" plus one newline per high-res row." if len(arch.views) > 1 else "."),
        f"{ttft[1.0]['n']} requests per ratio, interleaved, one at a time, fresh image each, "
        "2 output tokens; TTFT = time to the first streamed content chunk.",
        "",
        "| retain ratio | visual tokens kept | prompt tokens | median TTFT (s) | vs r = 1.0 |",
        "|---|---|---|---|---|",
    ]
    for r in RATIOS:
        kept = " + ".join(str(num_retained(h * w, r)) for h, w in arch.views)
        t = ttft[r]
        lines.append(
            f"| {r} | {kept} | {t['prompt_tokens']} | {t['ttft']:.3f} | "
            f"{100 * (t['ttft'] / base - 1):+.1f}% |"
        )
    lines += [
        "",
        "Pruning overhead: scores (band attention recomputed from the tower's own q, k)",
        "plus selection, against the vision tower's time; medians of interleaved runs.",
        f"Batch counts images ({arch.tiles} tower input(s) each at this size).",
        "`recorded - plain` is the wall-clock difference (noisy at small sizes);",
        "`hooks + select` is the time measured inside the scoring hooks and selection.",
        "",
        "| tower | batch | tower ms | scoring ms | selection ms | overhead "
        "(recorded - plain + select) | overhead (hooks + select) |",
        "|---|---|---|---|---|---|---|",
        *overhead_rows(arch.tower, over_bench),
        *(overhead_rows(full.row, over_full) if full else []),
    ]
    if full is None:  # no full-size tower of its own: LLaVA-1.5's section has CLIP-L's
        lines += SEE_LLAVA
    else:
        lines += full.reading if over_full else full.skipped
    write_section(f"{family.slug}-single", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
