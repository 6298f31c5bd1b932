"""vLLM multimodal processor: reserve exactly K placeholder tokens per image.

vLLM lays out the prompt, and so the KV cache, before any image is encoded.
The processor therefore decides each image's kept count K here, from the
request's options and the image size alone, writes K placeholders into the
prompt and hands K to the model in the image's multimodal kwargs
(``hivtp_num_keep``, ``hivtp_global_fraction``). The model then selects
exactly K tokens: the count is computed in one place and travels with the
image, so the two sides cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature, CLIPVisionConfig
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ImageEmbeddingItems,
    ImageProcessorItems,
    MultiModalDataItems,
)
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from hivtp_vllm import params

NUM_KEEP = "hivtp_num_keep"
GLOBAL_FRACTION = "hivtp_global_fraction"


def supports_pruning(hf_config: object) -> bool:
    """HIVTP needs a CLIP grid without CLS among the features ("default")."""
    return (
        isinstance(getattr(hf_config, "vision_config", None), CLIPVisionConfig)
        and getattr(hf_config, "vision_feature_select_strategy", None) == "default"
    )


def as_client_error(exc: params.HivtpParamError) -> VLLMValidationError:
    """vLLM answers a VLLMValidationError with HTTP 400 naming the parameter."""
    return VLLMValidationError(str(exc), parameter=exc.key)


class HivtpInfoMixin:
    """Server options and per-request resolution, shared by the LLaVA families."""

    def hivtp_server_options(self) -> params.ServerOptions:
        mm_config = self.ctx.get_mm_config()  # type: ignore[attr-defined]
        return params.parse_server(mm_config.mm_processor_kwargs)

    def hivtp_request(self, request_kwargs: Mapping[str, object]) -> params.PruningRequest:
        """The request's effective pruning, or a 400-ready error."""
        try:
            request = params.resolve(self.hivtp_server_options(), request_kwargs)
        except params.HivtpParamError as exc:
            raise as_client_error(exc) from exc
        if request.prunes and not supports_pruning(self.get_hf_config()):  # type: ignore[attr-defined]
            raise VLLMValidationError(
                "hivtp pruning needs a CLIP vision tower with "
                "vision_feature_select_strategy='default'; this model has neither",
                parameter=params.RATIO,
            )
        return request

    def hivtp_num_keep(self, grid_tokens: int, request: params.PruningRequest) -> int:
        try:
            return request.num_keep(grid_tokens)
        except params.HivtpParamError as exc:
            raise as_client_error(exc) from exc


class HivtpLlavaProcessingInfo(HivtpInfoMixin, LlavaProcessingInfo):
    """LLaVA-1.5: every image gives the same H x W grid."""

    def get_num_pruned_tokens(
        self, *, image_width: int, image_height: int, request: params.PruningRequest
    ) -> int:
        grid = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.hivtp_num_keep(grid, request)


class HivtpProcessorMixin:
    """Processor hooks shared by the LLaVA families.

    The processing info provides ``get_num_pruned_tokens``: the number of
    embeddings (and so placeholders) an image of a given size produces.
    """

    def _hivtp_counts(
        self, images: ImageProcessorItems, request: params.PruningRequest
    ) -> list[int]:
        sizes = (images.get_image_size(i) for i in range(images.get_count()))
        return [
            self.info.get_num_pruned_tokens(  # type: ignore[attr-defined]
                image_width=size.width, image_height=size.height, request=request
            )
            for size in sizes
        ]

    def _call_hf_processor(self, hf_data, hf_kwargs):
        # Our keys mean nothing to the HF processor; keep them out of it.
        _, rest = params.split_hivtp_keys(hf_kwargs)
        return super()._call_hf_processor(hf_data, rest)  # type: ignore[misc]

    def _get_mm_hashes(self, inputs):
        # Cache keys (processor cache, encoder cache, prefix cache) carry the
        # effective pruning rather than the raw request keys: an image pruned
        # one way is never reused for a request that asked for another, and a
        # request that prunes nothing hashes exactly as in stock vLLM.
        request = self.info.hivtp_request(inputs.hf_processor_mm_kwargs)  # type: ignore[attr-defined]
        _, rest = params.split_hivtp_keys(inputs.hf_processor_mm_kwargs)
        if request.prunes:
            rest["hivtp"] = dataclasses.astuple(request)
        inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=rest)
        return super()._get_mm_hashes(inputs)  # type: ignore[misc]

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(  # type: ignore[misc]
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        if "pixel_values" not in processed_data:
            return processed_data  # precomputed embeddings are passed through
        request = self.info.hivtp_request(hf_processor_mm_kwargs)  # type: ignore[attr-defined]
        counts = self._hivtp_counts(ImageProcessorItems(mm_inputs["images"]), request)
        processed_data[NUM_KEEP] = torch.tensor(counts, dtype=torch.long)
        processed_data[GLOBAL_FRACTION] = torch.full(
            (len(counts),), request.global_fraction, dtype=torch.float64
        )
        return processed_data

    def _hivtp_fields(self) -> dict[str, MultiModalFieldConfig]:
        return {
            NUM_KEEP: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            GLOBAL_FRACTION: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }


class HivtpLlavaMultiModalProcessor(HivtpProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA-1.5 processor with K placeholders per image instead of H x W."""

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            **self._hivtp_fields(),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        request = self.info.hivtp_request(hf_processor_mm_kwargs)
        token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            # Resolved lazily, per item, as vLLM asks: cached items are not in
            # ``mm_items`` and never get here.
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                # Embeddings given by the client keep their own size.
                return [token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            count = self.info.get_num_pruned_tokens(
                image_width=size.width, image_height=size.height, request=request
            )
            return [token_id] * count

        return [PromptReplacement(modality="image", target=[token_id], replacement=replacement)]


__all__ = [
    "HivtpLlavaProcessingInfo",
    "HivtpLlavaMultiModalProcessor",
    "LlavaDummyInputsBuilder",
    "supports_pruning",
    "NUM_KEEP",
    "GLOBAL_FRACTION",
]
