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

# The GPU builds' install and tests (network, disk, then a minute or two of
# CPU) run beside the CPU build's suite, whose real servers take the most
# time; their output is kept apart and printed once both are done. Disk at
# most: .venv (~3.5 GB) and one GPU venv (~9 GB).
gpu_builds() {
  for version in "${GPU_BUILDS[@]}"; do
    bash scripts/setup.sh gpu "$version"
    echo "[test] processor-level tests on vLLM $version (GPU build)"
    ".venv-gpu-${version%.*}/bin/python" -m pytest -q -p no:cacheprovider "${GPU_BUILD_TESTS[@]}"
    done_with ".venv-gpu-${version%.*}"
  done
}

bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
gpu_pid=
if [ "${HIVTP_SKIP_GPU_BUILD:-0}" != 1 ]; then
  gpu_log=$(mktemp /tmp/hivtp-gpu-builds.XXXXXX)
  gpu_builds >"$gpu_log" 2>&1 &
  gpu_pid=$!
  echo "[test] GPU builds ${GPU_BUILDS[*]}: installing and testing alongside (log: $gpu_log)"
fi
cpu_status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@" || cpu_status=$?
done_with .venv
gpu_status=0
if [ -n "$gpu_pid" ]; then
  wait "$gpu_pid" || gpu_status=$?
  echo "[test] ---- GPU builds (exit $gpu_status) ----"
  cat "$gpu_log"
fi
echo "[test] CPU build suite exit $cpu_status, GPU builds exit $gpu_status"
[ "$cpu_status" = 0 ] && [ "$gpu_status" = 0 ]
