"""Scoring math (torch only): blockwise received attention vs the plain formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hivtp_vllm import scoring
from hivtp_vllm.scoring import ReceivedAttention, check_band, received_attention


def naive(query, key, heads, scale):
    b, s, _ = query.shape
    q = query.view(b, s, heads, -1).transpose(1, 2).double()
    k = key.view(b, s, heads, -1).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return probs.sum(dim=(1, 2))


@pytest.mark.parametrize(
    ("b", "s", "heads", "dim"), [(1, 577, 4, 16), (3, 50, 2, 8), (2, 17, 1, 4)]
)
def test_blockwise_equals_plain_softmax(monkeypatch, b, s, heads, dim):
    gen = torch.Generator().manual_seed(b * s)
    query = torch.randn(b, s, heads * dim, generator=gen) * 3
    key = torch.randn(b, s, heads * dim, generator=gen) * 3
    expected = naive(query, key, heads, dim**-0.5)
    # Tiny blocks force many query blocks and a ragged last one.
    monkeypatch.setitem(scoring._BLOCK_ELEMENTS, "cpu", 16 * b * heads * s)
    got = received_attention(query, key, heads, dim**-0.5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # Each query's probabilities sum to one: total mass is heads * S.
    torch.testing.assert_close(
        got.sum(dim=1), torch.full((b,), float(heads * s)), rtol=1e-5, atol=1e-3
    )


class FakeAttention(nn.Module):
    def forward(self, q, k, v):
        return v


def test_recorder_mean_rows_and_cleanup():
    mods = [FakeAttention(), FakeAttention()]
    rec = ReceivedAttention(mods, num_heads=2, total_heads=2, scale=0.5)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    with rec.recording(torch.tensor([0, 2])):
        for m in mods:
            m(q, k, q)
    scores = rec.patch_scores()
    # Two layers saw the same q, k: the mean over layers is one layer's value.
    expected = naive(q[[0, 2]], k[[0, 2]], 2, 0.5)[:, 1:] / (2 * 5)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)
    assert all(not m._forward_pre_hooks for m in mods)  # hooks removed


def test_band_must_fit_the_run_layers():
    check_band(6, 3, 23)
    for start, count in ((21, 3), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="hivtp_layer_start"):
            check_band(start, count, 23)
