"""The count contract, for every family the plugin serves.

vLLM writes an image's placeholder tokens into the prompt before the image is
encoded, and fails the whole engine if the model then emits another number
of embeddings. So for every image size and every option a request can carry,
either the API server refuses the request (a 400 naming the key) or the
processor's placeholder count equals what the model emits; and with no
pruning it equals stock vLLM's own count.

The families are the rows of :data:`hivtp_vllm.families.FAMILIES`; the tests
see each through a :class:`Family` derived from its row: the layout picks how
the model emits one image's embeddings from random tower outputs (the model's
own ``hivtp_emit``, which holds everything after the tower: vLLM's merge, the
selection, the gather), the checkpoint recipe gives the view and token sizes
and the test checkpoint's ``image_grid_pinpoints``. Tower outputs are random,
so thousands of cases run in seconds; the tower itself is covered by the
score tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from hivtp_vllm import contract
from hivtp_vllm import families as table

# vLLM's VLLM_MAX_IMAGE_PIXELS default: larger images are refused before any
# processor runs.
MAX_PIXELS = 178_956_970
MAX_ASPECT = 2000

# Shapes that broke or nearly broke the plugin (issue 10), always tried.
EXTREME_SIZES = [
    (1, 1),
    (2, 900),
    (900, 2),
    (13, 7),
    (50, 3000),
    (3000, 50),
    (4000, 3000),
    (1, 2000),
    (2000, 1),
    (336, 1),
    (1, 336),
    (13376, 13378),  # just under the pixel limit
]


@st.composite
def image_sizes(draw: st.DrawFn) -> tuple[int, int]:
    """(width, height): 1 px to vLLM's pixel limit, aspect ratios up to 1:2000 both ways."""
    short = draw(st.integers(1, 13_376))
    ratio = draw(st.one_of(st.just(1.0), st.floats(1.0, MAX_ASPECT)))
    long = max(short, min(int(short * ratio), MAX_PIXELS // short))
    return (long, short) if draw(st.booleans()) else (short, long)


@st.composite
def request_options(draw: st.DrawFn) -> dict[str, object] | None:
    """What a client may send: nothing, a ratio or a budget, and a global fraction."""
    kind = draw(st.sampled_from(["none", "ratio", "ratio", "budget", "budget"]))
    if kind == "none":
        return None
    options: dict[str, object]
    if kind == "ratio":
        ratio = draw(
            st.one_of(
                st.sampled_from([1.0, 0.5, 0.25, 0.1, 1e-9]),
                st.floats(0.0, 1.0, exclude_min=True),
            )
        )
        options = {"hivtp_retain_ratio": ratio}
    else:
        budget = draw(st.one_of(st.integers(1, 8), st.integers(1, 4000), st.integers(1, 10**6)))
        options = {"hivtp_num_tokens": budget}
    if draw(st.booleans()):
        options["hivtp_global_fraction"] = draw(st.floats(0.0, 1.0))
    if draw(st.integers(0, 3)) == 0:
        options["hivtp_selection"] = "uniform"
    return options


def _scores(plan: contract.Plan, *shape: int) -> torch.Tensor | None:
    """Random tower scores, or None where the plan takes the uniform baseline."""
    return None if plan.uniform else torch.rand(*shape)


def emit_single(
    family: Family, model, plan, width: int, height: int, mm_kwargs=None
) -> torch.Tensor:
    """LLaVA-1.5: one grid whatever the image size."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    embeds = torch.randn(1, side * side, model.config.text_config.hidden_size)
    scores = {0: _scores(plan, side * side)} if plan is not None and plan.prunes else {}
    plans = [plan] if plan is not None else []
    return model.hivtp_emit(embeds, scores, plans)[0]


def emit_anyres(
    family: Family, model, plan, width: int, height: int, mm_kwargs=None
) -> torch.Tensor:
    """LLaVA-NeXT, OneVision: the base tile plus the tiles of the best pinpoint,
    as the HF image processor cuts them (tile count from transformers, not
    from the plan)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = get_anyres_image_grid_shape(
        (height, width), model.config.image_grid_pinpoints, vision.image_size
    )
    tiles = rows * cols + 1
    embeds = torch.randn(tiles, side * side, model.config.text_config.hidden_size)
    scores = {0: _scores(plan, tiles, side * side)} if plan is not None and plan.prunes else {}
    plans = [plan] if plan is not None else []
    sizes = torch.tensor([[height, width]])
    return model.hivtp_emit([embeds], scores, plans, sizes)[0]


def emit_merged(
    family: Family, model, plan, width: int, height: int, mm_kwargs=None
) -> torch.Tensor:
    """Qwen-VL: the merged grid of the resized image (transformers' smart_resize)."""
    (sizes, _) = reference_views(family, width, height, None)
    embeds = [torch.randn(sizes[0], 8)]
    scores = {0: _scores(plan, sizes[0])} if plan is not None and plan.prunes else {}
    plans = [plan] if plan is not None else []
    return model.hivtp_emit(embeds, scores, plans)[0]


def emit_pooled(
    family: Family, model, plan, width: int, height: int, mm_kwargs=None
) -> torch.Tensor:
    """Gemma 3: each view's pooled grid (views from transformers' pan-and-scan
    rule where ``mm_kwargs`` turn it on), random scores on each view's grid."""
    pan_and_scan = bool((mm_kwargs or {}).get("do_pan_and_scan"))
    sizes, _ = reference_views(family, width, height, None, pan_and_scan=pan_and_scan)
    side = family.pooled_side
    embeds = torch.randn(len(sizes), side * side, model.config.text_config.hidden_size)
    scores = {0: _scores(plan, len(sizes), side, side)} if plan is not None and plan.prunes else {}
    plans = [plan] if plan is not None else []
    return model.hivtp_emit(embeds, [len(sizes)], scores, plans)[0]


EMIT = {"single": emit_single, "anyres": emit_anyres, "merged": emit_merged, "pooled": emit_pooled}

# Grids the published checkpoints lack, to stress the anyres layout: a family
# whose grid shrinks past ``max_views`` also serves grids of at most 2 x 2
# tiles (they never shrink), one that never shrinks grids of up to 4 x 4.
STRESS_GRIDS = {True: ("narrow-2x2", 2), False: ("wide-4x4", 4)}

MERGE = 2  # the "merged" layout: one token per 2 x 2 patches (hivtp_vllm/families.py)


@dataclass(frozen=True)
class Family:
    """One row of the family table, as the count-contract and server tests see it."""

    row: table.Family

    @property
    def name(self) -> str:  # make-model --arch, test ids
        return self.row.name

    @property
    def title(self) -> str:
        return self.row.title

    @property
    def layout(self) -> str:
        return self.row.layout

    @property
    def max_views(self) -> int | None:  # anyres_max_N: the high-res grid shrinks past N views
        return self.row.max_views

    @property
    def videos(self) -> bool:  # the family takes videos too
        return self.row.videos

    @property
    def max_model_len(self) -> int:  # room for the largest image's tokens
        return self.row.max_model_len

    @property
    def dtype(self) -> str:  # the test servers' (bfloat16 where vLLM's CPU kernels need it)
        return self.row.dtype

    @property
    def tile(self) -> int:
        """px of one view (LLaVA layouts)."""
        return self.row.checkpoint.image_size

    @property
    def side(self) -> int:
        """Patches along a view's side (LLaVA layouts)."""
        return self.tile // self.row.checkpoint.patch_size

    @property
    def pooled_side(self) -> int:
        """Gemma 3: tokens along a view's pooled grid."""
        import math

        return math.isqrt(self.row.checkpoint.pooled_tokens)

    @property
    def unit(self) -> int:
        """Qwen-VL: px along one merged token's side; images are resized to multiples of it."""
        return self.row.checkpoint.patch_size * MERGE

    @property
    def pixel_bounds(self) -> tuple[int, int] | None:
        """Qwen-VL: the test checkpoint's (min, max) pixels an image is resized
        within (make-model --size tiny: the published minimum, the maximum
        lowered to the recipe's tiny one)."""
        if self.layout != "merged":
            return None
        low, high = self.row.checkpoint.image_pixels
        return low, min(high, self.row.checkpoint.tiny_max_pixels[0])

    @property
    def empty_views(self) -> bool:
        """Whether an image can have a view with no tokens. LLaVA-NeXT's even
        24-patch tiles can be unpadded to no rows or columns; OneVision's odd
        27 always leaves one (padding (27 - 0) // 2 = 13 from each side)."""
        return self.layout == "anyres" and self.side % 2 == 0

    @property
    def pinpoints(self) -> dict[str, list[list[int]]]:
        """Anyres: "own" (the test checkpoint's pinpoints, as the published
        configs' ``image_grid_pinpoints``), then a grid set that stresses the layout."""
        if self.layout != "anyres":
            return {}
        t = self.tile
        own = [[t * r, t * c] for r, c in self.row.checkpoint.grid_tiles]
        name, n = STRESS_GRIDS[self.max_views is not None]
        stress = [[t * r, t * c] for r in range(1, n + 1) for c in range(1, n + 1)]
        return {"own": own, name: stress}

    @property
    def own_pinpoints(self) -> list[list[int]] | None:
        """The pinpoints of the family's test checkpoint (None: not anyres)."""
        return self.pinpoints.get("own")

    @property
    def served_kwargs(self) -> dict[str, object]:
        """Processor options the family's test servers run with (tests/conftest.py):
        Gemma 3's with pan-and-scan on (off as published: the harder case
        served, the published one proven in-process by the count contract)."""
        return {"do_pan_and_scan": True} if self.layout == "pooled" else {}

    @property
    def processor_variants(self) -> dict[str, dict[str, object]]:
        """The count contract's processor options per config: Gemma 3's as
        published and with pan-and-scan; none for the other layouts."""
        if self.layout != "pooled":
            return {}
        return {"own": {}, "pan-and-scan": {"do_pan_and_scan": True}}

    def emit(
        self, model, plan: contract.Plan | None, width: int, height: int, mm_kwargs=None
    ) -> torch.Tensor:
        """One image's embeddings, as the loaded model emits them for ``plan``: [T, D]."""
        return EMIT[self.layout](self, model, plan, width, height, mm_kwargs)


FAMILIES: dict[str, Family] = {name: Family(row) for name, row in table.FAMILIES.items()}


# -- an independent reference for the expected counts ------------------------


def reference_views(
    family: Family,
    width: int,
    height: int,
    pinpoints: list[list[int]] | None,
    *,
    pan_and_scan: bool | None = None,
) -> tuple[list[int], int]:
    """(tokens of each view, always-kept newlines) from transformers' helpers
    and the spec, independent of the plugin's processor. ``pan_and_scan``
    (Gemma 3): None, as the family's test servers run (``served_kwargs``)."""
    import math

    side = family.side
    if family.layout == "merged":
        low, high = family.pixel_bounds
        if family.row.checkpoint.image_processor == "Glm4vImageProcessor":
            # GLM resizes an image as a clip of two frames (temporal patch
            # 2): its bounds hold 2 * h * w (docs/glm4v-notes.md, "(a)").
            from transformers.models.glm4v.image_processing_glm4v import smart_resize as glm

            h, w = glm(2, height, width, factor=family.unit, min_pixels=low, max_pixels=high)
        else:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

            h, w = smart_resize(height, width, factor=family.unit, min_pixels=low, max_pixels=high)
        return [(h // family.unit) * (w // family.unit)], 0
    if family.layout == "single":
        return [side * side], 0
    if family.layout == "pooled":  # Gemma 3: the image, then transformers' crops
        if pan_and_scan is None:
            pan_and_scan = bool(family.served_kwargs.get("do_pan_and_scan"))
        crops = []
        if pan_and_scan:
            from transformers import Gemma3ImageProcessor
            from transformers.models.gemma3.processing_gemma3 import Gemma3ProcessorKwargs

            given = Gemma3ProcessorKwargs._defaults["images_kwargs"]  # Gemma3Processor's
            crops = Gemma3ImageProcessor().pan_and_scan_batched(  # an empty [0, h, w] image
                torch.empty(0, height, width),
                given["pan_and_scan_min_crop_size"],
                given["pan_and_scan_max_num_crops"],
                given["pan_and_scan_min_ratio_to_activate"],
            )
        return [family.pooled_side**2] * (1 + len(crops)), 0
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    rows, cols = get_anyres_image_grid_shape((height, width), pinpoints, family.tile)
    grid = unpad_image(torch.empty(1, rows * side, cols * side), (height, width))
    h, w = grid.shape[1], grid.shape[2]
    if family.max_views is not None:  # OneVision's anyres_max_N shrink
        ratio = math.sqrt(h * w / (family.max_views * side**2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return [side * side, h * w], h


def reference_tokens(sizes: list[int], newlines: int, options: dict | None) -> int | None:
    """Visual tokens a request gets by the spec (docs/spec.md sections 2 and 3),
    or None for a 400."""
    from hivtp_vllm.pruning import num_retained

    options = options or {}
    if "hivtp_num_tokens" in options:
        budget = options["hivtp_num_tokens"]
        low = sum(1 for n in sizes if n > 0)
        return budget + newlines if low <= budget <= sum(sizes) else None
    ratio = options.get("hivtp_retain_ratio", 1.0)
    return sum(num_retained(n, ratio) for n in sizes) + newlines
