"""hivtp-vllm: HIVTP visual token pruning for vLLM's LLaVA-family models.

Installed, the package is found by vLLM through the ``vllm.general_plugins``
entry point, which calls :func:`register` in every vLLM process. The pure
algorithm lives in :mod:`hivtp_vllm.pruning` and :mod:`hivtp_vllm.scoring`
and imports no vLLM.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Architectures we override, and the class that serves each.
MODELS = {
    "LlavaForConditionalGeneration": "hivtp_vllm.models.llava:HivtpLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": (
        "hivtp_vllm.models.llava_next:HivtpLlavaNextForConditionalGeneration"
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "hivtp_vllm.models.llava_onevision:HivtpLlavaOnevisionForConditionalGeneration"
    ),
}


def register() -> None:
    """vLLM plugin entry point; vLLM may call it several times per process."""
    from vllm import ModelRegistry

    from hivtp_vllm.metrics import setup_server_side
    from hivtp_vllm.vllm_compat import (
        allow_hivtp_request_kwargs,
        check_vllm_version,
        let_vllm_limit_image_size,
    )

    check_vllm_version()
    setup_server_side()
    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    allow_hivtp_request_kwargs()
    let_vllm_limit_image_size()
