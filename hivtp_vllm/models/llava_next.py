"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) with HIVTP pruning.

The base view (24 x 24 for CLIP-L at 336 px) and the unpadded
high-resolution grid are pruned as two views, every row's newline kept
(:mod:`hivtp_vllm.models.anyres`).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.models.anyres import HivtpAnyresInfoMixin, HivtpAnyresMixin
from hivtp_vllm.models.common import HivtpModelMixin
from hivtp_vllm.processor import HivtpProcessorMixin


class HivtpLlavaNextProcessingInfo(HivtpAnyresInfoMixin, LlavaNextProcessingInfo):
    """LLaVA-NeXT: the base view, the unpadded high-res grid, and its newlines."""


class HivtpLlavaNextMultiModalProcessor(HivtpProcessorMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT processor: K_base + K_hr + H' placeholders per image."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpLlavaNextMultiModalProcessor,
    info=HivtpLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class HivtpLlavaNextForConditionalGeneration(
    HivtpAnyresMixin, HivtpModelMixin, LlavaNextForConditionalGeneration
):
    """LLaVA-NeXT whose base view and high-res grid are pruned to the processor's K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        image_input, plans = self._hivtp_inputs(kwargs)
        if image_input is None:
            return []
        return self.hivtp_embed_images(image_input, plans)

    def hivtp_merge(self, size: torch.Tensor, tile_embeds: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(size, tile_embeds, strategy="spatial_unpad")
