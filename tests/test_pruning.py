"""Tests of hivtp_vllm.pruning against the spec (/work/shared/hivtp-spec.md).

Two kinds of checks:

* exact agreement with ``spec_reference`` (a plain-Python, loop-by-loop
  transcription of sections 2 and 3 of the spec, docs/spec.md) over many grids, budgets,
  region layouts and global fractions, with and without score ties;
* hand-worked cases whose expected output is derived in the comments, so the
  reference itself is checked too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from spec_reference import (
    reference_counts,
    reference_num_retained,
    reference_quotas,
    reference_regions,
    reference_select,
    reference_window_size,
)

from hivtp_vllm import pruning
from hivtp_vllm.pruning import (
    apportion,
    check_num_tokens,
    default_band,
    num_retained,
    region_quotas,
    select_tokens,
    select_tokens_batched,
    window_size,
)

FRACTIONS = (0.0, 0.3, 0.5, 1.0)
REGIONS = ((2, 2), (1, 1), (3, 3), (4, 2))
SMALL_GRIDS = (
    (1, 1),
    (1, 9),
    (9, 1),
    (3, 3),
    (5, 2),
    (2, 5),
    (4, 4),
    (6, 6),
    (7, 13),
    (13, 7),
)
LARGE_GRIDS = ((24, 24), (27, 27), (20, 31))


def make_scores(h: int, w: int, kind: str, seed: int, batch: int | None = None) -> torch.Tensor:
    """Seeded scores: 'rand' (ties practically absent), 'ties' (values 0..2),
    'equal' (all the same)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (h, w) if batch is None else (batch, h, w)
    if kind == "rand":
        return torch.rand(shape, generator=gen)
    if kind == "ties":
        return torch.randint(0, 3, shape, generator=gen).float()
    if kind == "equal":
        return torch.full(shape, 0.25)
    raise AssertionError(kind)


def check_output(out: torch.Tensor, n: int, k: int) -> None:
    """Length K, dtype long, in [0, N), strictly ascending (hence unique)."""
    assert out.dtype == torch.long
    assert out.shape == (k,)
    assert int(out.min()) >= 0 and int(out.max()) < n
    assert bool((out[1:] > out[:-1]).all())
    assert len(set(out.tolist())) == k


def spread_of_k(n: int) -> list[int]:
    ks = {
        1,
        2,
        3,
        7,
        50,
        64,
        100,
        128,
        144,
        192,
        200,
        287,
        288,
        289,
        400,
        n // 3,
        n // 2,
        n - 1,
        n,
    }
    return sorted(k for k in ks if 1 <= k <= n)


# --------------------------------------------------------------------------
# Section 2: retained count; section 1: default band
# --------------------------------------------------------------------------

# (r, K, K_g, K_l, w, windows) from the spec's examples table, 24 x 24 grid.
SPEC_TABLE = [
    (0.5, 288, 144, 144, 2, 144),
    (1 / 3, 192, 96, 96, 2, 144),
    (0.25, 144, 72, 72, 2, 144),
    (2 / 9, 128, 64, 64, 3, 64),
    (1 / 9, 64, 32, 32, 4, 36),
]


@pytest.mark.parametrize(("r", "k", "k_g", "k_l", "w", "windows"), SPEC_TABLE)
def test_spec_examples_table(r, k, k_g, k_l, w, windows):
    n = 24 * 24
    assert num_retained(n, r) == k
    assert reference_num_retained(n, r) == k
    assert reference_counts(k, 0.5) == (k_g, k_l)
    assert window_size(24, 24, k_l) == w
    assert reference_window_size(24, 24, k_l) == w
    assert math.ceil(24 / w) ** 2 == windows
    # Region quotas at the defaults: four 12 x 12 quadrants, K_g / 4 each.
    _, quota = region_quotas(24, 24, k_g, (2, 2))
    assert quota.tolist() == [k_g // 4] * 4
    # The selection itself keeps exactly K tokens.
    out = select_tokens(make_scores(24, 24, "rand", seed=k), k)
    check_output(out, n, k)


def test_num_retained_matches_reference():
    ratios = [
        0.001,
        0.01,
        0.1,
        1 / 9,
        0.125,
        2 / 9,
        0.25,
        1 / 3,
        0.4,
        0.5,
        0.6,
        2 / 3,
        0.75,
        0.9,
        0.99,
        1.0,
    ]
    for n in [1, 2, 3, 5, 9, 16, 91, 144, 576, 729, 2304, 4096]:
        for r in ratios:
            assert num_retained(n, r) == reference_num_retained(n, r), (n, r)


def test_num_retained_hand_cases():
    # floor(r * N + 0.5): round half up, at least 1, at most N.
    assert num_retained(576, 1.0) == 576
    assert num_retained(576, 0.001) == 1  # 0.576 + 0.5 -> 1
    assert num_retained(10, 0.25) == 3  # 2.5 + 0.5 = 3.0 -> 3 (half rounds up)
    assert num_retained(10, 0.24) == 2  # 2.4 + 0.5 = 2.9 -> 2
    assert num_retained(1, 0.01) == 1  # floor(0.51) = 0 -> max(1, 0) = 1
    assert num_retained(3, 0.5) == 2  # 1.5 + 0.5 = 2.0 -> 2


@pytest.mark.parametrize("r", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_num_retained_invalid_ratio(r):
    with pytest.raises(ValueError):
        num_retained(576, r)
    with pytest.raises(ValueError):
        reference_num_retained(576, r)


def test_check_num_tokens_absolute_budget():
    assert check_num_tokens(576, 1) == 1
    assert check_num_tokens(576, 576) == 576
    assert check_num_tokens(576, 128) == 128
    for bad in (0, -1, 577):
        with pytest.raises(ValueError):
            check_num_tokens(576, bad)


def test_default_band():
    assert default_band(24) == (6, 3)  # CLIP-L: layers 6, 7, 8
    for layers in range(1, 100):
        m = math.floor(Fraction(layers, 4) + Fraction(1, 2))
        q = max(1, math.floor(Fraction(layers, 8) + Fraction(1, 2)))
        assert default_band(layers) == (m, q), layers
    with pytest.raises(ValueError):
        default_band(0)


# --------------------------------------------------------------------------
# Section 3 building blocks: window size and region quotas
# --------------------------------------------------------------------------


def test_window_size_matches_reference():
    for h, w in [
        (1, 1),
        (1, 9),
        (9, 1),
        (4, 4),
        (5, 2),
        (7, 13),
        (24, 24),
        (27, 27),
        (20, 31),
    ]:
        for k_l in range(1, h * w + 1):
            assert window_size(h, w, k_l) == reference_window_size(h, w, k_l), (
                h,
                w,
                k_l,
            )


def test_window_size_hand_cases():
    # 4x4: w=4 gives 1 window, w=3 gives 2*2 = 4, w=2 gives 4, w=1 gives 16.
    assert window_size(4, 4, 1) == 4
    assert window_size(4, 4, 3) == 3
    assert window_size(4, 4, 4) == 3
    assert window_size(4, 4, 5) == 1
    # 1x40, K_l = 3: w=20 -> 2 windows; w=19 -> ceil(40/19) = 3 windows.
    assert window_size(1, 40, 3) == 19
    # 24x24, K_l = 32: w=5 -> 5*5 = 25 < 32; w=4 -> 6*6 = 36.
    assert window_size(24, 24, 32) == 4


def test_region_quotas_match_reference():
    for h, w in SMALL_GRIDS + LARGE_GRIDS:
        n = h * w
        for regions in REGIONS + ((5, 5), (2, 3)):
            ref_regions = reference_regions(h, w, regions)
            ref_region_of = [0] * n
            for t, tokens in enumerate(ref_regions):
                for p in tokens:
                    ref_region_of[p] = t
            sizes = [len(t) for t in ref_regions]
            for k_g in sorted({0, 1, 2, 3, n // 7, n // 3, n // 2, n - 1, n}):
                region, quota = region_quotas(h, w, k_g, regions)
                assert region.tolist() == ref_region_of, (h, w, regions)
                assert quota.tolist() == reference_quotas(sizes, k_g), (
                    h,
                    w,
                    regions,
                    k_g,
                )
                assert int(quota.sum()) == k_g


def test_device_largest_remainder_is_apportion():
    # Selection apportions region quotas on the scores' device without
    # reading the leftover count back; it must be apportion's rule exactly,
    # empty parts and all-tied remainders included.
    gen = torch.Generator().manual_seed(17)
    for _ in range(400):
        parts = int(torch.randint(1, 10, (1,), generator=gen))
        sizes = torch.randint(0, 30, (parts,), generator=gen)
        whole = int(sizes.sum())
        if whole == 0:
            continue
        for total in sorted({0, 1, whole // 3, whole // 2, whole - 1, whole}):
            got = pruning._largest_remainder(total, sizes, whole)
            assert got.tolist() == apportion(total, sizes).tolist(), (total, sizes.tolist())
    tied = torch.tensor([4, 4, 4, 4])
    assert pruning._largest_remainder(3, tied, 16).tolist() == [1, 1, 1, 0]


def test_region_layout_sizes_match_regions():
    for h, w in SMALL_GRIDS + LARGE_GRIDS + ((1, 40), (13, 1)):
        for regions in REGIONS + ((5, 5), (2, 3)):
            region, sizes = pruning._region_layout(h, w, regions)
            rh, rw = regions
            assert sizes.tolist() == torch.bincount(region, minlength=rh * rw).tolist()


def test_region_quotas_hand_cases():
    # 5x5 with (2,2): row/col boundaries floor(i*5/2) = 0, 2, 5, so bands of 2
    # and 3 rows (cols); region sizes (row-major) 4, 6, 6, 9; N = 25.
    region, quota = region_quotas(5, 5, 3, (2, 2))
    assert region.tolist() == [
        0, 0, 1, 1, 1,
        0, 0, 1, 1, 1,
        2, 2, 3, 3, 3,
        2, 2, 3, 3, 3,
        2, 2, 3, 3, 3,
    ]  # fmt: skip
    # K_g = 3: exact shares 12/25, 18/25, 18/25, 27/25 -> floors 0, 0, 0, 1;
    # 2 left go to the largest fractions 18/25 (regions 1 and 2).
    assert quota.tolist() == [0, 1, 1, 1]
    # K_g = 2: shares 8/25, 12/25, 12/25, 18/25 -> floors all 0; 2 left:
    # region 3 (18/25), then the tie 12/25 between regions 1 and 2 goes to
    # the lower region order, region 1.
    _, quota = region_quotas(5, 5, 2, (2, 2))
    assert quota.tolist() == [0, 1, 0, 1]
    # 4x4, K_g = 3: four equal shares 3/4 -> floors 0; 3 left, all tied:
    # regions 0, 1, 2 in order.
    _, quota = region_quotas(4, 4, 3, (2, 2))
    assert quota.tolist() == [1, 1, 1, 0]
    # A grid smaller than the regions: 1x1 with (2,2). Boundaries
    # floor(i*1/2) = 0, 0, 1: band 0 is empty, band 1 holds the row/col.
    region, quota = region_quotas(1, 1, 1, (2, 2))
    assert region.tolist() == [3]
    assert quota.tolist() == [0, 0, 0, 1]


# --------------------------------------------------------------------------
# Section 3: the selection, against the reference
# --------------------------------------------------------------------------


def compare(scores: torch.Tensor, k: int, regions, fraction: float) -> None:
    h, w = scores.shape
    got = select_tokens(scores, k, regions=regions, global_fraction=fraction)
    check_output(got, h * w, k)
    expected = reference_select(scores.tolist(), k, regions=regions, global_fraction=fraction)
    assert got.tolist() == expected, (tuple(scores.shape), k, regions, fraction)


@pytest.mark.parametrize("kind", ["rand", "ties"])
@pytest.mark.parametrize(("h", "w"), SMALL_GRIDS)
def test_small_grids_every_k(h, w, kind):
    scores = make_scores(h, w, kind, seed=1000 * h + w)
    for regions in REGIONS:
        for fraction in FRACTIONS:
            for k in range(1, h * w + 1):
                compare(scores, k, regions, fraction)


@pytest.mark.parametrize("kind", ["rand", "ties"])
@pytest.mark.parametrize(("h", "w"), LARGE_GRIDS)
def test_large_grids_spread_of_k(h, w, kind):
    scores = make_scores(h, w, kind, seed=7 * h + w)
    for regions in REGIONS:
        for fraction in FRACTIONS:
            for k in spread_of_k(h * w):
                compare(scores, k, regions, fraction)


# LLaVA-NeXT's unpadded high-resolution grids: tall, wide and degenerate.
NEXT_GRIDS = ((48, 19), (24, 72), (72, 10), (13, 1), (1, 40))


@pytest.mark.parametrize(("h", "w"), NEXT_GRIDS)
def test_next_grids_against_reference(h, w):
    scores = make_scores(h, w, "ties", seed=h + 100 * w, batch=2)
    for r in (0.5, 0.25, 1 / 9):
        k = num_retained(h * w, r)
        for fraction in (0.0, 0.5, 1.0):
            got = select_tokens_batched(scores, k, global_fraction=fraction)
            assert got.is_contiguous() and got.shape == (2, k)
            for i in range(2):
                expected = reference_select(scores[i].tolist(), k, global_fraction=fraction)
                assert got[i].tolist() == expected, (h, w, k, fraction, i)


def test_llava_default_ratios_several_images():
    # The shipped configuration: 24x24, defaults, the table's budgets.
    for seed in range(8):
        scores = make_scores(24, 24, "rand", seed=seed)
        for r, k, *_ in SPEC_TABLE:
            assert num_retained(576, r) == k
            compare(scores, k, (2, 2), 0.5)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 9), (3, 3), (4, 4), (7, 13), (24, 24)])
def test_all_equal_scores(h, w):
    scores = make_scores(h, w, "equal", seed=0)
    for regions in REGIONS:
        for fraction in FRACTIONS:
            for k in sorted(
                k for k in {1, 2, 3, (h * w) // 2, h * w - 1, h * w} if 1 <= k <= h * w
            ):
                compare(scores, k, regions, fraction)


def test_grid_smaller_than_regions():
    one = torch.tensor([[0.7]])
    for regions in [(2, 2), (3, 3), (4, 2), (5, 1)]:
        for fraction in FRACTIONS:
            assert select_tokens(one, 1, regions=regions, global_fraction=fraction).tolist() == [0]
    # 2x3 with (4, 4): every region band has at most one row/column.
    scores = make_scores(2, 3, "rand", seed=3)
    for fraction in FRACTIONS:
        for k in range(1, 7):
            compare(scores, k, (4, 4), fraction)


def test_half_precision_scores():
    # fp16/bf16 scores are exactly representable in float32 and in Python
    # floats, so the ranking must be the same as on their exact values.
    for dtype in (torch.float16, torch.bfloat16):
        scores = make_scores(24, 24, "rand", seed=11).to(dtype)
        for k in (64, 128, 288):
            got = select_tokens(scores, k)
            assert got.tolist() == reference_select(scores.float().tolist(), k)


def test_float64_scores_ranked_on_their_exact_values():
    # 1 + 1e-12 > 1, so token 1 ranks first; in float32 both are 1.0.
    scores = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    assert reference_select(scores.tolist(), 1) == [1]
    assert select_tokens(scores, 1).tolist() == [1]


# --------------------------------------------------------------------------
# Hand-worked cases (these check the reference as well)
# --------------------------------------------------------------------------

# 4x4 grid, flat index -> score:
#    0:15   1:14   2: 1   3: 9
#    4:13   5:12   6: 2   7: 8
#    8: 3   9: 4  10: 0  11: 6
#   12: 5  13: 7  14:10  15:11
# Regions (2,2) are the quadrants R0={0,1,4,5}, R1={2,3,6,7},
# R2={8,9,12,13}, R3={10,11,14,15}; best of each: 0 (15), 3 (9), 13 (7),
# 15 (11).
HAND = torch.tensor(
    [
        [15.0, 14.0, 1.0, 9.0],
        [13.0, 12.0, 2.0, 8.0],
        [3.0, 4.0, 0.0, 6.0],
        [5.0, 7.0, 10.0, 11.0],
    ]
)


def test_hand_local_stage_short_of_winners_fills():
    # K = 8, a = 0.5: K_g = 4, quotas 4*4/16 = 1 each (exact) -> global keeps
    # {0, 3, 13, 15}. K_l = 4: w = 3 (w=4 gives 1 window, w=3 gives 2*2 = 4).
    # Windows: (0,0) rows 0-2 x cols 0-2: candidates 1,2,4,5,6,8,9,10
    #          -> winner 1 (14);
    #          (0,1) rows 0-2 x col 3: candidates 7 (8), 11 (6) -> winner 7;
    #          (1,0) row 3 x cols 0-2: candidates 12 (5), 14 (10) -> winner 14;
    #          (1,1) row 3 x col 3: only 15, already kept -> no winner.
    # 3 winners < K_l = 4: keep 1, 7, 14 and fill one more with the best
    # remaining candidate: among 2,4,5,6,8,9,10,11,12 that is 4 (13).
    # Result {0,1,3,4,7,13,14,15}. (Plain top-8 would take 5 instead of 13;
    # "best K_l candidates" would take 5 instead of 7.)
    expected = [0, 1, 3, 4, 7, 13, 14, 15]
    assert reference_select(HAND.tolist(), 8) == expected
    assert select_tokens(HAND, 8).tolist() == expected


def test_hand_largest_remainder_ties():
    # K = 6, a = 0.5: K_g = 3, K_l = 3. Quotas: 3*4/16 = 3/4 for every
    # quadrant -> floors 0, 3 left, all fractions tied -> lower region order:
    # quotas [1, 1, 1, 0]. Global keeps 0 (R0), 3 (R1), 13 (R2).
    # K_l = 3: w = 3 (4 windows). Winners: (0,0) -> 1 (14); (0,1) -> 7 (8);
    # (1,0) -> 14 (10) [13 is kept]; (1,1) -> 15 (11).
    # 4 winners >= 3: keep the best 3: 1 (14), 15 (11), 14 (10).
    # Result {0, 1, 3, 13, 14, 15}. (If the tie went to the higher regions,
    # quotas [0,1,1,1], the result would be {0, 3, 7, 13, 14, 15}.)
    expected = [0, 1, 3, 13, 14, 15]
    assert reference_select(HAND.tolist(), 6) == expected
    assert select_tokens(HAND, 6).tolist() == expected


def test_hand_global_only_and_local_only():
    # a = 1: K_g = K = 4, K_l = 0 (local stage skipped): one per quadrant.
    assert select_tokens(HAND, 4, global_fraction=1.0).tolist() == [0, 3, 13, 15]
    # a = 0: K_g = 0, K_l = 4, w = 3; no token kept yet, so the winners are
    # (0,0) -> 0 (15); (0,1) -> 3 (9); (1,0) -> 14 (10); (1,1) -> 15 (11).
    assert select_tokens(HAND, 4, global_fraction=0.0).tolist() == [0, 3, 14, 15]
    # a = 0, K_l = 1: w = 4, one window, the best token overall.
    assert select_tokens(HAND, 1, global_fraction=0.0).tolist() == [0]
    # a = 0.5, K = 1: K_g = floor(0.5) = 0, K_l = 1 -> the best token.
    assert select_tokens(HAND, 1).tolist() == [0]


def test_hand_all_equal_ties_go_to_lower_index():
    # All scores equal: ranking is by flat index. K = 6 on 4x4: quotas
    # [1, 1, 1, 0] (see above) -> global keeps the lowest index of R0, R1,
    # R2: 0, 2, 8. w = 3; winners = lowest candidate per window:
    # (0,0) -> 1; (0,1) -> 3; (1,0) -> 12; (1,1) -> 15. Best 3 of those by
    # index: 1, 3, 12. Result [0, 1, 2, 3, 8, 12].
    scores = torch.full((4, 4), 3.0)
    expected = [0, 1, 2, 3, 8, 12]
    assert reference_select(scores.tolist(), 6) == expected
    assert select_tokens(scores, 6).tolist() == expected


def test_hand_partial_ties_lower_index_wins():
    # 4x4, regions (1,1):
    #    0:1   1:1   2:1   3:2
    #    4:1   5:1   6:1   7:2
    #    8:1   9:1  10:1  11:0
    #   12:2  13:2  14:0  15:2
    # a = 0, K = K_l = 2: w = 3 (w=4 gives 1 window, w=3 gives 4). Winners:
    # (0,0) all 1 -> 0; (0,1) {3:2, 7:2, 11:0} -> 3; (1,0) {12:2, 13:2,
    # 14:0} -> 12; (1,1) -> 15. Winners by rank: 3, 12, 15 (score 2, by
    # index), then 0. Best 2: [3, 12].
    scores = torch.tensor(
        [
            [1.0, 1.0, 1.0, 2.0],
            [1.0, 1.0, 1.0, 2.0],
            [1.0, 1.0, 1.0, 0.0],
            [2.0, 2.0, 0.0, 2.0],
        ]
    )
    assert reference_select(scores.tolist(), 2, regions=(1, 1), global_fraction=0.0) == [3, 12]
    assert select_tokens(scores, 2, regions=(1, 1), global_fraction=0.0).tolist() == [
        3,
        12,
    ]
    # K = 4, a = 0: w = 3 still (4 windows); all 4 winners: [0, 3, 12, 15].
    assert select_tokens(scores, 4, regions=(1, 1), global_fraction=0.0).tolist() == [
        0,
        3,
        12,
        15,
    ]
    # a = 1 (global only, one region of 16): the 3 best-ranked tokens. Score
    # 2 holds 3, 7, 12, 13, 15; lower indices win the tie: [3, 7, 12].
    assert select_tokens(scores, 3, regions=(1, 1), global_fraction=1.0).tolist() == [
        3,
        7,
        12,
    ]


def test_hand_grid_1x40():
    # 1x40, K = 5, defaults. Row boundaries floor(i/2) = 0, 0, 1 (band 0
    # empty); columns 0, 20, 40. Region sizes [0, 0, 20, 20]; K_g = 2 ->
    # quotas [0, 0, 1, 1]. All scores equal -> global keeps 0 and 20.
    # K_l = 3: w = 19 (ceil(40/19) = 3 windows; w = 20 gives 2).
    # Windows cols [0,19), [19,38), [38,40): winners 1, 19, 38.
    scores = torch.zeros(1, 40)
    assert select_tokens(scores, 5).tolist() == [0, 1, 19, 20, 38]


def test_k_equals_n_and_k_one():
    for h, w in [(1, 1), (3, 3), (7, 13), (24, 24)]:
        n = h * w
        for kind in ("rand", "ties", "equal"):
            scores = make_scores(h, w, kind, seed=n)
            for regions in REGIONS:
                for fraction in FRACTIONS:
                    out = select_tokens(scores, n, regions=regions, global_fraction=fraction)
                    assert out.dtype == torch.long
                    assert torch.equal(out, torch.arange(n))
                    # K = 1: whatever a is, K_g is 0 or 1 and the single
                    # kept token is the best-ranked token overall.
                    best = min(range(n), key=lambda p: (-scores.flatten()[p].item(), p))
                    one = select_tokens(scores, 1, regions=regions, global_fraction=fraction)
                    if fraction == 1.0:
                        # K_g = 1 goes to the region with the largest share;
                        # the reference decides which.
                        assert one.tolist() == reference_select(
                            scores.tolist(),
                            1,
                            regions=regions,
                            global_fraction=fraction,
                        )
                    else:
                        assert one.tolist() == [best]


def test_authors_code_tokens_are_kept_at_r_half():
    # Spec, "Relation to the authors' released code": with K = 288, a = 0.5
    # the rule keeps every token their code keeps (top 25% of each 12x12
    # quadrant, then the best remaining token of each 2x2 window).
    for seed in range(5):
        scores = make_scores(24, 24, "rand", seed=100 + seed)
        flat = scores.flatten().tolist()

        def rank(p, flat=flat):
            return (-flat[p], p)

        theirs = set()
        for qr in range(2):
            for qc in range(2):
                quad = [
                    r * 24 + c
                    for r in range(12 * qr, 12 * qr + 12)
                    for c in range(12 * qc, 12 * qc + 12)
                ]
                theirs.update(sorted(quad, key=rank)[:36])
        for wr in range(12):
            for wc in range(12):
                window = [r * 24 + c for r in (2 * wr, 2 * wr + 1) for c in (2 * wc, 2 * wc + 1)]
                rest = [p for p in window if p not in theirs]
                if rest:
                    theirs.add(min(rest, key=rank))
        ours = set(select_tokens(scores, 288).tolist())
        assert len(ours) == 288
        assert theirs <= ours


# --------------------------------------------------------------------------
# Batched selection
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rand", "ties"])
def test_batched_equals_per_image(kind):
    b, h, w = 5, 7, 13
    scores = make_scores(h, w, kind, seed=5, batch=b)
    for regions in REGIONS:
        for fraction in FRACTIONS:
            for k in (1, 2, 10, 45, 46, 90, 91):
                got = select_tokens_batched(scores, k, regions=regions, global_fraction=fraction)
                assert got.dtype == torch.long
                assert got.shape == (b, k)
                for i in range(b):
                    single = select_tokens(scores[i], k, regions=regions, global_fraction=fraction)
                    assert torch.equal(got[i], single), (i, k, regions, fraction)


def test_batched_images_differ_independently():
    # Each row of the batch is selected on its own scores: a batch made of
    # the same image and its mirror gives the per-image results.
    base = make_scores(24, 24, "rand", seed=9)
    scores = torch.stack([base, base.flip(1), base.flip(0)])
    got = select_tokens_batched(scores, 128)
    for i in range(3):
        assert got[i].tolist() == reference_select(scores[i].tolist(), 128)
    assert not torch.equal(got[0], got[1])


def test_large_batch_64x64():
    # A 64x64 grid, B = 16 (4096 tokens per image): must run quickly enough
    # to be used per image batch; checked against the reference on two images.
    scores = make_scores(64, 64, "rand", seed=64, batch=16)
    k = num_retained(64 * 64, 0.25)
    got = select_tokens_batched(scores, k)
    assert got.shape == (16, k)
    for i in (0, 15):
        assert got[i].tolist() == reference_select(scores[i].tolist(), k)


# --------------------------------------------------------------------------
# Invalid inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_keep": 0},
        {"num_keep": -3},
        {"num_keep": 17},
        {"num_keep": 4, "global_fraction": 1.5},
        {"num_keep": 4, "global_fraction": -0.1},
        {"num_keep": 4, "global_fraction": float("nan")},
        {"num_keep": 4, "regions": (0, 2)},
        {"num_keep": 4, "regions": (2,)},
    ],
)
def test_select_tokens_invalid(kwargs):
    scores = make_scores(4, 4, "rand", seed=0)
    with pytest.raises(ValueError):
        select_tokens(scores, **kwargs)
    with pytest.raises(ValueError):
        select_tokens_batched(scores[None], **kwargs)


def test_select_tokens_wrong_rank_of_scores():
    with pytest.raises(ValueError):
        select_tokens(torch.rand(16), 4)
    with pytest.raises(ValueError):
        select_tokens_batched(torch.rand(4, 4), 4)


def test_reference_rejects_invalid():
    grid = [[0.0] * 4 for _ in range(4)]
    for k in (0, 17):
        with pytest.raises(ValueError):
            reference_select(grid, k)
    with pytest.raises(ValueError):
        reference_select(grid, 4, global_fraction=1.5)


# -- the uniform baseline (docs/spec.md section 6, docs/algorithm.md) -------------------

UNIFORM_CASES = [(24, 24, k) for k in (1, 2, 64, 144, 288, 575, 576)] + [
    (19, 48, 100),
    (48, 19, 100),
    (1, 40, 10),
    (13, 1, 13),
    (72, 1, 5),
    (3, 3, 7),
    (27, 27, 182),
    (81, 81, 1640),
]


@pytest.mark.parametrize(("h", "w", "k"), UNIFORM_CASES)
def test_uniform_tokens_are_k_distinct_sorted_and_on_the_grid(h, w, k):
    from hivtp_vllm.pruning import uniform_lattice, uniform_tokens

    kept = uniform_tokens(h, w, k)
    assert kept.shape == (k,) and kept.dtype == torch.long
    assert bool((kept[1:] > kept[:-1]).all()) and 0 <= int(kept.min()) and int(kept.max()) < h * w
    a, b = uniform_lattice(h, w, k)
    assert a * b >= k and 1 <= a <= h and 1 <= b <= w
    # Every kept token is a cell centre of the a x b split.
    centre_rows = {((2 * i + 1) * h) // (2 * a) for i in range(a)}
    centre_cols = {((2 * j + 1) * w) // (2 * b) for j in range(b)}
    assert {int(x) // w for x in kept} <= centre_rows
    assert {int(x) % w for x in kept} <= centre_cols


def test_uniform_tokens_hand_cases():
    from hivtp_vllm.pruning import uniform_tokens

    # 24 x 24, K = 144: a 12 x 12 split, centres at odd rows and columns.
    expected = [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]
    assert uniform_tokens(24, 24, 144).tolist() == expected
    assert uniform_tokens(24, 24, 576).tolist() == list(range(576))
    assert uniform_tokens(24, 24, 1).tolist() == [12 * 24 + 12]  # the centre
    assert uniform_tokens(1, 40, 4).tolist() == [5, 15, 25, 35]
    with pytest.raises(ValueError):
        uniform_tokens(24, 24, 577)


def test_uniform_tokens_spread_over_the_regions():
    from hivtp_vllm.pruning import region_quotas, uniform_tokens

    for h, w, k in [(24, 24, 144), (24, 24, 64), (48, 19, 200), (81, 81, 1640)]:
        region, _ = region_quotas(h, w, 0, (2, 2))
        counts = torch.bincount(region[uniform_tokens(h, w, k)], minlength=4).tolist()
        assert max(counts) - min(counts) <= max(2, k // 10), (h, w, k, counts)


def test_uniform_tokens_need_no_data():
    from hivtp_vllm.pruning import uniform_tokens

    out = uniform_tokens(48, 19, 228, device="meta")  # shapes only: no host sync possible
    assert out.shape == (228,) and out.device.type == "meta"
