#!/usr/bin/env bash
# Run every check: lint, the test suite on vLLM's CPU build (real servers),
# and the processor-level tests against vLLM's GPU build (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ "${HIVTP_SKIP_GPU_BUILD:-0}" != 1 ]; then
  bash scripts/setup.sh gpu
  .venv-gpu/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_processor.py tests/test_params.py tests/test_pruning.py
fi
