#!/usr/bin/env bash
# Run every check: lint, the test suite on vLLM's CPU build (real servers),
# and the processor-level tests against each supported GPU build of vLLM (no
# GPU needed). HIVTP_SKIP_GPU_BUILD=1 skips the GPU builds.
#
# HIVTP_FREE_DISK=1 (set by .ci/run) removes each virtual environment once its
# tests have run: the three take about 25 GB together, one at a time at most
# about 10 GB, and a CI run once failed for want of disk while installing the
# last one. Left unset, the environments stay for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests run against every GPU build (each in .venv-gpu-X.Y/, made by
# scripts/setup.sh gpu X.Y.Z): the ones that need no server and no GPU.
GPU_BUILD_TESTS=(tests/test_processor.py tests/test_qwen_processor.py tests/test_params.py tests/test_pruning.py tests/test_compat.py tests/test_mrope.py
  tests/test_select_compile.py tests/test_internals.py)
GPU_BUILDS=(0.32.0 0.33.0)
export HF_HUB_OFFLINE=1

done_with() {
  if [ "${HIVTP_FREE_DISK:-0}" = 1 ]; then
    echo "[test] removing $1 (HIVTP_FREE_DISK=1)"
    rm -rf "$1"
  fi
  df -h . | tail -1 | awk '{print "[test] disk: " $4 " free"}'
}

bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
done_with .venv
if [ "${HIVTP_SKIP_GPU_BUILD:-0}" != 1 ]; then
  for version in "${GPU_BUILDS[@]}"; do
    bash scripts/setup.sh gpu "$version"
    echo "[test] processor-level tests on vLLM $version (GPU build)"
    ".venv-gpu-${version%.*}/bin/python" -m pytest -q -p no:cacheprovider "${GPU_BUILD_TESTS[@]}"
    done_with ".venv-gpu-${version%.*}"
  done
fi
