"""hivtp-vllm: HIVTP visual token pruning for vLLM's LLaVA and Qwen-VL models.

Installed, the package is found by vLLM through the ``vllm.general_plugins``
entry point, which calls :func:`register` in every vLLM process. The pure
algorithm lives in :mod:`hivtp_vllm.pruning` and :mod:`hivtp_vllm.scoring`
and imports no vLLM; the architectures served are the rows of
:data:`hivtp_vllm.families.FAMILIES`.
"""

from __future__ import annotations

from hivtp_vllm.families import FAMILIES
from hivtp_vllm.version import __version__

# Architectures we override, and the class that serves each (lazily, "module:Class").
MODELS = {family.architecture: family.model for family in FAMILIES.values()}


def register() -> None:
    """vLLM plugin entry point; vLLM may call it several times per process."""
    from vllm import ModelRegistry

    from hivtp_vllm import vllm_compat
    from hivtp_vllm.metrics import setup_server_side

    vllm_compat.check_vllm_version()
    setup_server_side()
    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    vllm_compat.apply_patches()


__all__ = ["MODELS", "__version__", "register"]
