"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) with HIVTP pruning.

What only Qwen2.5-VL needs (the rest is :mod:`hivtp_vllm.models.qwen`):

- The band: the tower attends in windows except in
  ``fullatt_block_indexes``, and only full-attention layers are scored
  (:func:`~hivtp_vllm.pruning.windowed_band`).
- The order: the tower permutes each image's merged tokens by window and
  undoes it after the merger (``reverse_indices``); the scores of the merged
  tokens go through the same inverse permutation.
- vLLM's video pruning (EVS), when on: a video is one run of video tokens,
  and its kept tokens' positions are its unpruned ones, ``t`` scaled by
  ``second_per_grid_ts * tokens_per_second`` as vLLM's own positions are
  (vLLM's EVS columns truncate ``second_per_grid_ts`` to an integer first and
  round in bfloat16; these columns do neither).
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
from vllm.multimodal.video_prune.evs import compute_retention_mask

from hivtp_vllm import mrope
from hivtp_vllm.models.qwen import (
    MERGE_UNIT,
    HivtpQwenInfoMixin,
    HivtpQwenModelMixin,
    HivtpQwenProcessorMixin,
    with_channels,
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

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data

    def hivtp_band(self, start: int, count: int) -> Sequence[int]:
        return windowed_band(start, count, self.visual.fullatt_block_indexes)

    def hivtp_run_tower(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
        metadata = self.visual.prepare_encoder_metadata(grid_thw)
        merged = self.visual(pixel_values, grid_thw=grid_thw, encoder_metadata=metadata)
        reverse = metadata["reverse_indices"]

        def raster(scores: torch.Tensor) -> torch.Tensor:
            return scores[reverse.to(scores.device)]

        return merged, raster

    def hivtp_video_runs(self, input_tokens, feature) -> list[tuple[int, int, int, int]]:
        place = feature.mm_position
        full = int(feature.data["video_grid_thw"].data.prod()) // MERGE_UNIT
        if place.length >= full:
            return []
        return [(place.offset, place.length, full, self.config.video_token_id)]

    def hivtp_pruned_videos(self, embeds, video_input) -> list[torch.Tensor]:
        grid_thw = video_input["video_grid_thw"].tolist()
        seconds = video_input.get("second_per_grid_ts")
        # Missing for client embeddings: vLLM's own positions then take 1.0
        # (get_mrope_input_positions), as these do. (vLLM's video pruning
        # raises here instead, which inside the forward stops the engine.)
        seconds = [1.0] * len(grid_thw) if seconds is None else seconds.tolist()
        merge = self.visual.spatial_merge_size
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out = []
        for emb, (t, h, w), second in zip(embeds, grid_thw, seconds, strict=True):
            keep = compute_retention_mask(
                emb, (t, h, w), spatial_merge_size=merge, q=self.video_pruning_rate
            )
            # As vLLM's positions of the unpruned video (get_mrope_input_positions).
            frames = (torch.arange(t, dtype=torch.float64) * (second * per_second)).long()
            grid = torch.meshgrid(
                frames, torch.arange(h // merge), torch.arange(w // merge), indexing="ij"
            )
            relative = torch.stack(grid, dim=-1).view(-1, 3)[keep.cpu()]
            slots = torch.arange(len(relative))
            extent = max(int(frames[-1]), h // merge - 1, w // merge - 1) + 1  # the unpruned run's
            channels = mrope.row_channels(slots, relative, 0, emb.dtype, extent)
            out.append(with_channels(emb[keep], channels))
        return out
