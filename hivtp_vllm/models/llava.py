"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with HIVTP pruning.

Stock vLLM encodes each image into H x W features and projects them all. Here
the processor has already reserved K placeholders per image; the model runs
the same CLIP tower once, reading the middle band's attention on the way,
selects K tokens per image and returns their (unpruned) projected features
in raster order. Images with K = H x W take the stock path untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.contract import Plan
from hivtp_vllm.models.common import HivtpModelMixin
from hivtp_vllm.processor import (
    HivtpLlavaMultiModalProcessor,
    HivtpLlavaProcessingInfo,
    LlavaDummyInputsBuilder,
)


@MULTIMODAL_REGISTRY.register_processor(
    HivtpLlavaMultiModalProcessor,
    info=HivtpLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class HivtpLlavaForConditionalGeneration(HivtpModelMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 whose image embeddings are pruned to the processor's K."""

    # vLLM keeps ``--mm-encoder-tp-mode data`` only for a model class that
    # declares it (stock LLaVA falls back to "weights"); the mixin's
    # _image_pixels_to_features implements it. Declared here, not in the
    # mixin: vLLM caches this flag keyed on the hash of this file alone.
    supports_encoder_tp_data = True

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        image_input, plans = self._hivtp_inputs(kwargs)
        if image_input is None:
            return []
        pruned = [i for i, plan in enumerate(plans or []) if plan.prunes]
        if not pruned:
            return self._process_image_input(image_input)  # the stock path

        # Scores only for the images HIVTP selects on; the uniform baseline
        # needs none, so a batch of uniform images runs the tower unobserved.
        scored = [i for i in pruned if not plans[i].uniform]
        if scored:
            with self.hivtp_recorder.recording(torch.tensor(scored)):
                features = self._process_image_pixels(image_input)
            scores = dict(zip(scored, self.hivtp_recorder.patch_scores(), strict=True))
        else:
            features = self._process_image_pixels(image_input)
            scores = {}
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
        grids = [plans[i].layout.grids[0] for i in scores]
        maps = [
            None if s is None else s.view(grid)
            for s, grid in zip(scores.values(), grids, strict=True)
        ]
        kept = self._hivtp_select(
            grids,
            maps,
            [plans[i].keep[0] for i in scores],
            [plans[i].global_fraction for i in scores],
            embeds.device,
        )
        out = list(embeds.unbind(0))
        for row, indices in zip(scores, kept, strict=True):
            out[row] = out[row][indices.to(embeds.device)]
        return out
