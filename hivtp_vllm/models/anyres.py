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

A family provides two hooks: :meth:`hivtp_highres_scores` (tile scores to
the grid the language model receives) and :meth:`hivtp_merge` (vLLM's own
merge of one image's tile embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hivtp_vllm.contract import Plan
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
        pruned = [i for i, plan in enumerate(plans or []) if plan.prunes]
        if not pruned or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)  # type: ignore[attr-defined]
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = list(pixel_values.unbind(0))
        tiles_per_image = [p.shape[0] for p in pixel_values]
        starts = torch.tensor([0, *tiles_per_image]).cumsum(0).tolist()
        # Scores only for the images HIVTP selects on (the uniform baseline
        # needs none); they come back for those images' tiles, in order.
        scored = [i for i in pruned if not plans[i].uniform]
        tiles = torch.cat(pixel_values)
        if scored:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in scored])
            with self.hivtp_recorder.recording(rows):  # type: ignore[attr-defined]
                features = self._image_pixels_to_features(  # type: ignore[attr-defined]
                    self.vision_tower,  # type: ignore[attr-defined]
                    tiles,
                )
            split = torch.split(
                self.hivtp_recorder.patch_scores(),  # type: ignore[attr-defined]
                [tiles_per_image[i] for i in scored],
            )
            scores = dict(zip(scored, split, strict=True))
        else:
            features = self._image_pixels_to_features(  # type: ignore[attr-defined]
                self.vision_tower,  # type: ignore[attr-defined]
                tiles,
            )
            scores = {}
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
        grids, view_scores, view_keep, view_fraction = [], [], [], []
        for i, scores in tile_scores.items():
            plan = plans[i]
            base, highres = plan.layout.grids
            grids += [base, highres]
            if scores is None:  # the uniform baseline: no scores
                view_scores += [None, None]
            else:
                view_scores.append(scores[0].view(base))
                grid = self.hivtp_highres_scores(scores[1:], plan, image_size(image_sizes[i]))
                view_scores.append(grid.reshape(highres))
            view_keep += plan.keep
            view_fraction += [plan.global_fraction] * 2
        device = tile_embeds[0].device if tile_embeds else torch.device("cpu")
        kept = self._hivtp_select(  # type: ignore[attr-defined]
            grids, view_scores, view_keep, view_fraction, device
        )

        out = [self.hivtp_merge(image_sizes[i], embeds) for i, embeds in enumerate(tile_embeds)]
        for n, i in enumerate(tile_scores):
            (base_rows, base_cols), (height, width) = plans[i].layout.grids
            highres = newline_layout(kept[2 * n + 1], height, width)
            index = torch.cat([kept[2 * n], base_rows * base_cols + highres])
            out[i] = out[i][index.to(out[i].device)]
        return out
