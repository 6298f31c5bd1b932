"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with HIVTP pruning.

Stock vLLM encodes each image into H x W features and projects them all. Here
the processor has already reserved K placeholders per image; the model runs
the same CLIP tower once, reading the middle band's attention on the way,
selects K tokens per image and returns their (unpruned) projected features
in raster order. Images with K = H x W take the stock path untouched.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm import params
from hivtp_vllm.models.common import build_recorder, select_views
from hivtp_vllm.processor import (
    GLOBAL_FRACTION,
    NUM_KEEP,
    HivtpLlavaMultiModalProcessor,
    HivtpLlavaProcessingInfo,
    LlavaDummyInputsBuilder,
    supports_pruning,
)


@MULTIMODAL_REGISTRY.register_processor(
    HivtpLlavaMultiModalProcessor,
    info=HivtpLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class HivtpLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 whose image embeddings are pruned to the processor's K."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mm_config = vllm_config.model_config.multimodal_config
        self.hivtp_server = params.parse_server(
            mm_config.mm_processor_kwargs if mm_config else None
        )
        self.hivtp_recorder = None
        if supports_pruning(self.config):
            vision = self.config.vision_config
            side = vision.image_size // vision.patch_size
            self.hivtp_grid = (side, side)
            self.hivtp_recorder = build_recorder(
                self.vision_tower.vision_model, vision.num_hidden_layers, self.hivtp_server
            )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        num_keep = kwargs.pop(NUM_KEEP, None)
        fractions = kwargs.pop(GLOBAL_FRACTION, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if num_keep is None or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        num_keep = [int(k) for k in num_keep[:, 0]]  # one view per image
        grid_tokens = self.hivtp_grid[0] * self.hivtp_grid[1]
        pruned = [i for i, k in enumerate(num_keep) if k < grid_tokens]
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
        kept = select_views(
            scores.view(len(pruned), *self.hivtp_grid).unbind(0),
            [num_keep[i] for i in pruned],
            [float(fractions[i]) for i in pruned],
            self.hivtp_server.regions,
        )
        out = list(embeds.unbind(0))
        for row, indices in zip(pruned, kept, strict=True):
            out[row] = out[row][indices.to(embeds.device)]
        return out
