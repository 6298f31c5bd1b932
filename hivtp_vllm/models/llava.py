"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with HIVTP pruning.

Stock vLLM encodes each image into H x W features and projects them all. Here
the processor has already reserved K placeholders per image; the model runs
the same CLIP tower once, reading the middle band's attention on the way,
selects K tokens per image and returns their (unpruned) projected features
in raster order. Images with K = H x W take the stock path untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.contract import Layout, Plan
from hivtp_vllm.models.common import HivtpModelMixin, pruned_images
from hivtp_vllm.processor import NO_KWARGS, HivtpInfoMixin, HivtpProcessorMixin


class HivtpLlavaProcessingInfo(HivtpInfoMixin, LlavaProcessingInfo):
    """LLaVA-1.5: one H x W view per image, whatever its size."""

    def hivtp_layout(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object] = NO_KWARGS
    ) -> Layout:
        side = self.get_vision_encoder_info().get_patch_grid_length()
        return Layout(grids=((side, side),))


class HivtpLlavaMultiModalProcessor(HivtpProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA-1.5 processor with K placeholders per image instead of H x W."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpLlavaMultiModalProcessor,
    info=HivtpLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class HivtpLlavaForConditionalGeneration(HivtpModelMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 whose image embeddings are pruned to the processor's K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        image_input, plans = self._hivtp_inputs(kwargs)
        if image_input is None:
            return []
        pruned, scored = pruned_images(plans)
        if not pruned:
            return self._process_image_input(image_input)  # the stock path
        recording = self.hivtp_recorder.recording(torch.tensor(scored)) if scored else nullcontext()
        with recording:
            features = self._process_image_pixels(image_input)
        scores = (
            dict(zip(scored, self.hivtp_recorder.patch_scores(), strict=True)) if scored else {}
        )
        # Projecting every token then gathering equals gathering then
        # projecting (the projector is per token) and keeps the kept rows
        # bit-identical to the unpruned embeddings; it costs a fraction of a
        # percent of the language model's prefill.
        embeds = self.multi_modal_projector(features)
        return self.hivtp_emit(embeds, {i: scores.get(i) for i in pruned}, plans)

    def hivtp_emit(
        self,
        embeds: torch.Tensor,
        scores: Mapping[int, torch.Tensor | None],
        plans: Sequence[Plan],
    ) -> list[torch.Tensor]:
        """Each image's kept embeddings, in raster order, from all of them.

        ``embeds`` is ``[images, H*W, D]``; ``scores[i]`` the patch scores of
        image ``i`` where it is pruned, None where it takes the uniform
        baseline (the count property tests run this on random tensors).
        """
        views = {i: None if s is None else [s] for i, s in scores.items()}
        kept = self._hivtp_select(plans, views, embeds.device)
        out = list(embeds.unbind(0))
        for row, (indices,) in kept.items():
            out[row] = out[row][indices.to(embeds.device)]
        return out
