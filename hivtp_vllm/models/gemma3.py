"""Gemma 3 (``Gemma3ForConditionalGeneration``) with HIVTP pruning.

A SigLIP tower (no CLS: every position is a patch, docs/spec.md section 5)
encodes each view at a fixed size (896 px published: 64 x 64 patches); the
projector average-pools the patch grid into ``sqrt(mm_tokens_per_image)``
tokens a side (16 x 16 published). An image is one view, or with
pan-and-scan the original then its crops, each a view of its own. Scores
follow the pooling (a token's score is the mean of its block's patch
scores, :func:`hivtp_vllm.views.pool_scores`) and selection runs per view on
the pooled grid the language model receives (docs/algorithm.md "Gemma 3").

In the prompt each view is ``\\n\\n<start_of_image>`` + its soft tokens +
``<end_of_image>\\n\\n`` (with crops inside vLLM's "Here is the original
image ..." text); a pruned view keeps the wrapper and K of its soft tokens,
and only those are embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails
from vllm.multimodal.processing.processor import cached_encode

from hivtp_vllm import contract, vllm_compat
from hivtp_vllm.contract import Layout, Plan
from hivtp_vllm.models.common import HivtpModelMixin, pruned_images
from hivtp_vllm.processor import NO_KWARGS, HivtpInfoMixin, HivtpProcessorMixin
from hivtp_vllm.views import pool_scores, pooled_side


class HivtpGemma3ProcessingInfo(HivtpInfoMixin, Gemma3ProcessingInfo):
    """Gemma 3: one pooled grid a view, the original then its crops."""

    def hivtp_supported(self) -> bool:
        return True  # SigLIP: every position a patch, every patch pooled

    def hivtp_layout(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object] = NO_KWARGS
    ) -> Layout:
        crops = self.get_num_crops(
            image_width=image_width,
            image_height=image_height,
            processor=self.get_hf_processor(),
            mm_kwargs=mm_kwargs,
        )
        side = pooled_side(self.get_hf_config())
        return Layout(grids=((side, side),) * (crops + 1))

    def hivtp_replacement(self, plan: Plan) -> PromptUpdateDetails:
        """vLLM's text for the image (``get_image_repl``) with each view's
        kept soft tokens in its wrapper; only the soft tokens are embeddings."""
        tokenizer = self.get_hf_processor().tokenizer
        boi, soft, eoi = tokenizer.boi_token, tokenizer.image_token, tokenizer.eoi_token
        if len(plan.keep) == 1:
            text = boi
        else:
            crops = " ".join(boi for _ in plan.keep[1:])
            text = (
                f"Here is the original image {boi} and here are some "
                f"crops to help you see better {crops}"
            )
        parts = text.split(boi)
        views = [f"\n\n{boi}{soft * k}{eoi}\n\n" for k in plan.keep]
        full = parts[0] + "".join(v + rest for v, rest in zip(views, parts[1:], strict=True))
        ids = cached_encode(tokenizer, full, add_special_tokens=False)
        # The config's soft-token id, not a lookup in get_vocab(), which builds
        # the whole 262k-entry vocabulary (0.2 s) on every image of every request.
        return PromptUpdateDetails.select_token_id(ids, self.hivtp_image_token_id())


class HivtpGemma3MultiModalProcessor(HivtpProcessorMixin, Gemma3MultiModalProcessor):
    """Gemma 3 processor: K_v soft tokens in each view's wrapper."""


@MULTIMODAL_REGISTRY.register_processor(
    HivtpGemma3MultiModalProcessor,
    info=HivtpGemma3ProcessingInfo,
    dummy_inputs=Gemma3DummyInputsBuilder,
)
class HivtpGemma3ForConditionalGeneration(HivtpModelMixin, Gemma3ForConditionalGeneration):
    """Gemma 3 whose image embeddings are pruned to the processor's K per view.

    The set-up is the LLaVA families' (:class:`HivtpModelMixin`): vLLM's
    SigLIP tower (``vision_tower.vision_model``, no CLS) listened to in its
    band, and ``--mm-encoder-tp-mode data`` splitting the views over the
    workers, which stock vLLM's Gemma 3 does not offer.
    """

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        plans = contract.pop_plans(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        pruned, scored = pruned_images(plans)
        if not pruned:
            return self._process_image_input(image_input)  # the stock path
        views = [int(n) for n in image_input["num_patches"].tolist()]
        starts = [sum(views[:i]) for i in range(len(views))]
        rows = [starts[i] + v for i in scored for v in range(views[i])]
        recording = self.hivtp_recorder.recording(torch.tensor(rows)) if rows else nullcontext()
        with recording:
            features = self._image_pixels_to_features(
                self.vision_tower, image_input["pixel_values"]
            )
        embeds = self.multi_modal_projector(features)  # [views, T * T, D], pooled
        scores: dict[int, torch.Tensor | None] = dict.fromkeys(pruned)
        if rows:
            side = pooled_side(self.config)
            pooled = pool_scores(self.hivtp_recorder.patch_scores(), side).split(
                [views[i] for i in scored]
            )
            scores.update(zip(scored, pooled, strict=True))
        return self.hivtp_emit(embeds, views, scores, plans)  # type: ignore[arg-type]

    def hivtp_emit(
        self,
        embeds: torch.Tensor,
        views: list[int],
        scores: Mapping[int, torch.Tensor | None],
        plans: list[Plan],
    ) -> list[torch.Tensor]:
        """Each image's kept embeddings, view by view in raster order.

        ``embeds`` is ``[all views, T * T, D]`` (each image's ``views[i]``
        in turn); ``scores[i]`` image ``i``'s pooled score maps
        ``[views, T, T]`` where it is pruned, None for the uniform baseline.
        """
        kept = self._hivtp_select(
            plans, {i: None if s is None else list(s) for i, s in scores.items()}, embeds.device
        )
        out = list(embeds.split(views))
        for i, image in enumerate(out):
            if i in kept:
                picked = zip(image, kept[i], strict=True)
                out[i] = torch.cat([view[k.to(view.device)] for view, k in picked])
            else:
                out[i] = image.flatten(0, 1)
        return out

    def get_encoder_cudagraph_config(self):
        # A graph replays the tower and projector for every view and skips
        # embed_multimodal, so it could not prune: no modality is captured.
        return vllm_compat.capture_no_encoder_graphs(super().get_encoder_cudagraph_config())
