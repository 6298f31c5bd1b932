"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) with HIVTP pruning.

A SigLIP tower (no CLS: every position is a patch, docs/spec.md section 5) at
384 px, 27 x 27 = 729 tokens a view; ``anyres_max_9`` images: the base view
plus up to 6 x 6 tiles stitched and unpadded, then shrunk bilinearly when
the grid holds more than about nine views' tokens, a newline per row. The
tiles' scores go through the same stitch, unpad and shrink as the features,
and HIVTP runs on the grid the language model receives
(:mod:`hivtp_vllm.models.anyres`). Videos are served as in vLLM: it pools
their frames already, and the hivtp keys apply to a request's images only.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm import contract
from hivtp_vllm.contract import Plan
from hivtp_vllm.models.anyres import HivtpAnyresInfoMixin, HivtpAnyresMixin
from hivtp_vllm.models.common import HivtpModelMixin
from hivtp_vllm.processor import HivtpProcessorMixin
from hivtp_vllm.views import shrink


class HivtpLlavaOnevisionProcessingInfo(HivtpAnyresInfoMixin, LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision: as LLaVA-NeXT, the high-res grid shrunk past ~9 views.

    Videos are not pruned: vLLM pools their frames already, and the hivtp
    keys apply to a request's images only.
    """


class HivtpLlavaOnevisionMultiModalProcessor(
    HivtpProcessorMixin, LlavaOnevisionMultiModalProcessor
):
    """LLaVA-OneVision processor: K_base + K_hr + H' placeholders per image;
    videos as in vLLM."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpLlavaOnevisionMultiModalProcessor,
    info=HivtpLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class HivtpLlavaOnevisionForConditionalGeneration(
    HivtpAnyresMixin, HivtpModelMixin, LlavaOnevisionForConditionalGeneration
):
    """LLaVA-OneVision whose images are pruned to the processor's K; videos untouched."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        plans = contract.pop_plans(kwargs)
        if self.hivtp_recorder is None:
            plans = None
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, item in inputs.items():  # vLLM's order of modalities
            if modality == "image":
                out += tuple(self.hivtp_embed_images(item, plans))
            else:
                out += tuple(self._process_video_pixels(item))
        return out

    def hivtp_highres_scores(self, tile_scores: torch.Tensor, plan: Plan, size) -> torch.Tensor:
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = super().hivtp_highres_scores(tile_scores, plan, size)
        return shrink(grid[None], side)[0]

    def hivtp_merge(self, size: torch.Tensor, tile_embeds: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(
            size, tile_embeds, image_newline=self.image_newline, strategy="spatial_unpad"
        )
