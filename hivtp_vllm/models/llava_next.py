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

import time

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from hivtp_vllm.models.common import HivtpModelMixin, select_views
from hivtp_vllm.processor import (
    HivtpLlavaNextMultiModalProcessor,
    HivtpLlavaNextProcessingInfo,
    LlavaDummyInputsBuilder,
)
from hivtp_vllm.views import highres_layout, stitch


def newline_layout(kept: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Positions in vLLM's row-plus-newline layout of the kept high-res tokens.

    The stock layout is ``[H', W' + 1]`` flattened, the last column being the
    newline. Kept tokens keep their raster order and every newline stays.
    """
    mask = torch.zeros(height, width + 1, dtype=torch.bool, device=kept.device)
    mask.view(-1)[kept // width * (width + 1) + kept % width] = True
    mask[:, width] = True
    return mask.view(-1).nonzero().squeeze(1)


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
        image_input, budgets, fractions = self._hivtp_inputs(kwargs)
        if image_input is None:
            return []
        pixel_values = image_input["pixel_values"] if budgets else []
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = list(pixel_values.unbind(0))
        image_sizes = image_input["image_sizes"] if budgets else []
        views = [self._views(image_sizes[i]) for i in range(len(pixel_values))]
        pruned = [i for i, v in enumerate(views) if budgets[i] != v[1]]
        if not pruned:
            return self._process_image_input(image_input)  # the stock path

        tiles_per_image = [p.shape[0] for p in pixel_values]
        starts = torch.tensor([0, *tiles_per_image]).cumsum(0)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in pruned])
        with self.hivtp_recorder.recording(rows):
            features = self._image_pixels_to_features(self.vision_tower, torch.cat(pixel_values))
        embeds = self.multi_modal_projector(features)  # [tiles, side*side, D]
        # Scores come back for the pruned images' tiles only, in order.
        scores = self.hivtp_recorder.patch_scores()
        split = torch.split(scores, [tiles_per_image[i] for i in pruned])
        scores_by_image = dict(zip(pruned, split, strict=True))

        out: list[torch.Tensor] = []
        view_scores, view_keep, view_fraction = [], [], []
        for i, image_embeds in enumerate(torch.split(embeds, tiles_per_image)):
            full = self._merge_image_patch_embeddings(
                image_sizes[i], image_embeds, strategy="spatial_unpad"
            )
            out.append(full)
            if i not in scores_by_image:
                continue
            scores = scores_by_image[i]
            side = self.hivtp_side
            view_scores.append(scores[0].view(side, side))
            view_scores.append(
                stitch(scores[1:, :, None], views[i][0], tuple(image_sizes[i].tolist()))[..., 0]
            )
            view_keep += budgets[i]
            view_fraction += [fractions[i]] * 2
        start = time.perf_counter()
        kept = select_views(view_scores, view_keep, view_fraction, self.hivtp_server.regions)
        self._hivtp_observe(time.perf_counter() - start)
        side_tokens = self.hivtp_side**2
        for n, i in enumerate(pruned):
            base, highres = kept[2 * n], kept[2 * n + 1]
            height, width = view_scores[2 * n + 1].shape
            index = torch.cat([base, side_tokens + newline_layout(highres, height, width)])
            out[i] = out[i][index.to(out[i].device)]
        return out

    def _views(self, image_size: torch.Tensor) -> tuple[tuple[int, int], list[int]]:
        """(tile grid, unpruned size of each view) of one image, as vLLM lays it out."""
        side = self.hivtp_side
        tile_grid, (height, width) = highres_layout(
            tuple(image_size.tolist()),
            self.config.image_grid_pinpoints,
            self.config.vision_config.image_size,
            side,
        )
        return tile_grid, [side * side, height * width]
