"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) with HIVTP pruning.

What only Qwen2.5-VL needs (the rest is :mod:`hivtp_vllm.models.qwen`):

- The band: the tower attends in windows except in
  ``fullatt_block_indexes``, and only full-attention layers are scored
  (:func:`~hivtp_vllm.pruning.windowed_band`).
- The order: the tower permutes each image's merged tokens by window and
  undoes it after the merger (``reverse_indices``); the scores of the merged
  tokens go through the same inverse permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.models.qwen import (
    HivtpQwenInfoMixin,
    HivtpQwenModelMixin,
    HivtpQwenProcessorMixin,
)
from hivtp_vllm.pruning import windowed_band


class HivtpQwen2_5_VLProcessingInfo(HivtpQwenInfoMixin, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL: one merged grid per image, sized by ``smart_resize``."""


class HivtpQwen2_5_VLMultiModalProcessor(HivtpQwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL processor with K image pads per image; videos as in vLLM."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpQwen2_5_VLMultiModalProcessor,
    info=HivtpQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class HivtpQwen2_5_VLForConditionalGeneration(
    HivtpQwenModelMixin, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2.5-VL whose image embeddings are pruned to the processor's K."""

    # Declared on the class vLLM loads (its flag cache is keyed on this file).
    supports_encoder_tp_data = True

    def hivtp_band(self, start: int, count: int) -> Sequence[int]:
        return windowed_band(start, count, self.visual.fullatt_block_indexes)

    def hivtp_run_tower(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
        metadata = self.visual.prepare_encoder_metadata(grid_thw)
        merged = self.visual(pixel_values, grid_thw=grid_thw, encoder_metadata=metadata)
        reverse = metadata["reverse_indices"]

        def raster(scores: torch.Tensor) -> torch.Tensor:
            return scores[reverse.to(scores.device)]

        return merged, raster
