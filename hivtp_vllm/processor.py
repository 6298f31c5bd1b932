"""vLLM multimodal processors: reserve exactly the kept tokens per image.

vLLM lays out the prompt, and so the KV cache, before any image is encoded.
The processor therefore decides each image's kept counts here, from the
request's options and the image size alone, writes that many placeholders
into the prompt and hands the counts to the model in the image's multimodal
kwargs (``hivtp_num_keep``: one count per view, ``hivtp_global_fraction``).
The model then selects exactly those counts: they are computed in one place
and travel with the image, so the two sides cannot disagree.

A *view* is one grid that HIVTP selects on: LLaVA-1.5 has one (24 x 24);
LLaVA-NeXT has two, the base view and the stitched high-resolution grid,
plus one newline embedding per high-resolution row that is always kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ImageEmbeddingItems,
    ImageProcessorItems,
    MultiModalDataItems,
)
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from hivtp_vllm import metrics, params
from hivtp_vllm.views import supports_pruning

NUM_KEEP = "hivtp_num_keep"
GLOBAL_FRACTION = "hivtp_global_fraction"
DUMMY = "hivtp_dummy"  # 1 on vLLM's warm-up and profiling items: not counted


def as_client_error(exc: params.HivtpParamError) -> VLLMValidationError:
    """vLLM answers a VLLMValidationError with HTTP 400 naming the parameter."""
    return VLLMValidationError(str(exc), parameter=exc.key)


class HivtpInfoMixin:
    """Server options, per-request resolution and per-image counts.

    Families provide :meth:`hivtp_views`: the token count of each view of an
    image of a given size, and how many always-kept extra embeddings follow.
    """

    def hivtp_views(self, *, image_width: int, image_height: int) -> tuple[list[int], int]:
        raise NotImplementedError

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

    def hivtp_budgets(
        self, *, image_width: int, image_height: int, request: params.PruningRequest
    ) -> tuple[list[int], int]:
        """Kept tokens per view, and the always-kept extras, for one image."""
        sizes, extra = self.hivtp_views(image_width=image_width, image_height=image_height)
        try:
            return request.view_budgets(sizes), extra
        except params.HivtpParamError as exc:
            raise as_client_error(exc) from exc

    def get_num_pruned_tokens(
        self, *, image_width: int, image_height: int, request: params.PruningRequest
    ) -> int:
        """Placeholder tokens (embeddings) the image takes in the prompt."""
        budgets, extra = self.hivtp_budgets(
            image_width=image_width, image_height=image_height, request=request
        )
        return sum(budgets) + extra


class HivtpLlavaProcessingInfo(HivtpInfoMixin, LlavaProcessingInfo):
    """LLaVA-1.5: one H x W view per image, whatever its size."""

    def hivtp_views(self, *, image_width: int, image_height: int) -> tuple[list[int], int]:
        grid = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        return [grid], 0


class HivtpLlavaNextProcessingInfo(HivtpInfoMixin, LlavaNextProcessingInfo):
    """LLaVA-NeXT: the base view, the unpadded high-res grid, and its newlines."""

    def hivtp_views(self, *, image_width: int, image_height: int) -> tuple[list[int], int]:
        height, width = self.hivtp_highres_grid(image_width=image_width, image_height=image_height)
        side = self.get_vision_encoder_info().get_patch_grid_length()
        return [side * side, height * width], height

    def hivtp_highres_grid(self, *, image_width: int, image_height: int) -> tuple[int, int]:
        """(H', W') of the stitched, unpadded grid, exactly as vLLM counts it."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        encoder = self.get_vision_encoder_info()
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        features, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=tiles_h,
            num_patch_width=tiles_w,
        )
        return newlines, features // newlines


class HivtpProcessorMixin:
    """Processor hooks shared by the LLaVA families."""

    _hivtp_dummy = False

    def get_dummy_mm_inputs(self, *args, **kwargs):
        # vLLM's warm-up and memory profiling: mark their items, count nothing.
        self._hivtp_dummy = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._hivtp_dummy = False

    def apply(self, inputs, timing_ctx):
        result = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        if not self._hivtp_dummy:
            self._hivtp_count(inputs)
        return result

    def _hivtp_count(self, inputs) -> None:
        """Images, visual tokens and effective ratio of one request."""
        if "image" not in inputs.mm_data_items:
            return
        images = inputs.mm_data_items["image"]
        if not isinstance(images, ImageProcessorItems):
            return  # embeddings from the client: nothing was pruned
        info = self.info  # type: ignore[attr-defined]
        request = info.hivtp_request(inputs.hf_processor_mm_kwargs)
        totals: list[int] = []
        kept: list[int] = []
        ratios: list[float] = []
        for i in range(images.get_count()):
            if images.get(i) is None:
                continue  # referenced by uuid, pixels not at hand
            size = images.get_image_size(i)
            sizes, extra = info.hivtp_views(image_width=size.width, image_height=size.height)
            budgets = request.view_budgets(sizes)  # valid: apply() just used them
            totals.append(sum(sizes) + extra)
            kept.append(sum(budgets) + extra)
            ratios.append(sum(budgets) / sum(sizes))
        if totals:
            metrics.record_images(info.ctx.model_config.served_model_name, totals, kept, ratios)

    def _hivtp_budgets(
        self, images: ImageProcessorItems, request: params.PruningRequest
    ) -> list[list[int]]:
        sizes = (images.get_image_size(i) for i in range(images.get_count()))
        return [
            self.info.hivtp_budgets(  # type: ignore[attr-defined]
                image_width=size.width, image_height=size.height, request=request
            )[0]
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
        budgets = self._hivtp_budgets(ImageProcessorItems(mm_inputs["images"]), request)
        processed_data[NUM_KEEP] = torch.tensor(budgets, dtype=torch.long)
        processed_data[GLOBAL_FRACTION] = torch.full(
            (len(budgets),), request.global_fraction, dtype=torch.float64
        )
        processed_data[DUMMY] = torch.full((len(budgets),), int(self._hivtp_dummy))
        return processed_data

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),  # type: ignore[misc]
            NUM_KEEP: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            GLOBAL_FRACTION: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            DUMMY: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        info = self.info  # type: ignore[attr-defined]
        request = info.hivtp_request(hf_processor_mm_kwargs)
        token_id = info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            # Resolved lazily, per item, as vLLM asks: cached items are not in
            # ``mm_items`` and never get here.
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                # Embeddings given by the client keep their own size.
                return [token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            count = info.get_num_pruned_tokens(
                image_width=size.width, image_height=size.height, request=request
            )
            return [token_id] * count

        return [PromptReplacement(modality="image", target=[token_id], replacement=replacement)]


class HivtpLlavaMultiModalProcessor(HivtpProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA-1.5 processor with K placeholders per image instead of H x W."""


class HivtpLlavaNextMultiModalProcessor(HivtpProcessorMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT processor: K_base + K_hr + H' placeholders per image."""


__all__ = [
    "HivtpLlavaProcessingInfo",
    "HivtpLlavaMultiModalProcessor",
    "HivtpLlavaNextProcessingInfo",
    "HivtpLlavaNextMultiModalProcessor",
    "LlavaDummyInputsBuilder",
    "supports_pruning",
    "NUM_KEEP",
    "GLOBAL_FRACTION",
]
