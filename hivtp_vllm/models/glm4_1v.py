"""GLM-4.1V (``Glm4vForConditionalGeneration``) and GLM-4.5V
(``Glm4vMoeForConditionalGeneration``) with HIVTP pruning.

vLLM serves both from one file (vllm/model_executor/models/glm4_1v.py): the
same tower, processor and positions, a dense (``Glm4ForCausalLM``) or MoE
(``Glm4MoeForCausalLM``) language model. The Qwen-VL code
(:mod:`hivtp_vllm.models.qwen`) applies; what only GLM needs
(docs/glm4v-notes.md has the findings this rests on):

- The grid: GLM resizes an image as a two-frame clip
  (``smart_resize(num_frames=temporal_patch_size)``), so its pixel bounds
  hold ``2 * h * w``. vLLM's info counts with ``shortest_edge`` fixed at
  smart_resize's default and without the request's ``size``, while the
  placeholders follow the HF processor (which uses both): the layout here is
  computed as the HF processor computes it, from the checkpoint's ``size``
  with the server's and the request's ``size`` over it.
- The processor: vLLM's GLM processor calls the HF processor itself (not
  through ``_call_hf_processor``), so this plugin's keys are taken out
  around that call and handed back for the post-processing that reads them.
- The tower: full attention in every block, one sequence per image; the
  output is one row per merged token in raster order (no windows, no
  DeepStack), as Qwen3-VL's.
- The interface: vLLM's GLM class lacks ``SupportsMultiModalPruning``
  (the flag the runners check before calling ``recompute_mrope_positions``);
  the served class declares it, with no video pruning method: vLLM has no
  video pruning (EVS) for GLM, so ``--video-pruning-rate`` is refused at
  start rather than accepted and ignored, as stock vLLM does.
- Videos: frames carry the image token id inside a
  ``<|begin_of_video|>`` ... ``<|end_of_video|>`` block; they are served
  unpruned, and the position code goes by modality, not by id.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import ClassVar

import torch
from transformers.models.glm4v.image_processing_glm4v import smart_resize
from vllm.model_executor.models.glm4_1v import (
    Glm4vDummyInputsBuilder,
    Glm4vForConditionalGeneration,
    Glm4vMoeForConditionalGeneration,
    Glm4vMultiModalProcessor,
    Glm4vProcessingInfo,
)
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm import params, vllm_compat
from hivtp_vllm.contract import Layout
from hivtp_vllm.models.qwen import HivtpQwenInfoMixin, HivtpQwenModelMixin, HivtpQwenProcessorMixin
from hivtp_vllm.processor import NO_KWARGS

# The hivtp keys of the request being processed, while vLLM's GLM processor
# runs the HF processor without them (a ContextVar: each request's own, also
# under concurrent processing).
_HIVTP_KWARGS: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "hivtp_glm_kwargs", default=NO_KWARGS
)


class HivtpGlm4vProcessingInfo(HivtpQwenInfoMixin, Glm4vProcessingInfo):
    """GLM's merged grid, computed as the HF image processor resizes."""

    def hivtp_pixel_bounds(self, mm_kwargs: Mapping[str, object] = NO_KWARGS) -> tuple[int, int]:
        """(min_pixels, max_pixels) as the HF processor takes them for this
        request: the checkpoint's ``size`` with the server's and the
        request's ``size`` over it (vLLM routes a flat ``size`` into
        ``images_kwargs``). GLM's processor takes no ``min_pixels`` /
        ``max_pixels`` keys (a TypeError in transformers), so none are read."""
        size = dict(self.get_image_processor().size)  # type: ignore[attr-defined]
        merged = self._merge_and_resolve_mm_processor_kwargs(mm_kwargs)  # type: ignore[attr-defined]
        for scope in (merged, merged.get("images_kwargs") or {}):
            override = scope.get("size")
            if isinstance(override, Mapping):
                size.update(override)
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def hivtp_layout(self, *, image_width: int, image_height: int, mm_kwargs=NO_KWARGS) -> Layout:
        """The merged grid (rows, cols) of GLM's ``smart_resize``: the image as
        ``temporal_patch_size`` (2) frames, so the bounds apply to ``2*h*w``."""
        vision = self.get_hf_config().vision_config  # type: ignore[attr-defined]
        unit = vision.patch_size * vision.spatial_merge_size
        low, high = self.hivtp_pixel_bounds(mm_kwargs)
        height, width = smart_resize(
            num_frames=vision.temporal_patch_size,
            height=image_height,
            width=image_width,
            temporal_factor=vision.temporal_patch_size,
            factor=unit,
            min_pixels=low,
            max_pixels=high,
        )
        return Layout(grids=((height // unit, width // unit),))


class HivtpGlm4vMultiModalProcessor(HivtpQwenProcessorMixin, Glm4vMultiModalProcessor):
    """GLM's processor with K ``<|image|>`` tokens per image; videos as in vLLM."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # vLLM's GLM processor hands its kwargs to get_hf_processor and the
        # HF processor directly (ctx.call_hf_processor, which passes unknown
        # keys on: transformers then warns "Keyword argument `hivtp_resolved`
        # is not a valid argument for this processor and will be ignored" on
        # every request). Keep ours out of both, as _call_hf_processor does
        # for the other families, and hand them back to _finalize_hf_mm_data,
        # whose post-processing reads the request and the warm-up marker.
        ours, rest = params.split_hivtp_keys(hf_kwargs)
        token = _HIVTP_KWARGS.set(ours)
        try:
            return super()._apply_hf_processor_main(mm_items, rest)
        finally:
            _HIVTP_KWARGS.reset(token)

    def _finalize_hf_mm_data(self, hf_data, hf_kwargs, passthrough_data, processed_data=None):
        kwargs = {**hf_kwargs, **_HIVTP_KWARGS.get()}
        return super()._finalize_hf_mm_data(hf_data, kwargs, passthrough_data, processed_data)


class HivtpGlm4vModelMixin(HivtpQwenModelMixin):
    """GLM's tower, the pruning interface vLLM's GLM class lacks, and the
    refusal of vLLM's video pruning, for both GLM architectures."""

    # vLLM's runners call recompute_mrope_positions only for a model with
    # this flag (interfaces.supports_multimodal_pruning). No video pruning
    # method: vLLM has none for GLM, and ModelConfig reads this tuple.
    supports_multimodal_pruning: ClassVar[bool] = True
    supported_video_pruning_methods: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if vllm_compat.video_pruning_on(vllm_config):
            # Stock vLLM accepts the flag for GLM and ignores it; with the
            # plugin the model would take it for on and have nothing to run.
            raise ValueError(
                "hivtp: --video-pruning-rate (vLLM's video pruning, EVS) is not implemented "
                "for GLM-4.1V / GLM-4.5V in vLLM; serve without it (videos are served "
                "unpruned; images are pruned per request with hivtp_retain_ratio / "
                "hivtp_num_tokens)."
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def hivtp_run_tower(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
        # One row per merged token, in raster order of each image's grid:
        # the downsample conv merges each 4 consecutive patches (a 2 x 2 block).
        merged = self.visual(pixel_values, grid_thw=grid_thw)  # type: ignore[attr-defined]
        return merged, lambda scores: scores


@MULTIMODAL_REGISTRY.register_processor(
    HivtpGlm4vMultiModalProcessor,
    info=HivtpGlm4vProcessingInfo,
    dummy_inputs=Glm4vDummyInputsBuilder,
)
class HivtpGlm4vForConditionalGeneration(
    HivtpGlm4vModelMixin, Glm4vForConditionalGeneration, SupportsMultiModalPruning
):
    """GLM-4.1V whose image embeddings are pruned to K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data


@MULTIMODAL_REGISTRY.register_processor(
    HivtpGlm4vMultiModalProcessor,
    info=HivtpGlm4vProcessingInfo,
    dummy_inputs=Glm4vDummyInputsBuilder,
)
class HivtpGlm4vMoeForConditionalGeneration(
    HivtpGlm4vModelMixin, Glm4vMoeForConditionalGeneration, SupportsMultiModalPruning
):
    """GLM-4.5V whose image embeddings are pruned to K."""

    supports_encoder_tp_data = True  # docs/vllm-internals.md: supports_encoder_tp_data
