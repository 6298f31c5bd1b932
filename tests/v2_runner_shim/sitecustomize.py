"""Test-only shim: run vLLM's Model Runner V2 on this CPU machine.

vLLM 0.32/0.33 pick Model Runner V2 (``vllm/v1/worker/gpu/``, on the CPU
build ``vllm/v1/worker/cpu/model_runner.py``) whenever Triton has an active
backend; PyPI's ``triton`` wheel has none for CPUs, so the CPU build falls
back to V1 while every GPU runs V2. This file, put on ``PYTHONPATH`` with
``HIVTP_TEST_V2_RUNNER=1`` (``tests/runners.py`` does both for a server or
an in-process engine), lets V2 run here:

- ``TRITON_INTERPRET=1``: Triton's interpreter runs V2's kernels with numpy
  on the CPU (slow, exact);
- a stand-in ``"cpu"`` entry in ``triton.backends.backends``, which vLLM's
  CPU build reads as "Triton has a CPU backend" (``vllm.triton_utils``);
- Qwen3-VL's vision tower keeps its torch position-embedding path (the one
  V1 runs here): with Triton "present" it would run a per-token Triton
  kernel, about 10 s per image in the interpreter. What is under test is the
  runner, whose own kernels still run in Triton.

Python imports ``sitecustomize`` at start-up in every process, so the API
server, the engine core and the workers all get it. The plugin never
imports this file; nothing in ``hivtp_vllm`` depends on it.
"""

import importlib.abc
import importlib.machinery
import os
import sys

NATIVE_TOWERS = ("vllm.model_executor.models.qwen3_vl",)


class _NativeTower(importlib.abc.MetaPathFinder):
    """Sets ``HAS_TRITON = False`` in a tower module once it has run."""

    def find_spec(self, name, path, target=None):
        if name not in NATIVE_TOWERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.HAS_TRITON = False

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("HIVTP_TEST_V2_RUNNER") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
    try:
        from triton.backends import Backend, backends
        from triton.backends.compiler import BaseBackend
        from triton.backends.driver import DriverBase
    except ImportError:  # a Python without Triton (not vLLM's): V1, as the tests' log check says
        pass
    else:
        backends.setdefault("cpu", Backend(compiler=BaseBackend, driver=DriverBase))
        sys.meta_path.insert(0, _NativeTower())
