"""LLaVA-OneVision: counts by aspect ratio, scores and kept embeddings.

Its server tests are every family's (tests/test_served_families.py).

Expected counts come from transformers' own OneVision processor
(``_get_number_of_features``) and helpers (``get_anyres_image_grid_shape``,
``unpad_image``, the ``anyres_max_9`` shrink written out here), not from
vLLM's code or ours.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    unpad_image,
)

import hivtp_vllm
from hivtp_vllm.contract import Layout, Plan, to_fields
from hivtp_vllm.pruning import num_retained, select_tokens
from hivtp_vllm.tools.local_server import in_process_llm
from tests.helpers import anyres_index, noise, process_one, stock_and_pruned
from tests.reference_scores import transformers_scores

BASE = 729  # 27 x 27 SigLIP patches at 384 px
SIDE = 27
MAX_LEN = 16384
# (width, height): square, 2:1, 1:2, 5:2, 1:4, smaller than a tile, and one
# whose high-res grid is shrunk (anyres_max_9).
SIZES = [(384, 384), (768, 384), (384, 768), (960, 384), (300, 1200), (200, 150), (2000, 1500)]


def highres_grid(width: int, height: int, pinpoints) -> tuple[int, int, tuple[int, int], bool]:
    """(H', W', tile grid, shrunk) of the grid the language model receives."""
    rows, cols = get_anyres_image_grid_shape((height, width), pinpoints, 384)
    grid = unpad_image(torch.empty(1, rows * SIDE, cols * SIDE), (height, width))
    h, w = grid.shape[1], grid.shape[2]
    ratio = math.sqrt(h * w / (9 * SIDE**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio), (rows, cols), True
    return h, w, (rows, cols), False


def expected_tokens(size, kwargs: dict | None, pinpoints) -> int:
    h, w, _, _ = highres_grid(*size, pinpoints)
    kwargs = kwargs or {}
    if "hivtp_num_tokens" in kwargs:
        return kwargs["hivtp_num_tokens"] + h
    r = kwargs.get("hivtp_retain_ratio", 1.0)
    return num_retained(BASE, r) + num_retained(h * w, r) + h


@pytest.fixture(scope="module")
def tiny_ov(tmp_path_factory):
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ov") / "tiny-ov", arch="llava-onevision")


@pytest.fixture(scope="module")
def pinpoints(tiny_ov):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_ov).image_grid_pinpoints


def test_checkpoint_is_onevision_shaped(tiny_ov, pinpoints):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_ov)
    assert config.architectures == ["LlavaOnevisionForConditionalGeneration"]
    assert type(config.vision_config).__name__ == "SiglipVisionConfig"
    assert type(config.text_config).__name__ == "Qwen2Config"
    assert config.vision_feature_select_strategy == "full" and config.vision_feature_layer == -1
    assert len(pinpoints) == 36 and [2304, 2304] in pinpoints
    processor = AutoProcessor.from_pretrained(tiny_ov)
    assert processor.video_processor is not None
    # transformers' own count agrees with ours for every test size.
    for w, h in SIZES:
        assert processor._get_number_of_features(h, w, 384, 384) == expected_tokens(
            (w, h), None, pinpoints
        )
    assert any(highres_grid(w, h, pinpoints)[3] for w, h in SIZES)  # one shrinks


# -- processor ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ov_processor(tiny_ov):
    hivtp_vllm.register()
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(
        ModelConfig(model=str(tiny_ov), max_model_len=MAX_LEN)
    )


def placeholder_length(processor, image, kwargs) -> int:
    return process_one(processor, image, kwargs)[0]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_processor_counts(ov_processor, pinpoints, size):
    image = noise(0, *size)
    stock = ov_processor.info.get_num_image_tokens(image_width=size[0], image_height=size[1])
    assert stock == expected_tokens(size, None, pinpoints)
    for kwargs in (
        None,
        {"hivtp_retain_ratio": 1.0},
        {"hivtp_retain_ratio": 0.5},
        {"hivtp_retain_ratio": 0.25},
        {"hivtp_num_tokens": 100},
    ):
        assert placeholder_length(ov_processor, image, kwargs) == expected_tokens(
            size, kwargs, pinpoints
        ), kwargs


# -- model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ov_llm(tiny_ov):
    with in_process_llm(tiny_ov, max_model_len=MAX_LEN) as engine:
        yield engine


def test_scores_kept_embeddings_and_newlines(ov_llm, tiny_ov, pinpoints):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_ov)
    cases = [((960, 384), 0.25), ((300, 1200), 0.5), ((2000, 1500), 0.25), ((200, 150), 0.5)]
    images = [noise(7 + i, w, h) for i, ((w, h), _) in enumerate(cases)]
    batch = [processor.image_processor(img, return_tensors="pt") for img in images]
    pixel_values = [b["pixel_values"][0] for b in batch]  # [tiles_i, 3, 384, 384]
    image_sizes = torch.cat([b["image_sizes"] for b in batch])
    plans, shapes = [], []
    for (w, h), r in cases:
        hh, ww, tiles, _ = highres_grid(w, h, pinpoints)
        keep = (num_retained(BASE, r), num_retained(hh * ww, r))
        layout = Layout(grids=((SIDE, SIDE), (hh, ww)), newlines=hh, tiles=tiles)
        plans.append(Plan(layout, keep, 0.5))
        shapes.append((hh, ww, tiles))

    stock, pruned, newline, vllm_scores = stock_and_pruned(
        ov_llm, pixel_values, image_sizes, to_fields(plans)
    )

    def reference(tile_pixels):
        return transformers_scores(
            LlavaOnevisionForConditionalGeneration, tiny_ov, tile_pixels, cls_tokens=0
        )

    # Scores from vLLM's SigLIP, tile by tile, equal transformers' attentions.
    torch.testing.assert_close(vllm_scores, reference(pixel_values[0]), rtol=1e-4, atol=1e-7)
    for i, ((w, h), _) in enumerate(cases):
        hh, ww, (rows, cols) = shapes[i]
        plan = plans[i]
        assert pruned[i].shape[0] == plan.tokens
        # Scores from transformers, stitched, unpadded and shrunk here the way
        # transformers packs OneVision features.
        scores = reference(pixel_values[i])
        hr = scores[1 : 1 + rows * cols].view(rows, cols, SIDE, SIDE, 1).permute(4, 0, 2, 1, 3)
        hr = unpad_image(hr.reshape(1, rows * SIDE, cols * SIDE), (h, w))
        if hr.shape[1:] != (hh, ww):
            hr = torch.nn.functional.interpolate(hr[None], [hh, ww], mode="bilinear")[0]
        hr = hr[0]
        base_kept = select_tokens(scores[0].view(SIDE, SIDE), plan.keep[0])
        hr_kept = select_tokens(hr, plan.keep[1])
        # Stock layout: the base view, then H' rows of W' tokens + 1 newline.
        index = anyres_index(base_kept, hr_kept, hh, ww, BASE)
        assert stock[i].shape[0] == BASE + hh * ww + hh
        assert torch.equal(pruned[i], stock[i][index]), (w, h)
        is_newline = (pruned[i] == newline).all(dim=1)
        assert int(is_newline.sum()) == hh and bool(is_newline[-1])


def test_uniform_baseline_computes_no_scores(ov_llm, tiny_ov, pinpoints):
    """The uniform baseline on both views: no scoring, stock rows at the
    uniform tokens of the base view and of the shrunk grid, newlines kept."""
    from transformers import AutoProcessor

    from hivtp_vllm.pruning import uniform_tokens

    processor = AutoProcessor.from_pretrained(tiny_ov)
    size = (2000, 1500)
    batch = processor.image_processor(noise(9, *size), return_tensors="pt")
    hh, ww, tiles, shrunk = highres_grid(*size, pinpoints)
    assert shrunk
    keep = (num_retained(BASE, 0.25), num_retained(hh * ww, 0.25))
    layout = Layout(grids=((SIDE, SIDE), (hh, ww)), newlines=hh, tiles=tiles)
    fields = to_fields([Plan(layout, keep, 0.5, uniform=True)])

    def run(model):
        calls = []
        handle = model.hivtp_recorder.modules[0].register_forward_pre_hook(
            lambda *_: calls.append(1)
        )
        try:
            kwargs = {
                "pixel_values": [batch["pixel_values"][0]],
                "image_sizes": batch["image_sizes"],
            }
            stock = model.embed_multimodal(**kwargs)
            model.hivtp_recorder._sum = None
            pruned = model.embed_multimodal(**kwargs, **fields)
        finally:
            handle.remove()
        recorded = model.hivtp_recorder._sum
        return stock[0].cpu(), pruned[0].cpu(), len(calls), recorded

    ((stock, pruned, calls, recorded),) = ov_llm.apply_model(run)
    assert calls == 2 and recorded is None  # one tower pass each, no score recorded
    index = anyres_index(
        uniform_tokens(SIDE, SIDE, keep[0]), uniform_tokens(hh, ww, keep[1]), hh, ww, BASE
    )
    assert torch.equal(pruned, stock[index])
