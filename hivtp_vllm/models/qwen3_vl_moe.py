"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``) with HIVTP pruning.

vLLM builds it on Qwen3-VL (vllm/model_executor/models/qwen3_vl_moe.py):
the same tower, DeepStack, processor and video pruning, with a
mixture-of-experts language model. Everything HIVTP does happens before the
language model (:class:`~hivtp_vllm.models.qwen3_vl.HivtpQwen3VLModelMixin`),
which then gets a shorter prompt as any other: the experts route each token
on its own hidden state, and nothing in the MoE path reads the prompt's
length beyond the token count of the step (docs/algorithm.md, "MoE language
models").
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.models.qwen import HivtpQwenInfoMixin
from hivtp_vllm.models.qwen3_vl import HivtpQwen3VLModelMixin, HivtpQwen3VLMultiModalProcessor


class HivtpQwen3VLMoeProcessingInfo(HivtpQwenInfoMixin, Qwen3VLMoeProcessingInfo):
    """Qwen3-VL's counts, read from the MoE model's config."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpQwen3VLMultiModalProcessor,
    info=HivtpQwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class HivtpQwen3VLMoeForConditionalGeneration(
    HivtpQwen3VLModelMixin, Qwen3VLMoeForConditionalGeneration
):
    """Qwen3-VL-MoE whose image embeddings (and DeepStack features) are pruned to K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data
