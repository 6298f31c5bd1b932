"""vLLM multimodal processors, what every family shares: reserve exactly the
kept tokens per image.

vLLM lays out the prompt, and so the KV cache, before any image is encoded.
The processor therefore decides each image's plan here, from the request's
options and the image size alone (:mod:`hivtp_vllm.contract`), writes that
many placeholders into the prompt and hands the plan to the model in the
image's multimodal kwargs. The model follows the plan: counts and grids are
computed in one place and travel with the image, so the two sides cannot
disagree, and every check runs here, in the API server, where a bad value is
an HTTP 400 and not an engine crash.

A family's own processing info and processor (how an image of a given size
lands in the prompt: :meth:`HivtpInfoMixin.hivtp_layout`) live in its module
in :mod:`hivtp_vllm.models`, with its model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ImageEmbeddingItems,
    ImageProcessorItems,
    MultiModalDataItems,
)
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails

from hivtp_vllm import contract, metrics, params
from hivtp_vllm.contract import Layout, Plan
from hivtp_vllm.views import supports_pruning

# Processor-internal values handed to the hooks vLLM calls inside ``apply``,
# in the processor kwargs that vLLM passes them (``hivtp_`` keys, so they never
# reach the HF processor or a cache key): the request's pruning, resolved
# once per ``apply``, and whether the items are vLLM's dummies (warm-up and
# memory profiling: planned, not counted in the metrics).
RESOLVED = "hivtp_resolved"
DUMMY = "hivtp_dummy"
# What ``get_dummy_inputs`` puts under DUMMY: an object no request can carry,
# so a client's own ``hivtp_dummy`` stays an unknown key (a 400), not a way
# to keep its images out of the metrics.
_DUMMY_MARK = object()
NO_KWARGS: Mapping[str, object] = {}


def other_kwargs(mm_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The request's processor options that are not ours."""
    return params.split_hivtp_keys(mm_kwargs)[1]


def as_client_error(exc: params.HivtpParamError) -> VLLMValidationError:
    """vLLM answers a VLLMValidationError with HTTP 400 naming the parameter."""
    return VLLMValidationError(str(exc), parameter=exc.key)


class HivtpInfoMixin:
    """Server options, per-request resolution and per-image plans.

    Families provide :meth:`hivtp_layout`: how an image of a given size
    lands in the prompt unpruned, computed the way vLLM counts it.
    """

    def hivtp_layout(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object] = NO_KWARGS
    ) -> Layout:
        """``mm_kwargs``: the request's other processor options (Qwen-VL's
        pixel bounds change its grid; LLaVA has none that matter)."""
        raise NotImplementedError

    def get_hf_processor(self, **kwargs: object):
        """vLLM's HF processor for the request's other options.

        vLLM's processors ask for it with the whole processor kwargs, and
        builds (from disk) and caches one per distinct set: with the ``hivtp_``
        keys in them, every new pruning option loaded the processor and its
        tokenizer again (seconds for a 262k-token vocabulary, on every
        request with a new ratio) and handed the keys to transformers."""
        return super().get_hf_processor(**other_kwargs(kwargs))  # type: ignore[misc]

    def hivtp_supported(self) -> bool:
        """Whether HIVTP can score and prune this checkpoint's images."""
        return supports_pruning(self.get_hf_config())  # type: ignore[attr-defined]

    def hivtp_image_token_id(self) -> int:
        return self.get_hf_config().image_token_index  # type: ignore[attr-defined]

    def hivtp_server_options(self) -> params.ServerOptions:
        mm_config = self.ctx.get_mm_config()  # type: ignore[attr-defined]
        return params.parse_server(mm_config.mm_processor_kwargs)

    def hivtp_request(self, request_kwargs: Mapping[str, object]) -> params.PruningRequest:
        """The request's effective pruning, or a 400-ready error."""
        resolved = request_kwargs.get(RESOLVED)
        if isinstance(resolved, params.PruningRequest):
            return resolved
        try:
            request = params.resolve(self.hivtp_server_options(), request_kwargs)
        except params.HivtpParamError as exc:
            raise as_client_error(exc) from exc
        if request.prunes and not self.hivtp_supported():
            raise VLLMValidationError(
                "hivtp pruning needs a CLIP vision tower with "
                "vision_feature_select_strategy='default' or a SigLIP one with 'full'; "
                "this model has neither",
                parameter=params.RATIO,
            )
        return request

    def hivtp_plan(
        self,
        *,
        image_width: int,
        image_height: int,
        request: params.PruningRequest,
        mm_kwargs: Mapping[str, object] = NO_KWARGS,
    ) -> Plan:
        """One image's plan, or a 400 naming the key (a budget too large for it)."""
        layout = self.hivtp_layout(
            image_width=image_width, image_height=image_height, mm_kwargs=mm_kwargs
        )
        try:
            return contract.plan(layout, request)
        except params.HivtpParamError as exc:
            raise as_client_error(exc) from exc

    def hivtp_replacement(self, plan: Plan) -> list[int] | PromptUpdateDetails:
        """What an image of ``plan`` takes in the prompt: its ``plan.tokens``
        image tokens, every one an embedding (LLaVA). A family whose tokens
        sit inside a wrapper of its own (Gemma's ``<start_of_image>`` ...
        ``<end_of_image>``) writes the wrapper around the kept tokens and
        marks only those as embeddings."""
        return [self.hivtp_image_token_id()] * plan.tokens

    def get_num_pruned_tokens(
        self,
        *,
        image_width: int,
        image_height: int,
        request: params.PruningRequest,
        mm_kwargs: Mapping[str, object] = NO_KWARGS,
    ) -> int:
        """Placeholder tokens (embeddings) the image takes in the prompt."""
        return self.hivtp_plan(
            image_width=image_width, image_height=image_height, request=request, mm_kwargs=mm_kwargs
        ).tokens


class HivtpProcessorMixin:
    """Processor hooks shared by the families.

    ``apply`` resolves the request once and passes it on to the hooks vLLM
    calls inside it; each image's :class:`~hivtp_vllm.contract.Plan` is
    computed from it, its placeholders written into the prompt and the plan
    itself into the image's multimodal kwargs for the model.
    """

    def get_dummy_inputs(self, *args, **kwargs):
        # vLLM's warm-up and memory profiling: mark their items, count nothing.
        inputs = super().get_dummy_inputs(*args, **kwargs)  # type: ignore[misc]
        return dataclasses.replace(
            inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, DUMMY: _DUMMY_MARK}
        )

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        dummy = kwargs.get(DUMMY) is _DUMMY_MARK
        if dummy:
            del kwargs[DUMMY]
        request = self.info.hivtp_request(kwargs)  # type: ignore[attr-defined]
        _, rest = params.split_hivtp_keys(kwargs)
        inputs = dataclasses.replace(
            inputs, hf_processor_mm_kwargs={**rest, RESOLVED: request, DUMMY: dummy}
        )
        result = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        if not dummy:
            plans = self._hivtp_plans(inputs, request)
            self._hivtp_check(result, plans, request)
            self._hivtp_count(plans, request)
        return result

    def _hivtp_check(
        self, result, plans: list[Plan | None], request: params.PruningRequest
    ) -> None:
        """Refuse (raise a client error) what the model could not serve; a
        family's hook, given each image's plan (None where its pixels are
        not at hand). Plans, not the result's items: vLLM's processor cache
        leaves an item it has seen before out of the result."""

    def _hivtp_images(self, mm_items: MultiModalDataItems) -> ImageProcessorItems | None:
        """The request's images as pixels, or None (none, or client embeddings)."""
        if "image" not in mm_items:
            return None
        images = mm_items["image"]
        return images if isinstance(images, ImageProcessorItems) else None

    def _hivtp_plans(self, inputs, request: params.PruningRequest) -> list[Plan | None]:
        """Each image's plan, from its size (None: client embeddings, or an
        image referenced by uuid whose pixels are not at hand)."""
        images = self._hivtp_images(inputs.mm_data_items)
        if images is None:
            return []
        info = self.info  # type: ignore[attr-defined]
        rest = other_kwargs(inputs.hf_processor_mm_kwargs)
        plans: list[Plan | None] = []
        for i in range(images.get_count()):
            if images.get(i) is None:
                plans.append(None)
                continue
            size = images.get_image_size(i)
            plans.append(
                info.hivtp_plan(
                    image_width=size.width,
                    image_height=size.height,
                    request=request,
                    mm_kwargs=rest,
                )
            )
        return plans

    def _hivtp_count(self, plans: list[Plan | None], request: params.PruningRequest) -> None:
        """Images, visual tokens and effective ratio of one request."""
        known = [p for p in plans if p is not None]
        if known:
            metrics.record_images(
                self.info.ctx.model_config.served_model_name,  # type: ignore[attr-defined]
                [p.layout.tokens for p in known],
                [p.tokens for p in known],
                [sum(p.keep) / max(1, sum(p.layout.sizes)) for p in known],
                request.selection,
            )

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
        dummy = bool(hf_processor_mm_kwargs.get(DUMMY, False))
        if "images" in mm_inputs:
            images = ImageProcessorItems(mm_inputs["images"])
            sizes = [images.get_image_size(i) for i in range(images.get_count())]
            dims = [(size.width, size.height) for size in sizes]
        else:
            # OneVision with videos processes images on their own and hands
            # them back without the inputs; their original sizes travel.
            dims = [(int(w), int(h)) for h, w in processed_data["image_sizes"].tolist()]
        plans = []
        rest = other_kwargs(hf_processor_mm_kwargs)
        for width, height in dims:
            found = self.info.hivtp_plan(  # type: ignore[attr-defined]
                image_width=width, image_height=height, request=request, mm_kwargs=rest
            )
            plans.append(dataclasses.replace(found, dummy=dummy))
        processed_data.update(contract.to_fields(plans))
        return processed_data

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),  # type: ignore[misc]
            **{
                name: MultiModalFieldConfig.batched("image", keep_on_cpu=True)
                for name in contract.FIELDS
            },
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        """vLLM's updates, the image one replaced by K placeholders per image
        (the others, such as OneVision's videos, stay as they are)."""
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, hf_processor_mm_kwargs, out_mm_kwargs
        )
        return [
            self._hivtp_image_update(mm_items, hf_processor_mm_kwargs, out_mm_kwargs, update)
            if update.modality == "image"
            else update
            for update in updates
        ]

    def _hivtp_image_update(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
        stock: PromptUpdate,
    ) -> PromptUpdate:
        """vLLM's image update (its target) with each image's plan written
        instead (:meth:`HivtpInfoMixin.hivtp_replacement`)."""
        info = self.info  # type: ignore[attr-defined]
        request = info.hivtp_request(hf_processor_mm_kwargs)
        rest = other_kwargs(hf_processor_mm_kwargs)

        def replacement(item_idx: int) -> list[int] | PromptUpdateDetails:
            # Resolved lazily, per item, as vLLM asks: cached items are not in
            # ``mm_items`` and never get here.
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                # Embeddings given by the client keep their own size.
                return [info.hivtp_image_token_id()] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            plan = info.hivtp_plan(
                image_width=size.width, image_height=size.height, request=request, mm_kwargs=rest
            )
            return info.hivtp_replacement(plan)

        return PromptReplacement(modality="image", target=stock.target, replacement=replacement)


__all__ = [
    "DUMMY",
    "NO_KWARGS",
    "RESOLVED",
    "HivtpInfoMixin",
    "HivtpProcessorMixin",
    "as_client_error",
    "other_kwargs",
]
