"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) with HIVTP pruning.

vLLM packs a LLaVA-NeXT image as the base view's 24 x 24 features, then the
high-resolution features stitched from the tiles into one grid, unpadded to
the image's aspect ratio (H' x W'), with an ``image_newline`` after each row.
Here the base view is pruned on its own grid and the high-resolution grid as
one image (regions and windows span the whole picture, not a tile): each
tile's scores are stitched and unpadded exactly like its features. Every row
keeps its newline, after that row's kept tokens, so the language model still
sees the row structure. Images whose counts are all full take the stock path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.contract import Plan
from hivtp_vllm.models.common import HivtpModelMixin
from hivtp_vllm.processor import (
    HivtpLlavaNextMultiModalProcessor,
    HivtpLlavaNextProcessingInfo,
    LlavaDummyInputsBuilder,
)
from hivtp_vllm.views import stitch


def newline_layout(kept: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Positions in vLLM's row-plus-newline layout of the kept high-res tokens.

    The stock layout is ``[H', W' + 1]`` flattened, the last column being the
    newline. Kept tokens keep their raster order and every newline stays,
    also in a row that keeps no token (and every row of a grid with no
    columns). One sort of known length: nothing waits on the device.
    """
    tokens = kept // max(width, 1) * (width + 1) + kept % max(width, 1)
    newlines = torch.arange(height, device=kept.device) * (width + 1) + width
    return torch.sort(torch.cat([tokens, newlines])).values


@MULTIMODAL_REGISTRY.register_processor(
    HivtpLlavaNextMultiModalProcessor,
    info=HivtpLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class HivtpLlavaNextForConditionalGeneration(HivtpModelMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT whose base view and high-res grid are pruned to the processor's K."""

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

        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = list(pixel_values.unbind(0))
        image_sizes = image_input["image_sizes"]
        tiles_per_image = [p.shape[0] for p in pixel_values]
        starts = torch.tensor([0, *tiles_per_image]).cumsum(0).tolist()
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in pruned])
        with self.hivtp_recorder.recording(rows):
            features = self._image_pixels_to_features(self.vision_tower, torch.cat(pixel_values))
        embeds = self.multi_modal_projector(features)  # [tiles, side*side, D]
        # Scores come back for the pruned images' tiles only, in order.
        scores = torch.split(
            self.hivtp_recorder.patch_scores(), [tiles_per_image[i] for i in pruned]
        )
        return self.hivtp_emit(
            torch.split(embeds, tiles_per_image),
            dict(zip(pruned, scores, strict=True)),
            plans,
            image_sizes,
        )

    def hivtp_emit(
        self,
        tile_embeds: Sequence[torch.Tensor],
        tile_scores: Mapping[int, torch.Tensor],
        plans: Sequence[Plan],
        image_sizes: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The embeddings the language model receives, from the tower's output.

        ``tile_embeds[i]`` are image i's projected tile features
        ``[tiles, side*side, D]``, ``tile_scores[i]`` the patch scores of its
        tiles where it is pruned. Each image is laid out by vLLM's own merge
        (base view, unpadded grid, newlines), then the kept positions are
        gathered; the count property tests run this on random tensors.
        """
        view_scores, view_keep, view_fraction = [], [], []
        for i, scores in tile_scores.items():
            plan = plans[i]
            (base_rows, base_cols), (height, width) = plan.layout.grids
            view_scores.append(scores[0].view(base_rows, base_cols))
            # Stitched and unpadded exactly like the features (views.stitch):
            # the shape the processor computed, as the property tests prove.
            highres = stitch(scores[1:, :, None], plan.layout.tiles, _size(image_sizes[i]))
            view_scores.append(highres[..., 0].reshape(height, width))
            view_keep += plan.keep
            view_fraction += [plan.global_fraction] * 2
        kept = self._hivtp_select(view_scores, view_keep, view_fraction)

        out = [
            self._merge_image_patch_embeddings(image_sizes[i], embeds, strategy="spatial_unpad")
            for i, embeds in enumerate(tile_embeds)
        ]
        for n, i in enumerate(tile_scores):
            (base_rows, base_cols), (height, width) = plans[i].layout.grids
            highres = newline_layout(kept[2 * n + 1], height, width)
            index = torch.cat([kept[2 * n], base_rows * base_cols + highres])
            out[i] = out[i][index.to(out[i].device)]
        return out


def _size(image_size: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the original image, as vLLM passes it (a CPU tensor)."""
    height, width = image_size.tolist()
    return int(height), int(width)
