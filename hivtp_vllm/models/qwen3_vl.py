"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) with HIVTP pruning.

What only Qwen3-VL needs (the rest is :mod:`hivtp_vllm.models.qwen`):

- The band: every layer attends over the whole image, so the band is
  section 1's (m, q) of the tower's depth.
- The order: the tower keeps merged tokens in raster order (no windows).
- DeepStack: the tower's output row of a merged token is its main feature
  and its DeepStack features side by side on the hidden dimension (vLLM
  splits them off in ``embed_input_ids``), so keeping a row keeps both.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.models.qwen import (
    HivtpQwenInfoMixin,
    HivtpQwenModelMixin,
    HivtpQwenProcessorMixin,
)


class HivtpQwen3VLProcessingInfo(HivtpQwenInfoMixin, Qwen3VLProcessingInfo):
    """Qwen3-VL: one merged grid per image (32 px a token), sized by ``smart_resize``."""


class HivtpQwen3VLMultiModalProcessor(HivtpQwenProcessorMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL processor with K image pads per image; videos as in vLLM."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpQwen3VLMultiModalProcessor,
    info=HivtpQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class HivtpQwen3VLForConditionalGeneration(HivtpQwenModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose image embeddings (and DeepStack features) are pruned to K."""

    # Declared on the class vLLM loads (its flag cache is keyed on this file).
    supports_encoder_tp_data = True

    def hivtp_run_tower(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
        merged = self.visual(pixel_values, grid_thw=grid_thw)
        return merged, lambda scores: scores
