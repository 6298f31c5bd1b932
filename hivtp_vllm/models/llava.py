"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with HIVTP pruning.

Stock vLLM encodes each image into H x W features and projects them all. Here
the processor has already reserved K placeholders per image; the model runs
the same CLIP tower once, reading the middle band's attention on the way,
selects K tokens per image and returns their (unpruned) projected features
in raster order. Images with K = H x W take the stock path untouched.
"""

from __future__ import annotations

import time

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.models.common import HivtpModelMixin, select_views
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
        image_input, budgets, fractions = self._hivtp_inputs(kwargs)
        if image_input is None:
            return []
        num_keep = [row[0] for row in budgets or []]  # one view per image
        pruned = [i for i, k in enumerate(num_keep) if k < self.hivtp_side**2]
        if not pruned:
            return self._process_image_input(image_input)  # the stock path

        rows = torch.tensor(pruned)
        with self.hivtp_recorder.recording(rows):
            features = self._process_image_pixels(image_input)
        scores = self.hivtp_recorder.patch_scores()
        # Projecting every token then gathering equals gathering then
        # projecting (the projector is per token) and keeps the kept rows
        # bit-identical to the unpruned embeddings; it costs a fraction of a
        # percent of the language model's prefill.
        embeds = self.multi_modal_projector(features)
        side = self.hivtp_side
        start = time.perf_counter()
        kept = select_views(
            scores.view(len(pruned), side, side).unbind(0),
            [num_keep[i] for i in pruned],
            [fractions[i] for i in pruned],
            self.hivtp_server.regions,
        )
        self._hivtp_observe(time.perf_counter() - start)
        out = list(embeds.unbind(0))
        for row, indices in zip(pruned, kept, strict=True):
            out[row] = out[row][indices.to(embeds.device)]
        return out
