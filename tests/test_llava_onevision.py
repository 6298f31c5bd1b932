"""LLaVA-OneVision: counts by aspect ratio, scores and kept embeddings, served.

Expected counts come from transformers' own OneVision processor
(``_get_number_of_features``) and helpers (``get_anyres_image_grid_shape``,
``unpad_image``, the ``anyres_max_9`` shrink written out here), not from
vLLM's code or ours.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    unpad_image,
)

import hivtp_vllm
from hivtp_vllm.contract import Layout, Plan, to_fields
from hivtp_vllm.pruning import num_retained, select_tokens
from hivtp_vllm.tools.local_server import image_data_url, in_process_llm
from tests.helpers import (
    anyres_index,
    chat_with_video,
    noise,
    process_one,
    prompt_tokens,
    stock_and_pruned,
    video_data_url,
)
from tests.reference_scores import transformers_scores
from tests.runners import RUNNERS

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


# -- server -----------------------------------------------------------------


# The family's servers, shared with tests/test_served_families.py (conftest).
SERVED = pytest.mark.parametrize("family_servers", ["llava-onevision"], indirect=True)


@pytest.fixture(params=RUNNERS)
def ov_servers(request, family_servers):
    """(plugin, stock) on each model runner."""
    return family_servers.pair(request.param)


@pytest.mark.server
@SERVED
def test_served_counts_by_aspect_ratio(ov_servers, pinpoints):
    ours, stock = ov_servers
    for seed, size in enumerate(SIZES):
        image = [image_data_url(100 + seed, *size)]
        full = prompt_tokens(stock.chat(image))
        text = full - expected_tokens(size, None, pinpoints)
        for kwargs in (
            None,
            {"hivtp_retain_ratio": 1.0},
            {"hivtp_retain_ratio": 0.5},
            {"hivtp_retain_ratio": 0.25},
            {"hivtp_num_tokens": 100},
        ):
            want = text + expected_tokens(size, kwargs, pinpoints)
            assert prompt_tokens(ours.chat(image, kwargs)) == want, (size, kwargs)


@pytest.mark.server
@SERVED
def test_served_full_ratio_matches_stock(ov_servers):
    ours, stock = ov_servers
    image = [image_data_url(200, 2000, 1500)]
    want = stock.chat(image, max_tokens=12).json()
    for kwargs in (None, {"hivtp_retain_ratio": 1.0}):
        got = ours.chat(image, kwargs, max_tokens=12).json()
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert got["usage"] == want["usage"]


@pytest.mark.server
@SERVED
def test_served_concurrent_mixed(ov_servers, pinpoints):
    ours, stock = ov_servers
    jobs = []
    for i, size in enumerate(SIZES * 2):
        kwargs = (
            {"hivtp_retain_ratio": 0.5},
            {"hivtp_retain_ratio": 0.25},
            {"hivtp_num_tokens": 50},
        )[i % 3]
        image = [image_data_url(300 + i, *size)]
        text = prompt_tokens(stock.chat(image, max_tokens=1)) - expected_tokens(
            size, None, pinpoints
        )
        jobs.append((image, kwargs, text + expected_tokens(size, kwargs, pinpoints)))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(ours.chat, img, kw, max_tokens=4) for img, kw, _ in jobs]
    for (_, kwargs, want), future in zip(jobs, futures, strict=True):
        assert prompt_tokens(future.result()) == want, kwargs


@pytest.mark.server
@SERVED
def test_bad_input_is_a_400(ov_servers):
    ours, _ = ov_servers
    image = [image_data_url(400, 384, 384)]  # base 729 + 27 x 27 + 27 newlines
    for kwargs, key in (
        ({"hivtp_retain_ratio": 0}, "hivtp_retain_ratio"),
        ({"hivtp_num_tokens": 2 * BASE + 1}, "hivtp_num_tokens"),
        ({"hivtp_num_tokens": 1}, "hivtp_num_tokens"),
        ({"hivtp_global_fraction": -1}, "hivtp_global_fraction"),
    ):
        response = ours.chat(image, kwargs)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == key
    assert ours.alive() and prompt_tokens(ours.chat(image, {"hivtp_retain_ratio": 0.5})) > 0


@pytest.mark.server
@SERVED
def test_videos_are_served_as_stock(ov_servers, pinpoints):
    """hivtp keys apply to images only: a video's tokens and answer are stock's,
    alone or next to a pruned image."""
    ours, stock = ov_servers
    video = video_data_url(500)
    want = chat_with_video(stock, video, None, None).json()
    for kwargs in (None, {"hivtp_retain_ratio": 0.25}):
        got = chat_with_video(ours, video, None, kwargs).json()
        assert got["usage"] == want["usage"], kwargs
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
    image = image_data_url(501, 768, 384)
    both = prompt_tokens(chat_with_video(stock, video, image, None))
    pruned = prompt_tokens(chat_with_video(ours, video, image, {"hivtp_retain_ratio": 0.25}))
    saved = expected_tokens((768, 384), None, pinpoints) - expected_tokens(
        (768, 384), {"hivtp_retain_ratio": 0.25}, pinpoints
    )
    assert both - pruned == saved > 0


@pytest.mark.server
@SERVED
def test_metrics_count_onevision_images_and_tokens(ov_servers, pinpoints):
    from hivtp_vllm.tools.local_server import metric

    ours, _ = ov_servers
    model = {"model_name": ours.model}
    before = ours.scrape()
    sent = [
        ((768, 384), {"hivtp_retain_ratio": 0.25}),
        ((2000, 1500), {"hivtp_num_tokens": 300}),
        ((200, 150), None),
    ]
    for seed, (size, kwargs) in enumerate(sent):
        assert ours.chat([image_data_url(600 + seed, *size)], kwargs, max_tokens=1).ok
    after = ours.scrape()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels, **model) - metric(before, name, **labels, **model)

    assert delta("hivtp_images_total") == len(sent)
    full = sum(expected_tokens(size, None, pinpoints) for size, _ in sent)
    kept = sum(expected_tokens(size, kwargs, pinpoints) for size, kwargs in sent)
    assert delta("hivtp_visual_tokens_total", kind="input") == full
    assert delta("hivtp_visual_tokens_total", kind="retained") == kept
    assert delta("hivtp_pruning_seconds_count") >= 1


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
