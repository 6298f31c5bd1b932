"""The vLLM model itself: scores from vLLM's CLIP tower and the kept embeddings.

A real vLLM engine (in-process, float32) loads the tiny checkpoint; the test
runs functions on the loaded model with ``LLM.apply_model`` and compares with
transformers' ``CLIPVisionModel(output_attentions=True)`` on the same weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from hivtp_vllm.contract import Layout, Plan, to_fields
from hivtp_vllm.pruning import select_tokens
from hivtp_vllm.tools.local_server import in_process_llm
from tests.reference_scores import transformers_scores

pytestmark = pytest.mark.server

GRID = Layout(grids=((24, 24),))


def plans(keep: list[int], fractions: list[float]) -> dict[str, torch.Tensor]:
    """The processor's contract fields for images of one view each."""
    return to_fields([Plan(GRID, (k,), f) for k, f in zip(keep, fractions, strict=True)])


@pytest.fixture(scope="module")
def llm(tiny_llava):
    with in_process_llm(tiny_llava) as engine:
        yield engine


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 336, 336, generator=gen)


def test_scores_match_transformers(llm, tiny_llava, pixel_values):
    def scores_in_vllm(model):
        pv = pixel_values.to(model.vision_tower.dtype)
        with model.hivtp_recorder.recording(torch.arange(len(pv))):
            model._process_image_pixels({"type": "pixel_values", "pixel_values": pv})
        return model.hivtp_recorder.patch_scores().cpu()

    (ours,) = llm.apply_model(scores_in_vllm)
    expected = transformers_scores(LlavaForConditionalGeneration, tiny_llava, pixel_values)
    assert ours.shape == (3, 576)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    # Scores are attention mass: the patches' share of every query's unit sum.
    assert torch.all(ours > 0)


def test_kept_embeddings_are_the_unpruned_ones(llm, pixel_values):
    fields = plans([288, 576, 64], [0.5, 0.5, 0.25])

    def run(model):
        pv = pixel_values.to(model.vision_tower.dtype)
        stock = model.embed_multimodal(pixel_values=pv)
        pruned = model.embed_multimodal(pixel_values=pv, **fields)
        rows = torch.tensor([0, 2])
        with model.hivtp_recorder.recording(rows):
            model._process_image_pixels({"type": "pixel_values", "pixel_values": pv})
        return stock.cpu(), [p.cpu() for p in pruned], model.hivtp_recorder.patch_scores().cpu()

    ((stock, pruned, scores),) = llm.apply_model(run)
    assert [p.shape[0] for p in pruned] == [288, 576, 64]
    # K = N takes the stock path: the very same embeddings.
    assert torch.equal(pruned[1], stock[1])
    for out_row, score_row, k, fraction in ((0, 0, 288, 0.5), (2, 1, 64, 0.25)):
        kept = select_tokens(scores[score_row].reshape(24, 24), k, global_fraction=fraction)
        assert torch.equal(pruned[out_row], stock[out_row][kept])
        # A different selection would give different rows: the check can fail.
        top = torch.topk(scores[score_row], k).indices.sort().values
        if not torch.equal(top, kept):
            assert not torch.equal(pruned[out_row], stock[out_row][top])


def test_all_kept_is_stock_and_computes_no_scores(llm, pixel_values):
    def run(model):
        pv = pixel_values.to(model.vision_tower.dtype)
        calls = []
        handle = model.hivtp_recorder.modules[0].register_forward_pre_hook(
            lambda *_: calls.append(1)
        )
        try:
            stock = model.embed_multimodal(pixel_values=pv)
            model.hivtp_recorder._sum = None
            full = model.embed_multimodal(pixel_values=pv, **plans([576] * 3, [0.5] * 3))
        finally:
            handle.remove()
        return torch.equal(stock, torch.stack(list(full))), model.hivtp_recorder._sum, len(calls)

    ((same, recorded, calls),) = llm.apply_model(run)
    assert same and recorded is None and calls == 2  # the tower ran twice, unobserved


def test_uniform_baseline_computes_no_scores(llm, pixel_values):
    """hivtp_selection = uniform: the tower runs unobserved and the kept rows
    are the stock embeddings at the uniform baseline's tokens."""
    from hivtp_vllm.pruning import uniform_tokens

    uniform = to_fields([Plan(GRID, (k,), 0.5, uniform=True) for k in (144, 576, 64)])

    def run(model):
        pv = pixel_values.to(model.vision_tower.dtype)
        calls = []
        handle = model.hivtp_recorder.modules[0].register_forward_pre_hook(
            lambda *_: calls.append(1)
        )
        try:
            stock = model.embed_multimodal(pixel_values=pv)
            model.hivtp_recorder._sum = None
            pruned = model.embed_multimodal(pixel_values=pv, **uniform)
        finally:
            handle.remove()
        recorded = model.hivtp_recorder._sum
        return stock.cpu(), [p.cpu() for p in pruned], len(calls), recorded

    ((stock, pruned, calls, recorded),) = llm.apply_model(run)
    # The band's first layer ran twice (stock, uniform) and no score was recorded.
    assert calls == 2 and recorded is None
    for row, k in enumerate((144, 576, 64)):
        assert torch.equal(pruned[row], stock[row][uniform_tokens(24, 24, k)])
