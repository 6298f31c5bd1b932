"""LLaVA-NeXT: exact counts per aspect ratio, scores and kept embeddings, and the
views with no tokens, served.

Expected counts and layouts are computed here from transformers' own anyres
helpers (``get_anyres_image_grid_shape``, ``unpad_image``), not from vLLM's
code or ours.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

import hivtp_vllm
from hivtp_vllm.contract import Layout, Plan, to_fields
from hivtp_vllm.pruning import num_retained, select_tokens, split_budget
from hivtp_vllm.tools.local_server import image_data_url, in_process_llm
from tests.helpers import anyres_index, noise, process_one, prompt_tokens, stock_and_pruned
from tests.reference_scores import transformers_scores
from tests.runners import RUNNERS

SIZES = [(336, 336), (672, 336), (1000, 400), (300, 1200), (200, 150)]  # (width, height)
BASE = 576


def highres_grid(width: int, height: int) -> tuple[int, int, tuple[int, int]]:
    """(H', W', tile grid) from transformers' helpers (llava-v1.6 pinpoints)."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    rows, cols = get_anyres_image_grid_shape((height, width), pinpoints, 336)
    grid = unpad_image(torch.empty(1, rows * 24, cols * 24), (height, width))
    return grid.shape[1], grid.shape[2], (rows, cols)


def expected_tokens(width: int, height: int, kwargs: dict | None) -> int:
    h, w, _ = highres_grid(width, height)
    kwargs = kwargs or {}
    if "hivtp_num_tokens" in kwargs:
        return kwargs["hivtp_num_tokens"] + h
    r = kwargs.get("hivtp_retain_ratio", 1.0)
    return num_retained(BASE, r) + num_retained(h * w, r) + h


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory) -> object:
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("next") / "tiny-next", arch="llava-next")


# -- processor ---------------------------------------------------------------


@pytest.fixture(scope="module")
def next_processor(tiny_next):
    hivtp_vllm.register()
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(model=str(tiny_next), max_model_len=4096)
    return MULTIMODAL_REGISTRY.create_processor(config)


def placeholder_length(processor, image, kwargs):
    length, item = process_one(processor, image, kwargs)
    return length, item["hivtp_num_keep"].data.tolist()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_processor_counts(next_processor, size):
    width, height = size
    image = noise(0, width, height)
    stock = next_processor.info.get_num_image_tokens(image_width=width, image_height=height)
    h, w, _ = highres_grid(width, height)
    assert stock == BASE + h * w + h  # our independent layout agrees with vLLM's
    for kwargs in (
        None,
        {"hivtp_retain_ratio": 1.0},
        {"hivtp_retain_ratio": 0.5},
        {"hivtp_retain_ratio": 0.25},
        {"hivtp_num_tokens": 64},
        {"hivtp_num_tokens": 2},
    ):
        length, budgets = placeholder_length(next_processor, image, kwargs)
        assert length == expected_tokens(width, height, kwargs), kwargs
        assert sum(budgets) + h == length


def test_budget_split_is_proportional(next_processor):
    # 1000 x 400 -> H' x W' = 19 x 48 (912 tokens) next to the 576 base tokens.
    h, w, _ = highres_grid(1000, 400)
    _, budgets = placeholder_length(next_processor, noise(1, 1000, 400), {"hivtp_num_tokens": 100})
    assert budgets == split_budget(100, [BASE, h * w])
    assert budgets[0] == round(100 * BASE / (BASE + h * w))


def test_budget_out_of_range_is_a_400(next_processor):
    from vllm.exceptions import VLLMValidationError

    h, w, _ = highres_grid(672, 336)
    for bad in (1, BASE + h * w + 1):
        with pytest.raises(VLLMValidationError, match=r"\[2, ") as info:
            placeholder_length(next_processor, noise(2, 672, 336), {"hivtp_num_tokens": bad})
        assert info.value.parameter == "hivtp_num_tokens"


# -- model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def next_llm(tiny_next):
    with in_process_llm(tiny_next) as engine:
        yield engine


def transformers_tile_scores(checkpoint, pixel_values: torch.Tensor) -> torch.Tensor:
    from transformers import LlavaNextForConditionalGeneration

    return transformers_scores(LlavaNextForConditionalGeneration, checkpoint, pixel_values)


def test_kept_embeddings_and_newlines(next_llm, tiny_next):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_next)
    cases = [((1000, 400), 0.25), ((300, 1200), 0.5), ((200, 150), 0.25)]
    images = [noise(7 + i, w, h) for i, ((w, h), _) in enumerate(cases)]
    batch = [processor.image_processor(img, return_tensors="pt") for img in images]
    pixel_values = [b["pixel_values"][0] for b in batch]  # [tiles_i, 3, 336, 336]
    image_sizes = torch.cat([b["image_sizes"] for b in batch])
    num_keep, expected, plans = [], [], []
    for (w, h), r in cases:
        hh, ww, tiles = highres_grid(w, h)
        num_keep.append([num_retained(BASE, r), num_retained(hh * ww, r)])
        expected.append(num_keep[-1][0] + num_keep[-1][1] + hh)
        layout = Layout(grids=((24, 24), (hh, ww)), newlines=hh, tiles=tiles)
        plans.append(Plan(layout, tuple(num_keep[-1]), 0.5))

    stock, pruned, newline, vllm_scores = stock_and_pruned(
        next_llm, pixel_values, image_sizes, to_fields(plans)
    )
    # Scores from vLLM's CLIP, tile by tile, equal transformers' attentions.
    torch.testing.assert_close(
        vllm_scores, transformers_tile_scores(tiny_next, pixel_values[0]), rtol=1e-4, atol=1e-7
    )
    for i, ((w, h), _) in enumerate(cases):
        hh, ww, tile_grid = highres_grid(w, h)
        assert pruned[i].shape[0] == expected[i]
        # Scores from transformers, stitched here the way transformers packs
        # LLaVA-NeXT features (view, permute, unpad).
        scores = transformers_tile_scores(tiny_next, pixel_values[i])
        rows, cols = tile_grid
        hr = scores[1 : 1 + rows * cols].view(rows, cols, 24, 24, 1).permute(4, 0, 2, 1, 3)
        hr = unpad_image(hr.reshape(1, rows * 24, cols * 24), (h, w))[0]
        assert hr.shape == (hh, ww)
        base_kept = select_tokens(scores[0].view(24, 24), num_keep[i][0])
        hr_kept = select_tokens(hr, num_keep[i][1])
        # Stock layout: the base view, then H' rows of W' tokens + 1 newline.
        index = anyres_index(base_kept, hr_kept, hh, ww, BASE)
        assert torch.allclose(pruned[i], stock[i][index], rtol=0, atol=0)
        # Every row kept its newline, right after that row's kept tokens.
        is_newline = (pruned[i] == newline).all(dim=1)
        assert int(is_newline.sum()) == hh
        assert bool(is_newline[-1])


# -- server -----------------------------------------------------------------


# The family's servers, shared with tests/test_served_families.py (conftest),
# which holds the server tests every family shares: counts by aspect ratio,
# two images of different shapes, r = 1.0 as stock, mixed options at once.
SERVED = pytest.mark.parametrize("family_servers", ["llava-next"], indirect=True)


@pytest.fixture(params=RUNNERS)
def next_servers(request, family_servers):
    """(plugin, stock) on each model runner."""
    return family_servers.pair(request.param)


@pytest.mark.server
@SERVED
def test_views_with_no_tokens_are_served(next_servers):
    """Issue 10: a 900 x 2 image has no high-res rows, a 2 x 900 one no columns.
    Stock vLLM serves both; so must the plugin, unpruned and pruned, and the
    engine must be up afterwards."""
    ours, stock = next_servers
    wide, tall = [image_data_url(500, 900, 2)], [image_data_url(501, 2, 900)]
    h_wide, w_wide, _ = highres_grid(900, 2)
    h_tall, w_tall, _ = highres_grid(2, 900)
    assert h_wide == 0 and w_tall == 0 and h_tall > 0  # the cases this test is about
    full_wide = prompt_tokens(stock.chat(wide))
    assert prompt_tokens(ours.chat(wide)) == full_wide
    full_tall = prompt_tokens(stock.chat(tall))
    assert prompt_tokens(ours.chat(tall)) == full_tall
    text = full_tall - (BASE + h_tall)
    for kwargs, visual in (
        ({"hivtp_retain_ratio": 0.1}, num_retained(BASE, 0.1) + h_tall),
        ({"hivtp_retain_ratio": 0.5}, num_retained(BASE, 0.5) + h_tall),
        ({"hivtp_num_tokens": 3}, 3 + h_tall),  # the whole budget to the base view
        ({"hivtp_num_tokens": 1}, 1 + h_tall),
    ):
        assert prompt_tokens(ours.chat(tall, kwargs)) == text + visual, kwargs
    bad = ours.chat(tall, {"hivtp_num_tokens": BASE + 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "hivtp_num_tokens"
    assert f"[1, {BASE}]" in bad.json()["error"]["message"]
    assert ours.alive() and prompt_tokens(ours.chat(wide, {"hivtp_retain_ratio": 0.25})) > 0
