"""Gemma 3: scores through the pooled grid, kept rows, pan-and-scan views.

A real vLLM engine (in-process, float32) loads the tiny Gemma 3 checkpoint
(``make-model --arch gemma3``: 448 px views, 32 x 32 patches pooled 4 x 4
into 8 x 8 tokens, as the published 896 px / 64 x 64 / 16 x 16). Scores are
compared with transformers' SigLIP tower (eager attention, the same
weights), pooled by an independent ``avg_pool2d`` here; the kept rows with
the unpruned embeddings; pan-and-scan counts with transformers' processor.
The served guarantees (counts, fuzz, r = 1.0 = stock, metrics, both runners)
are tests/test_served_families.py's, which runs every family.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, Gemma3ForConditionalGeneration
from vllm.multimodal.processing import PromptUpdateDetails

from hivtp_vllm.contract import Layout, Plan, to_fields
from hivtp_vllm.pruning import select_tokens, uniform_tokens
from hivtp_vllm.tools.local_server import in_process_llm
from tests.helpers import ok
from tests.reference_scores import transformers_scores

pytestmark = pytest.mark.server

SIDE, TOKENS = 32, 8  # patches and pooled tokens along a view's side (tiny checkpoint)
GRID = (TOKENS, TOKENS)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> object:
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("gemma3") / "tiny", arch="gemma3")


@pytest.fixture(scope="module")
def llm(tiny_gemma3):
    with in_process_llm(tiny_gemma3) as engine:
        yield engine


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 448, 448, generator=gen)


def pooled(scores: torch.Tensor) -> torch.Tensor:
    """[views, 32 * 32] patch scores -> [views, 8, 8]: the mean of each 4 x 4 block."""
    blocks = scores.reshape(-1, TOKENS, SIDE // TOKENS, TOKENS, SIDE // TOKENS)
    return blocks.mean(dim=(2, 4))


def test_checkpoint_is_gemma3_shaped(tiny_gemma3):
    processor = AutoProcessor.from_pretrained(tiny_gemma3)
    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma3)
    vision = model.config.vision_config
    assert vision.image_size // vision.patch_size == SIDE
    assert model.config.mm_tokens_per_image == TOKENS**2 == processor.image_seq_length
    tokenizer = processor.tokenizer
    ids = (tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id)
    assert ids == (255999, 256000, 262144)  # the published ids
    assert [tokenizer.convert_tokens_to_ids("\n" * n) for n in (1, 2, 3, 4)] == [107, 108, 109, 110]
    # The tower's weights are the published names' (vLLM loads them; the
    # projector is not all zeros, so images reach the LM).
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_scores_match_transformers_through_the_pool(llm, tiny_gemma3, pixel_values):
    def scores_in_vllm(model):
        pv = pixel_values.to(model.dtype)
        with model.hivtp_recorder.recording(torch.arange(len(pv))):
            model._image_pixels_to_features(model.vision_tower, pv)
        return model.hivtp_recorder.patch_scores().cpu()

    (ours,) = llm.apply_model(scores_in_vllm)
    expected = transformers_scores(
        Gemma3ForConditionalGeneration, tiny_gemma3, pixel_values, cls_tokens=0
    )
    assert ours.shape == (5, SIDE * SIDE)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    from hivtp_vllm.views import pool_scores

    torch.testing.assert_close(pool_scores(ours, TOKENS), pooled(expected), rtol=1e-4, atol=1e-7)


def plan(views: int, keep: tuple[int, ...], fraction: float = 0.5, uniform: bool = False) -> Plan:
    return Plan(Layout(grids=(GRID,) * views), keep, fraction, uniform=uniform)


def test_kept_embeddings_are_the_unpruned_ones(llm, pixel_values):
    """Three images of 1, 3 and 1 views (pan-and-scan crops are views): each
    pruned view keeps the rows the spec's selection picks on its pooled
    scores, in order; K = N is the stock path."""
    plans = [plan(1, (20,)), plan(3, (64, 10, 5), 0.25), plan(1, (64,))]
    num_patches = torch.tensor([1, 3, 1])

    def run(model):
        pv = pixel_values.to(model.dtype)
        stock = model.embed_multimodal(pixel_values=pv, num_patches=num_patches)
        pruned = model.embed_multimodal(
            pixel_values=pv, num_patches=num_patches, **to_fields(plans)
        )
        with model.hivtp_recorder.recording(torch.arange(4)):
            model._image_pixels_to_features(model.vision_tower, pv[:4])
        return (
            [s.cpu() for s in stock],
            [p.cpu() for p in pruned],
            model.hivtp_recorder.patch_scores().cpu(),
        )

    ((stock, pruned, scores),) = llm.apply_model(run)
    assert [p.shape[0] for p in pruned] == [20, 79, 64]
    assert torch.equal(pruned[2], stock[2])
    maps = pooled(scores)
    views = [(0, 0, 0, 20, 0.5), (1, 0, 1, 64, 0.25), (1, 1, 2, 10, 0.25), (1, 2, 3, 5, 0.25)]
    at = {0: 0, 1: 0}
    for image, view, row, k, fraction in views:
        kept = select_tokens(maps[row], k, global_fraction=fraction)
        want = stock[image][view * TOKENS**2 :][: TOKENS**2][kept]
        assert torch.equal(pruned[image][at[image] : at[image] + k], want), (image, view)
        at[image] += k
        if k < TOKENS**2:  # another selection gives other rows: the check can fail
            top = torch.topk(maps[row].flatten(), k).indices.sort().values
            if not torch.equal(top, kept):
                other = stock[image][view * TOKENS**2 :][: TOKENS**2][top]
                assert not torch.equal(pruned[image][at[image] - k : at[image]], other)


def test_uniform_baseline_computes_no_scores(llm, pixel_values):
    plans = [plan(1, (16,), uniform=True), plan(1, (64,), uniform=True)]
    num_patches = torch.tensor([1, 1])

    def run(model):
        pv = pixel_values[:2].to(model.dtype)
        model.hivtp_recorder._sum = None
        stock = model.embed_multimodal(pixel_values=pv, num_patches=num_patches)
        pruned = model.embed_multimodal(
            pixel_values=pv, num_patches=num_patches, **to_fields(plans)
        )
        return [s.cpu() for s in stock], [p.cpu() for p in pruned], model.hivtp_recorder._sum

    ((stock, pruned, recorded),) = llm.apply_model(run)
    assert recorded is None
    assert torch.equal(pruned[0], stock[0][uniform_tokens(TOKENS, TOKENS, 16)])
    assert torch.equal(pruned[1], stock[1])


# -- pan-and-scan: the original and its crops are views ---------------------

PAN_AND_SCAN = {"do_pan_and_scan": True}
# Wide, tall, near-square (no crops: ratio < 1.2) and too small to crop.
SIZES = [(900, 300), (300, 1000), (640, 480), (500, 480), (400, 200), (2000, 500)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pan_and_scan_views_are_transformers_crops(tiny_gemma3, size):
    """The plugin's views of an image are the crops transformers' processor
    makes (plus the original), with pan-and-scan on; the pruned prompt keeps
    each view's wrapper and K_v soft tokens, and only those are embeddings."""
    from PIL import Image
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import hivtp_vllm

    hivtp_vllm.register()
    processor = AutoProcessor.from_pretrained(tiny_gemma3)
    image = Image.new("RGB", size)
    out = processor(text="<start_of_image>", images=[image], do_pan_and_scan=True)
    views = len(out["pixel_values"])
    soft = processor.tokenizer.image_token_id
    assert out["input_ids"][0].count(soft) == views * TOKENS**2

    info = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(tiny_gemma3))).info
    layout = info.hivtp_layout(image_width=size[0], image_height=size[1], mm_kwargs=PAN_AND_SCAN)
    assert layout.grids == (GRID,) * views
    request = info.hivtp_request({"hivtp_retain_ratio": 0.25})
    pruned = info.hivtp_plan(
        image_width=size[0], image_height=size[1], request=request, mm_kwargs=PAN_AND_SCAN
    )
    details = info.hivtp_replacement(pruned)
    assert isinstance(details, PromptUpdateDetails)
    ids = list(details.full)
    assert int(details.is_embed(details.full).sum()) == pruned.tokens == 16 * views
    # The same text as stock with 16 soft tokens a view instead of 64.
    full = info.hivtp_replacement(
        info.hivtp_plan(
            image_width=size[0],
            image_height=size[1],
            request=info.hivtp_request({}),
            mm_kwargs=PAN_AND_SCAN,
        )
    )
    assert [t for t in ids if t != soft] == [t for t in full.full if t != soft]
    assert ids.count(processor.tokenizer.boi_token_id) == views


@pytest.mark.parametrize("family_servers", ["gemma3"], indirect=True)
def test_served_pan_and_scan_counts(family_servers):
    """The family's servers cut pan-and-scan crops (tests/conftest.py): a
    wide image's prompt is stock's less what K drops from each of
    transformers' views, and r = 1.0 is stock, on both runners."""
    import base64
    import io

    from PIL import Image

    from tests.runners import RUNNERS

    picture = Image.effect_noise((900, 300), 60).convert("RGB")
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    image = ["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()]
    processor = AutoProcessor.from_pretrained(family_servers.checkpoint)
    views = len(
        processor(text="<start_of_image>", images=[picture], do_pan_and_scan=True)["pixel_values"]
    )
    assert views == 4  # the original and three crops
    for runner in RUNNERS:
        ours, stock = family_servers.pair(runner)
        want = ok(stock.chat(image, max_tokens=4))
        got = ok(ours.chat(image, {"hivtp_retain_ratio": 0.25}, max_tokens=2))
        dropped = views * (TOKENS**2 - 16)
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] - dropped, runner
        same = ok(ours.chat(image, {"hivtp_retain_ratio": 1.0}, max_tokens=4))
        assert same["choices"][0]["message"] == want["choices"][0]["message"], runner
        assert same["usage"] == want["usage"], runner


def test_explain_selects_on_the_pooled_transformers_scores(tiny_gemma3, tmp_path):
    """``hivtp-vllm explain`` draws Gemma 3's pooled grid: its scores are
    transformers' patch scores pooled, its kept tokens the spec's selection."""
    import json

    from PIL import Image
    from transformers import AutoImageProcessor

    from hivtp_vllm.cli import main
    from hivtp_vllm.pruning import num_retained

    image = tmp_path / "wide.png"
    Image.effect_noise((600, 280), 80).convert("RGB").save(image)
    assert (
        main(
            ["explain", str(tiny_gemma3), str(image), "--ratios", "0.5,0.25"]
            + ["--out", str(tmp_path)]
        )
        == 0
    )
    doc = json.loads((tmp_path / "wide.hivtp.json").read_text())
    processor = AutoImageProcessor.from_pretrained(tiny_gemma3)
    pixels = processor(images=[Image.open(image).convert("RGB")], return_tensors="pt").pixel_values
    scores = pooled(
        transformers_scores(Gemma3ForConditionalGeneration, tiny_gemma3, pixels, cls_tokens=0)
    )[0]
    (view,) = doc["views"]
    assert view["grid"] == [TOKENS, TOKENS]
    torch.testing.assert_close(torch.tensor(view["scores"]), scores.flatten(), rtol=1e-4, atol=1e-7)
    for selection, ratio in zip(doc["selections"], (0.5, 0.25), strict=True):
        (kept,) = selection["views"]
        k = num_retained(TOKENS**2, ratio)
        assert kept["K"] == k
        assert kept["kept"] == select_tokens(scores, k).tolist(), selection["label"]
