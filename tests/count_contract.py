"""The count contract, for every family the plugin serves.

vLLM writes an image's placeholder tokens into the prompt before the image is
encoded, and fails the whole engine if the model then emits another number
of embeddings. So for every image size and every option a request can carry,
either the API server refuses the request (a 400 naming the key) or the
processor's placeholder count equals what the model emits; and with no
pruning it equals stock vLLM's own count.

A family plugs in with a :class:`Family`: how to build its checkpoint, which
``image_grid_pinpoints`` its published configs use (if any), and how to make
its model emit embeddings for one image from random tower outputs (the
model's own ``hivtp_emit``, which holds everything after the tower: vLLM's
merge, the selection, the gather). Tower outputs are random, so thousands of
cases run in seconds; the tower itself is covered by the score tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from hivtp_vllm import contract

# llava-hf/llava-v1.6-{vicuna-7b,vicuna-13b,mistral-7b,34b}-hf config.json all
# carry the same pinpoints; our random checkpoints use them too. The wide
# grid is not published: it stresses grids of up to 4 x 4 tiles.
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
WIDE_PINPOINTS = [[336 * r, 336 * c] for r in range(1, 5) for c in range(1, 5)]
# llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf: every grid of 1..6 x 1..6
# tiles of 384 px. The narrow set (at most 2 x 2 tiles) never shrinks.
ONEVISION_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
NARROW_384_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 3) for c in range(1, 3)]

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


@dataclass
class Family:
    """One served architecture, as the count-contract tests see it."""

    name: str
    arch: str  # make-model --arch
    # Emits one image's embeddings: (model, plan or None, width, height) -> [T, D].
    emit: Callable[[object, contract.Plan | None, int, int], torch.Tensor]
    pinpoints: dict[str, list[list[int]]] = field(default_factory=dict)
    tile: int = 336  # px of one view
    side: int = 24  # patches along a view's side
    max_views: int | None = None  # anyres_max_N: the high-res grid shrinks past N views
    max_model_len: int = 4096  # room for the largest image's tokens
    # Whether an image can have a view with no tokens. LLaVA-NeXT's even
    # 24-patch tiles can be unpadded to no rows or columns; OneVision's odd
    # 27 always leaves one (padding (27 - 0) // 2 = 13 from each side).
    empty_views: bool = False
    # Qwen-VL: images are resized to multiples of ``unit`` px within these
    # pixel bounds (the test checkpoint's), one token per unit x unit block.
    pixel_bounds: tuple[int, int] | None = None
    videos: bool = False  # the family takes videos too
    unit: int = 28

    @property
    def own_pinpoints(self) -> list[list[int]] | None:
        """The pinpoints of the family's test checkpoint (the first set listed)."""
        return next(iter(self.pinpoints.values()), None)


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


def emit_llava(model, plan: contract.Plan | None, width: int, height: int) -> torch.Tensor:
    """LLaVA-1.5: one 24 x 24 view whatever the image size."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    embeds = torch.randn(1, side * side, model.config.text_config.hidden_size)
    scores = {0: _scores(plan, side * side)} if plan is not None and plan.prunes else {}
    plans = [plan] if plan is not None else []
    return model.hivtp_emit(embeds, scores, plans)[0]


def emit_anyres(model, plan: contract.Plan | None, width: int, height: int) -> torch.Tensor:
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


def emit_qwen(
    name: str, model, plan: contract.Plan | None, width: int, height: int
) -> torch.Tensor:
    """Qwen-VL: the merged grid of the resized image (transformers' smart_resize)."""
    (sizes, _) = reference_views(FAMILIES[name], width, height, None)
    embeds = [torch.randn(sizes[0], 8)]
    scores = {0: _scores(plan, sizes[0])} if plan is not None and plan.prunes else {}
    plans = [plan] if plan is not None else []
    return model.hivtp_emit(embeds, scores, plans)[0]


FAMILIES = {
    "llava": Family("LLaVA-1.5", "llava", emit_llava),
    "llava-next": Family(
        "LLaVA-NeXT",
        "llava-next",
        emit_anyres,
        pinpoints={"llava-v1.6": LLAVA_V16_PINPOINTS, "wide-4x4": WIDE_PINPOINTS},
        empty_views=True,
    ),
    "llava-onevision": Family(
        "LLaVA-OneVision",
        "llava-onevision",
        emit_anyres,
        pinpoints={"onevision-ov": ONEVISION_PINPOINTS, "narrow-2x2": NARROW_384_PINPOINTS},
        tile=384,
        side=27,
        max_views=9,
        max_model_len=16384,
        videos=True,
    ),
    # Pixel bounds: the tiny checkpoints' preprocessor_config.json.
    "qwen2.5-vl": Family(
        "Qwen2.5-VL",
        "qwen2.5-vl",
        functools.partial(emit_qwen, "qwen2.5-vl"),
        pixel_bounds=(3136, 1_003_520),
        videos=True,
    ),
    "qwen3-vl": Family(
        "Qwen3-VL",
        "qwen3-vl",
        functools.partial(emit_qwen, "qwen3-vl"),
        pixel_bounds=(65536, 1_310_720),
        unit=32,
        videos=True,
    ),
}


# -- an independent reference for the expected counts ------------------------


def reference_views(
    family: Family, width: int, height: int, pinpoints: list[list[int]] | None
) -> tuple[list[int], int]:
    """(tokens of each view, always-kept newlines) from transformers' helpers
    and the spec, independent of the plugin's processor."""
    import math

    side = family.side
    if family.pixel_bounds is not None:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        low, high = family.pixel_bounds
        h, w = smart_resize(height, width, factor=family.unit, min_pixels=low, max_pixels=high)
        return [(h // family.unit) * (w // family.unit)], 0
    if family.arch == "llava":
        return [side * side], 0
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
    """Visual tokens a request gets by the spec (sections 2 and 3), or None for a 400."""
    from hivtp_vllm.pruning import num_retained

    options = options or {}
    if "hivtp_num_tokens" in options:
        budget = options["hivtp_num_tokens"]
        low = sum(1 for n in sizes if n > 0)
        return budget + newlines if low <= budget <= sum(sizes) else None
    ratio = options.get("hivtp_retain_ratio", 1.0)
    return sum(num_retained(n, ratio) for n in sizes) + newlines
