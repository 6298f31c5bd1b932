"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``) and Qwen3.5-MoE
(``Qwen3_5MoeForConditionalGeneration``) with HIVTP pruning.

vLLM builds both on Qwen3-VL (vllm/model_executor/models/qwen3_5.py): its
tower (without DeepStack), processor and video pruning, with a hybrid
language model (Gated DeltaNet layers between attention layers; dense or
mixture-of-experts). HIVTP prunes before the language model
(:class:`~hivtp_vllm.models.qwen3_vl.HivtpQwen3VLModelMixin`): the pruned
prompt is a shorter prompt for the delta-net state and the KV cache alike,
and its kept tokens keep their unpruned M-RoPE positions in the attention
layers (the delta-net layers take no positions). vLLM's prefix caching of
hybrid models works by the prompt's block hashes, which carry the image's
hash and the request's options (docs/algorithm.md, "Hybrid language
models").
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm import vllm_compat
from hivtp_vllm.models.qwen import HivtpQwenInfoMixin
from hivtp_vllm.models.qwen3_vl import HivtpQwen3VLModelMixin, HivtpQwen3VLMultiModalProcessor


class HivtpQwen3_5ModelMixin(HivtpQwen3VLModelMixin):
    """Refuses vLLM's video pruning, which vLLM's Qwen3.5 classes never set up.

    Their ``__init__`` (vLLM 0.32 and 0.33, qwen3_5.py) sets the pruning rate
    but not ``video_pruning_method`` (``Qwen3VLForConditionalGeneration.
    _init_video_pruning`` is not called), so with ``--video-pruning-rate``
    stock vLLM stops at the first video (``_postprocess_video_embeds_evs``).
    Refusing at start says so before any client is served.
    """

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        if vllm_compat.video_pruning_on(vllm_config):
            raise ValueError(
                "hivtp: --video-pruning-rate is not supported for "
                f"{vllm_config.model_config.architecture}: vLLM's Qwen3.5 classes do not set "
                "up their video pruning (stock vLLM fails at the first video). Serve without "
                "it; hivtp's image pruning (hivtp_retain_ratio, hivtp_num_tokens) is unaffected."
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)


class HivtpQwen3_5ProcessingInfo(HivtpQwenInfoMixin, Qwen3_5ProcessingInfo):
    """Qwen3-VL's counts, read from Qwen3.5's config."""


class HivtpQwen3_5MoeProcessingInfo(HivtpQwenInfoMixin, Qwen3_5MoeProcessingInfo):
    """Qwen3-VL's counts, read from Qwen3.5-MoE's config."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpQwen3VLMultiModalProcessor,
    info=HivtpQwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class HivtpQwen3_5ForConditionalGeneration(HivtpQwen3_5ModelMixin, Qwen3_5ForConditionalGeneration):
    """Qwen3.5 whose image embeddings are pruned to K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data


@MULTIMODAL_REGISTRY.register_processor(
    HivtpQwen3VLMultiModalProcessor,
    info=HivtpQwen3_5MoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class HivtpQwen3_5MoeForConditionalGeneration(
    HivtpQwen3_5ModelMixin, Qwen3_5MoeForConditionalGeneration
):
    """Qwen3.5-MoE whose image embeddings are pruned to K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data
