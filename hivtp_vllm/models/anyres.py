"""Model-side HIVTP for the anyres families (LLaVA-NeXT, LLaVA-OneVision).

vLLM packs an anyres image as the base view's features, then the
high-resolution features stitched from the tiles into one grid, unpadded to
the image's aspect ratio (H' x W'; OneVision then shrinks it past ~9 views),
with an ``image_newline`` after each row. The base view is pruned on its own
grid and the high-resolution grid as one image (regions and windows span the
whole picture, not a tile): each tile's scores go through exactly the
spatial transform its features go through. Every row keeps its newline,
after that row's kept tokens, so the language model still sees the row
structure. Images whose plans keep everything take the stock path.

The processing info counts the views as vLLM lays them out
(:class:`HivtpAnyresInfoMixin`); the model provides two hooks:
:meth:`HivtpAnyresMixin.hivtp_highres_scores` (tile scores to the grid the
language model receives) and :meth:`HivtpAnyresMixin.hivtp_merge` (vLLM's own
merge of one image's tile embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch

from hivtp_vllm.contract import Layout, Plan
from hivtp_vllm.models.common import pruned_images
from hivtp_vllm.processor import NO_KWARGS, HivtpInfoMixin
from hivtp_vllm.views import stitch


class HivtpAnyresInfoMixin(HivtpInfoMixin):
    """The anyres families: the base view, the high-res grid, and its newlines."""

    def hivtp_layout(
        self, *, image_width: int, image_height: int, mm_kwargs: Mapping[str, object] = NO_KWARGS
    ) -> Layout:
        """Views exactly as vLLM counts them (``_get_num_unpadded_features``,
        which for OneVision includes the ``anyres_max_9`` shrink).

        An extreme aspect ratio can leave the unpadded grid with no rows
        (a wide image: no newlines either) or no columns (a tall one: one
        newline per row all the same); that view then has no tokens.
        """
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        encoder = self.get_vision_encoder_info()  # type: ignore[attr-defined]
        side = encoder.get_patch_grid_length()
        tiles = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,  # type: ignore[attr-defined]
            patch_size=encoder.get_image_size(),
        )
        features, rows = self._get_num_unpadded_features(  # type: ignore[attr-defined]
            original_height=image_height,
            original_width=image_width,
            npatches=side,
            num_patch_height=tiles[0],
            num_patch_width=tiles[1],
        )
        # With no rows the crop took the height, so the width is uncropped.
        cols = features // rows if rows else side * tiles[1]
        return Layout(
            grids=((side, side), (rows, cols)),
            newlines=rows,
            tiles=(int(tiles[0]), int(tiles[1])),
        )


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


def image_size(size: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the original image, as vLLM passes it (a CPU tensor)."""
    height, width = size.tolist()
    return int(height), int(width)


class HivtpAnyresMixin:
    """Tower, selection and gather for images with a base view and a high-res grid."""

    def hivtp_highres_scores(self, tile_scores: torch.Tensor, plan: Plan, size) -> torch.Tensor:
        """``[tiles, side*side]`` scores of the high-res tiles -> ``[H', W']``.

        Stitched and unpadded exactly like the features (views.stitch): the
        shape the processor computed, as the count property tests prove.
        """
        return stitch(tile_scores[:, :, None], plan.layout.tiles, size)[..., 0]

    def hivtp_merge(self, size: torch.Tensor, tile_embeds: torch.Tensor) -> torch.Tensor:
        """vLLM's layout of one image: base view, high-res rows, newlines."""
        raise NotImplementedError

    def hivtp_embed_images(self, image_input: dict, plans: Sequence[Plan] | None):
        """The images' embeddings, pruned where their plans say so."""
        pruned, scored = pruned_images(plans)
        if not pruned or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)  # type: ignore[attr-defined]
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = list(pixel_values.unbind(0))
        tiles_per_image = [p.shape[0] for p in pixel_values]
        starts = torch.tensor([0, *tiles_per_image]).cumsum(0).tolist()
        recorder = self.hivtp_recorder  # type: ignore[attr-defined]
        # Scores come back for the scored images' tiles, in order.
        rows = [torch.arange(starts[i], starts[i + 1]) for i in scored]
        with recorder.recording(torch.cat(rows)) if scored else nullcontext():
            features = self._image_pixels_to_features(  # type: ignore[attr-defined]
                self.vision_tower,  # type: ignore[attr-defined]
                torch.cat(pixel_values),
            )
        scores = {}
        if scored:
            split = torch.split(recorder.patch_scores(), [tiles_per_image[i] for i in scored])
            scores = dict(zip(scored, split, strict=True))
        embeds = self.multi_modal_projector(features)  # type: ignore[attr-defined]
        return self.hivtp_emit(
            torch.split(embeds, tiles_per_image),
            {i: scores.get(i) for i in pruned},
            plans,
            image_input["image_sizes"],
        )

    def hivtp_emit(
        self,
        tile_embeds: Sequence[torch.Tensor],
        tile_scores: Mapping[int, torch.Tensor | None],
        plans: Sequence[Plan],
        image_sizes: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The embeddings the language model receives, from the tower's output.

        ``tile_embeds[i]`` are image i's projected tile features
        ``[tiles, side*side, D]``, ``tile_scores[i]`` the patch scores of its
        tiles where it is pruned (None: the uniform baseline, no scores).
        Each image is laid out by vLLM's own merge (base view, high-res grid,
        newlines), then the kept positions are gathered; the count property
        tests run this on random tensors.
        """
        views = {}
        for i, scores in tile_scores.items():
            if scores is not None:
                size = image_size(image_sizes[i])
                scores = [scores[0], self.hivtp_highres_scores(scores[1:], plans[i], size)]
            views[i] = scores
        device = tile_embeds[0].device if tile_embeds else torch.device("cpu")
        kept = self._hivtp_select(plans, views, device)  # type: ignore[attr-defined]

        out = [self.hivtp_merge(image_sizes[i], embeds) for i, embeds in enumerate(tile_embeds)]
        for i, (base, highres) in kept.items():
            (base_rows, base_cols), (height, width) = plans[i].layout.grids
            index = torch.cat(
                [base, base_rows * base_cols + newline_layout(highres, height, width)]
            )
            out[i] = out[i][index.to(out[i].device)]
        return out
