"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) with HIVTP pruning.

What only Qwen3-VL needs (the rest is :mod:`hivtp_vllm.models.qwen`):

- The band: every layer attends over the whole image, so the band is
  section 1's (m, q) of the tower's depth.
- The order: the tower keeps merged tokens in raster order (no windows).
- DeepStack: the tower's output row of a merged token is its main feature
  and its DeepStack features side by side on the hidden dimension (vLLM
  splits them off in ``embed_input_ids``), so keeping a row keeps both.
- vLLM's video pruning (EVS), when on: vLLM lays a pruned video out as one
  run (each frame's timestamp text, ``<|vision_start|>``, its kept tokens,
  ``<|vision_end|>``), all of it embedded, with the placeholder's tokens
  lumped into the first frame; vLLM's rows carry each row's unpruned
  position in the run, which go into this plugin's columns.
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

from hivtp_vllm import mrope
from hivtp_vllm.models.qwen import (
    MERGE_UNIT,
    HivtpQwenInfoMixin,
    HivtpQwenModelMixin,
    HivtpQwenProcessorMixin,
)


class HivtpQwen3VLProcessingInfo(HivtpQwenInfoMixin, Qwen3VLProcessingInfo):
    """Qwen3-VL: one merged grid per image (32 px a token), sized by ``smart_resize``."""


class HivtpQwen3VLMultiModalProcessor(HivtpQwenProcessorMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL processor with K image pads per image; videos as in vLLM."""


class HivtpQwen3VLModelMixin(HivtpQwenModelMixin):
    """Qwen3-VL's tower, DeepStack rows and video pruning, for every model
    vLLM builds on ``Qwen3VLForConditionalGeneration`` (Qwen3-VL, its MoE,
    Qwen3.5 dense and MoE): they share its tower, processor and video code."""

    def hivtp_run_tower(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
        merged = self.visual(pixel_values, grid_thw=grid_thw)  # type: ignore[attr-defined]
        return merged, lambda scores: scores

    def hivtp_video_runs(self, input_tokens, feature) -> list[tuple[int, int, int, int]]:
        """One run a frame whose token count differs from the unpruned one."""
        config = self.config  # type: ignore[attr-defined]
        place = feature.mm_position
        _, h, w = feature.data["video_grid_thw"].data.tolist()
        per_frame = h * w // MERGE_UNIT
        block = torch.as_tensor(input_tokens[place.offset : place.offset + place.length])
        starts = (
            (block == config.vision_start_token_id).nonzero().flatten() + place.offset
        ).tolist()
        ends = ((block == config.vision_end_token_id).nonzero().flatten() + place.offset).tolist()
        return [
            (s + 1, e - s - 1, per_frame, config.video_token_id)
            for s, e in zip(starts, ends, strict=True)
            if e - s - 1 != per_frame
        ]

    def hivtp_pruned_videos(self, embeds, video_input):
        # vLLM's own: prune, lay the run out, embed its text; the position
        # columns come from _get_expanded_positions below.
        return self._postprocess_video_embeds_evs(embeds, video_input)  # type: ignore[attr-defined]

    def _get_expanded_positions(self, *args, **kwargs) -> torch.Tensor:
        # Overrides vLLM's (0.32 and 0.33, qwen3_vl.py), which gives a pruned
        # video run's rows [t, h, w, is_vision_start, is_video]: the first
        # three, unpruned positions from the run's start, are exact here
        # (int64) and round once cast to the embedding dtype, so they are
        # written as this plugin's columns instead.
        columns = super()._get_expanded_positions(*args, **kwargs)  # type: ignore[misc]
        lead = int(columns[:, 3].nonzero()[0]) + 1  # the first frame's <|vision_start|>, + 1
        slots = torch.arange(len(columns))
        channels = mrope.row_channels(slots, columns[:, :3], lead, columns.dtype)
        return channels.to(columns.device)


@MULTIMODAL_REGISTRY.register_processor(
    HivtpQwen3VLMultiModalProcessor,
    info=HivtpQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class HivtpQwen3VLForConditionalGeneration(HivtpQwen3VLModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose image embeddings (and DeepStack features) are pruned to K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data
