"""LLaVA-1.5-7B at full size on a GPU, through transformers: TTFT, decode, overhead.

    python benchmarks/gpu_transformers.py --device cuda          # on a GPU machine
    python benchmarks/gpu_transformers.py --config tiny --device cpu --no-write  # smoke run

vLLM cannot be installed on the GPU machine this project is lent, so this
measures what the paper measured with transformers' own
``LlavaForConditionalGeneration`` (random weights, the LLaVA-1.5-7B shapes:
CLIP-L/14 at 336 px, a 32-layer 4096-wide Llama) in float16, batch 1 and 8:

- TTFT: pixels -> vision tower (band taps on) -> HIVTP selection -> projector
  -> prefill of text + kept visual tokens -> first token, synchronised.
- Decode throughput: greedy tokens per second after the first, with the KV
  cache the prefill left (shorter when pruned).
- Overhead: scoring (the server's ``received_attention`` on the band's q, k)
  plus selection, against the vision tower's own time.

The scoring and selection are the server's code (``hivtp_vllm.scoring``,
``hivtp_vllm.pruning``); only the model around them is transformers'.
Figures go into docs/benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hivtp_vllm import params  # noqa: E402
from hivtp_vllm.pruning import default_band, num_retained, select_tokens_batched  # noqa: E402
from hivtp_vllm.tools.tower import tap_band  # noqa: E402

SECTION = "gpu-llava-1.5-7b"

CONFIGS = {
    # llava-hf/llava-1.5-7b-hf's shapes.
    "7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=336, patch_size=14,
                       projection_dim=768, hidden_act="quick_gelu"),
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                     max_position_embeddings=4096, rms_norm_eps=1e-5),
    },
    # The same layout, small enough for a CPU smoke run in the tests.
    "tiny": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                       num_attention_heads=4, image_size=336, patch_size=14,
                       projection_dim=64, hidden_act="quick_gelu"),
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=1024,
                     max_position_embeddings=4096, rms_norm_eps=1e-5),
    },
}  # fmt: skip


def build_model(name: str, device: str, dtype: torch.dtype):
    """Random-weight ``LlavaForConditionalGeneration`` built directly on ``device``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    shapes = CONFIGS[name]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**shapes["vision"]),
        text_config=LlamaConfig(**shapes["text"]),
        image_token_index=shapes["text"]["vocab_size"] - 64,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model.eval()


class Pipeline:
    """The pruned LLaVA forward, step by step, on transformers' modules."""

    def __init__(self, model, server: params.ServerOptions) -> None:
        self.model = model
        inner = model.model
        self.tower, self.projector, self.lm = (
            inner.vision_tower,
            inner.multi_modal_projector,
            inner.language_model,
        )
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size
        start, count = default_band(vision.num_hidden_layers)
        inner = getattr(self.tower, "vision_model", self.tower)  # older transformers nest it
        layers = inner.encoder.layers
        self.band = [layers[i].self_attn for i in range(start, start + count)]
        self.server = server

    def features(self, pixels: torch.Tensor, keep: int) -> tuple[torch.Tensor, float, float]:
        """Projected kept features ``[B, keep, D]``, (scoring s, selection s)."""
        n = self.side * self.side
        scoring = selection = 0.0
        if keep == n:
            hidden = self.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            return self.projector(hidden), scoring, selection
        with tap_band(self.band) as taps:
            hidden = self.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        sync(pixels.device)
        t0 = time.perf_counter()
        scores = taps.patch_scores().reshape(-1, self.side, self.side)
        sync(pixels.device)
        t1 = time.perf_counter()
        kept = select_tokens_batched(
            scores,
            keep,
            regions=self.server.regions,
            global_fraction=self.server.default.global_fraction,
        )
        hidden = hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        sync(pixels.device)
        selection = time.perf_counter() - t1
        scoring = taps.seconds + (t1 - t0)
        return self.projector(hidden), scoring, selection

    def first_token(self, pixels: torch.Tensor, text: torch.Tensor, keep: int):
        """TTFT path: prompt = [image features, text]; returns (token, cache)."""
        image, _, _ = self.features(pixels, keep)
        embeds = torch.cat([image, self.model.get_input_embeddings()(text)], dim=1)
        out = self.lm(inputs_embeds=embeds, use_cache=True)
        logits = self.model.lm_head(out.last_hidden_state[:, -1])
        return logits.argmax(-1, keepdim=True), out.past_key_values

    def decode(self, token: torch.Tensor, cache, steps: int) -> torch.Tensor:
        for _ in range(steps):
            out = self.lm(
                inputs_embeds=self.model.get_input_embeddings()(token),
                past_key_values=cache,
                use_cache=True,
            )
            token = self.model.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
        return token


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device, reps: int) -> float:
    """Median seconds of ``reps`` synchronised calls after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure(
    pipeline: Pipeline,
    batches: list[int],
    ratios: list[float],
    text_tokens: int,
    decode_tokens: int,
    reps: int,
    device: str,
    dtype: torch.dtype,
) -> tuple[list[dict], list[dict]]:
    vision = pipeline.model.config.vision_config
    n = pipeline.side**2
    vocab = pipeline.model.config.text_config.vocab_size
    rows, overhead = [], []
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        pixels = torch.randn(
            batch, 3, vision.image_size, vision.image_size, generator=generator
        ).to(device, dtype)
        text = torch.randint(0, vocab - 64, (batch, text_tokens), generator=generator).to(device)
        for ratio in ratios:
            keep = num_retained(n, ratio)
            ttft = timed(
                lambda k=keep, p=pixels, t=text: pipeline.first_token(p, t, k), device, reps
            )
            token, cache = pipeline.first_token(pixels, text, keep)
            start_len = cache.get_seq_length()
            sync(device)
            t0 = time.perf_counter()
            pipeline.decode(token, cache, decode_tokens)
            sync(device)
            decode_s = time.perf_counter() - t0
            rows.append(
                {
                    "batch": batch,
                    "ratio": ratio,
                    "keep": keep,
                    "prompt": start_len,
                    "ttft": ttft,
                    "decode_tps": batch * decode_tokens / decode_s,
                }
            )
            print(f"[gpu] batch {batch} r={ratio}: {rows[-1]}", flush=True)
        plain = timed(lambda p=pixels: pipeline.tower(p, output_hidden_states=True), device, reps)
        keep = num_retained(n, 0.25)
        costs = [pipeline.features(pixels, keep) for _ in range(reps)]
        overhead.append(
            {
                "batch": batch,
                "tower": plain,
                "scoring": statistics.median(c[1] for c in costs),
                "selection": statistics.median(c[2] for c in costs),
            }
        )
    return rows, overhead


def report(
    rows: list[dict], overhead: list[dict], device_name: str, command: str, setup: str
) -> str:
    lines = [
        "## LLaVA-1.5-7B on a GPU, through transformers",
        "",
        f"Command: `{command}` (script: `benchmarks/gpu_transformers.py`).",
        f"Device: {device_name}; {setup}.",
        "Prompt: the image's kept visual tokens, then the text tokens; TTFT runs pixels to",
        "first token (tower, scoring, selection, projector, prefill, LM head), medians.",
        "",
        "| batch | retain ratio | visual tokens kept | prompt tokens | TTFT (ms) | vs r = 1.0 |"
        " decode tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["batch"]: r["ttft"] for r in rows if r["ratio"] == 1.0}
    for r in rows:
        change = r["ttft"] / base[r["batch"]] - 1 if r["batch"] in base else float("nan")
        lines.append(
            f"| {r['batch']} | {r['ratio']} | {r['keep']} | {r['prompt']} | "
            f"{r['ttft'] * 1e3:.1f} | {100 * change:+.1f}% | {r['decode_tps']:.1f} |"
        )
    lines += [
        "",
        "Overhead at r = 0.25: scoring and selection against the vision tower's own time.",
        "",
        "| batch | vision tower (ms) | scoring (ms) | selection (ms) | overhead |",
        "|---|---|---|---|---|",
    ]
    for o in overhead:
        share = (o["scoring"] + o["selection"]) / o["tower"]
        lines.append(
            f"| {o['batch']} | {o['tower'] * 1e3:.2f} | {o['scoring'] * 1e3:.3f} | "
            f"{o['selection'] * 1e3:.3f} | {100 * share:.2f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--ratios", default="1.0,0.5,0.25")
    parser.add_argument("--text-tokens", type=int, default=48)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    dtype = getattr(torch, args.dtype or ("float16" if args.device != "cpu" else "float32"))
    model = build_model(args.config, args.device, dtype)
    pipeline = Pipeline(model, params.parse_server({}))
    rows, overhead = measure(
        pipeline,
        [int(b) for b in args.batches.split(",")],
        [float(r) for r in args.ratios.split(",")],
        args.text_tokens,
        args.decode_tokens,
        args.reps,
        args.device,
        dtype,
    )
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    command = "python benchmarks/gpu_transformers.py " + " ".join(argv or sys.argv[1:])
    shapes = "LLaVA-1.5-7B shapes" if args.config == "7b" else f"the {args.config!r} shapes"
    setup = (
        f"random weights, {str(dtype).removeprefix('torch.')}, {shapes}, "
        f"{args.text_tokens} text tokens, {args.decode_tokens} decoded tokens"
    )
    body = report(rows, overhead, f"{name}, torch {torch.__version__}", command.strip(), setup)
    print(body)
    if not args.no_write:
        from benchmarks.report import write_section

        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
