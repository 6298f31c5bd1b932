"""hivtp-vllm: HIVTP visual token pruning for vLLM's LLaVA and Qwen-VL models.

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
    "Qwen2_5_VLForConditionalGeneration": (
        "hivtp_vllm.models.qwen2_5_vl:HivtpQwen2_5_VLForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "hivtp_vllm.models.qwen3_vl:HivtpQwen3VLForConditionalGeneration"
    ),
}


def register() -> None:
    """vLLM plugin entry point; vLLM may call it several times per process."""
    from vllm import ModelRegistry

    from hivtp_vllm.metrics import setup_server_side
    from hivtp_vllm.vllm_compat import (
        allow_hivtp_request_kwargs,
        check_vllm_version,
        let_cpu_v1_runner_recompute_mrope,
        let_vllm_limit_image_size,
    )

    check_vllm_version()
    setup_server_side()
    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    allow_hivtp_request_kwargs()
    let_vllm_limit_image_size()
    let_cpu_v1_runner_recompute_mrope()
