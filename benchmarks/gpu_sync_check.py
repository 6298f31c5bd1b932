"""On a CUDA machine: the selection never synchronises the host with the device.

    python benchmarks/gpu_sync_check.py

No GPU is lent to CI, so this is not a test the suite runs; the CPU suite
proves the same property by tracing (tests/test_select_compile.py). Here, on
real hardware, torch's sync debug mode "error" raises on any host-device
synchronisation (``nonzero``, ``.item()``, a blocking copy) inside the
selection. Exit 0 and one line when it holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivtp_vllm.pruning import select_tokens_batched  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device", file=sys.stderr)
        return 2
    scores = torch.rand(3, 48, 19, device="cuda")
    expected = select_tokens_batched(scores.cpu(), 228)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = select_tokens_batched(scores, 228)
        full = select_tokens_batched(scores, 48 * 19)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), expected), "GPU selection differs from the CPU one"
    assert full.shape == (3, 48 * 19)
    print("gpu_sync_check: selection ran with no host-device synchronisation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
