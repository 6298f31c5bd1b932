"""The grids HIVTP selects on, per LLaVA family (torch and transformers only).

A *view* is one grid of patch tokens that selection runs on: LLaVA-1.5 has
one per image (the 24 x 24 of CLIP-L at 336 px); LLaVA-NeXT has two, the
base view and the high-resolution grid stitched from its tiles and unpadded
to the image's aspect ratio; LLaVA-OneVision's high-resolution grid is then
shrunk bilinearly when it holds more than about nine views' tokens
(:func:`shrink`). The model (vLLM glue) and ``hivtp-vllm
explain`` (no vLLM) both lay views out with the functions here, so the
picture that explain draws is the grid the server selects on. transformers
is imported where it is used: it takes seconds to import, and the command
line should refuse a bad ratio before paying for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "cls_tokens",
    "supports_pruning",
    "layers_run",
    "highres_layout",
    "stitch",
    "shrink",
    "pool_scores",
    "pooled_side",
]


def cls_tokens(hf_config: object) -> int | None:
    """Leading non-patch positions of the tower's sequence, or None if HIVTP
    cannot prune this model.

    HIVTP needs the features to be exactly the patch grid: CLIP with its CLS
    dropped from the features ("default": 1 leading position, docs/spec.md
    section 1), or SigLIP, which has no CLS, with every position kept ("full": 0,
    docs/spec.md section 5).
    """
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    from hivtp_vllm.families import of_config

    family = of_config(hf_config)
    if family is not None and family.layout == "pooled":
        return 0  # Gemma 3: SigLIP, every patch pooled into the tokens
    vision = getattr(hf_config, "vision_config", None)
    strategy = getattr(hf_config, "vision_feature_select_strategy", None)
    if isinstance(vision, CLIPVisionConfig) and strategy == "default":
        return 1
    if isinstance(vision, SiglipVisionConfig) and strategy == "full":
        return 0
    return None


def supports_pruning(hf_config: object) -> bool:
    """Whether HIVTP can prune this model's images: a family whose tower
    packs merged tokens (layout "merged", docs/algorithm.md "Qwen2.5-VL and
    Qwen3-VL"), or one whose features are exactly the patch grid
    (:func:`cls_tokens`)."""
    from hivtp_vllm.families import of_config

    family = of_config(hf_config)
    if family is not None and family.layout == "merged":
        return True
    return cls_tokens(hf_config) is not None


def layers_run(hf_config: object) -> int:
    """Encoder layers the served tower runs: up to the deepest feature layer.

    vLLM builds LLaVA's CLIP only up to ``vision_feature_layer`` (the
    second-to-last of 24 for LLaVA-1.5, so 23), and the scoring band must lie
    inside those layers; negative indices count from the end, ``-1`` being
    the last layer.
    """
    total = hf_config.vision_config.num_hidden_layers  # type: ignore[attr-defined]
    feature = getattr(hf_config, "vision_feature_layer", -1)  # Gemma 3: none, the last
    layers = [feature] if isinstance(feature, int) else list(feature)
    return max(x + total + 1 if x < 0 else x for x in layers)


def highres_layout(
    image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int, side: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(tile grid (rows, cols), unpadded high-res grid (H', W')) of one image.

    ``image_size`` is the original (height, width), as the image processor
    reports it in ``image_sizes``; ``side`` is the patch grid of one tile.
    The shape comes from transformers' own ``unpad_image`` on an empty grid,
    so it is by construction the shape that :func:`stitch` produces.
    """
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    rows, cols = get_anyres_image_grid_shape(image_size, grid_pinpoints, tile_size)
    grid = unpad_image(torch.empty(1, rows * side, cols * side), image_size)
    return (rows, cols), (grid.shape[1], grid.shape[2])


def stitch(tiles: torch.Tensor, tile_grid: tuple[int, int], image_size: tuple[int, int]):
    """Tiles ``[n, side*side, C]`` -> the unpadded high-res grid ``[H', W', C]``.

    The same view/permute/unpad that vLLM applies to the tiles' features, so
    scores and features land on the same positions. ``C`` may be anything
    per patch: a score, a feature vector, or a patch's pixels.
    """
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rows, cols = tile_grid
    side = int(tiles.shape[1] ** 0.5)
    grid = (
        tiles[: rows * cols]
        .view(rows, cols, side, side, -1)
        .permute(4, 0, 2, 1, 3)
        .reshape(-1, rows * side, cols * side)
    )
    return unpad_image(grid, image_size).permute(1, 2, 0)


def shrink(grid: torch.Tensor, side: int, max_views: int = 9) -> torch.Tensor:
    """LLaVA-OneVision's ``anyres_max_9``: ``[C, H', W']`` -> the grid the LM gets.

    When the unpadded grid holds more than about ``max_views`` views' tokens
    (``ratio = sqrt(H' W' / (max_views side^2)) > 1.1``) it is resized
    bilinearly to ``(floor(H' / ratio), floor(W' / ratio))``: the arithmetic
    and the call vLLM's ``_merge_image_patch_embeddings`` applies to the
    features, so a score map put through it lands where the features do.
    """
    import math

    _, height, width = grid.shape
    ratio = math.sqrt(height * width / (max_views * side**2))
    if ratio <= 1.1:
        return grid
    size = [int(height // ratio), int(width // ratio)]
    return torch.nn.functional.interpolate(grid[None], size, mode="bilinear")[0]


def pooled_side(hf_config: object) -> int:
    """Gemma 3: tokens along a view's pooled grid (16 published, 256 a view)."""
    import math

    return math.isqrt(hf_config.mm_tokens_per_image)  # type: ignore[attr-defined]


def pool_scores(scores: torch.Tensor, tokens_per_side: int) -> torch.Tensor:
    """Patch scores ``[views, P*P]`` (raster) -> token scores ``[views, T, T]``.

    Gemma 3's projector average-pools the tower's ``P x P`` patch grid with a
    ``P/T`` kernel into ``T x T`` tokens (vLLM's ``Gemma3MultiModalProjector``:
    ``[B, P*P, C] -> [B, C, P, P] -> AvgPool2d -> [B, C, T, T]``, rows first):
    a token's score is the mean of its block's patch scores (docs/spec.md
    section 5, "merged or pooled tokens"), on the same grid, in the same
    raster order as the tokens the language model receives.
    """
    views, patches = scores.shape
    side = int(round(patches**0.5))
    kernel = side // tokens_per_side
    grid = scores.reshape(views, 1, side, side)
    return torch.nn.functional.avg_pool2d(grid, kernel, kernel).reshape(
        views, tokens_per_side, tokens_per_side
    )
