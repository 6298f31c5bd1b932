"""Plain-Python reference for sections 2 and 3 of the HIVTP spec (docs/spec.md).

Written straight from /work/shared/hivtp-spec.md ("HIVTP, as hivtp-vllm
implements it"), deliberately with lists and loops only, so that each line can
be checked against the spec's words by eye. It imports nothing from
``hivtp_vllm`` and nothing from torch: it is the independent oracle that
``tests/test_pruning.py`` compares the vectorized implementation with.

Exact arithmetic (integers and ``fractions.Fraction``) is used wherever the
spec defines a quantity by a formula that is exact (bands, quotas,
remainders, window counts). The two formulas that the spec writes with a
real-valued factor, ``floor(r * N + 0.5)`` and ``floor(a * K)``, are evaluated
literally on Python floats (IEEE double), as written.
"""

from __future__ import annotations

import math
from fractions import Fraction


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers a >= 0, b >= 1."""
    return (a + b - 1) // b


# --------------------------------------------------------------------------
# Section 2. Retained count
# --------------------------------------------------------------------------


def reference_num_retained(N: int, r: float) -> int:
    """K = max(1, min(N, floor(r * N + 0.5))) for r in (0, 1]."""
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    # "For a retain ratio r in (0, 1]". NaN fails both comparisons.
    if not (0 < r <= 1):
        raise ValueError(f"r must be in (0, 1], got {r!r}")
    return max(1, min(N, math.floor(r * N + 0.5)))


# --------------------------------------------------------------------------
# Section 3. Exact-budget hierarchical selection
# --------------------------------------------------------------------------


def reference_counts(K: int, global_fraction: float) -> tuple[int, int]:
    """(K_g, K_l): K_g = floor(a * K), K_l = K - K_g."""
    K_g = math.floor(global_fraction * K)
    return K_g, K - K_g


def reference_window_size(H: int, W: int, K_l: int) -> int:
    """The largest integer w >= 1 with ceil(H / w) * ceil(W / w) >= K_l.

    w never exceeds max(H, W), so try every w from 1 to max(H, W) and keep
    the largest one that satisfies the condition.
    """
    best = None
    for w in range(1, max(H, W) + 1):
        if ceil_div(H, w) * ceil_div(W, w) >= K_l:
            best = w
    if best is None:
        raise ValueError(f"no window size gives {K_l} windows on a {H}x{W} grid")
    return best


def reference_regions(H: int, W: int, regions: tuple[int, int]) -> list[list[int]]:
    """Flat indices of the tokens of each region, regions in row-major order.

    Row bands: boundaries floor(i * H / Rh) for i = 0..Rh; column bands
    likewise with W and Rw. Region (i, j) is row band i x column band j.
    """
    Rh, Rw = regions
    row_bounds = [(i * H) // Rh for i in range(Rh + 1)]
    col_bounds = [(j * W) // Rw for j in range(Rw + 1)]
    out = []
    for i in range(Rh):
        for j in range(Rw):
            tokens = []
            for row in range(row_bounds[i], row_bounds[i + 1]):
                for col in range(col_bounds[j], col_bounds[j + 1]):
                    tokens.append(row * W + col)
            out.append(tokens)
    return out


def reference_quotas(sizes: list[int], K_g: int) -> list[int]:
    """Largest-remainder apportionment of K_g over regions of sizes n_t.

    q_t = floor(K_g * n_t / N); the remaining K_g - sum(q_t) go one each to
    the regions with the largest fractional part K_g * n_t / N - q_t
    (ties: lower region order).
    """
    N = sum(sizes)
    exact = [Fraction(K_g * n_t, N) for n_t in sizes]
    quotas = [math.floor(x) for x in exact]
    fractional = [exact[t] - quotas[t] for t in range(len(sizes))]
    remaining = K_g - sum(quotas)
    # Largest fractional part first; equal fractional parts: lower t first.
    order = sorted(range(len(sizes)), key=lambda t: (-fractional[t], t))
    for t in order[:remaining]:
        quotas[t] += 1
    return quotas


def reference_select(
    scores: list[list[float]],
    K: int,
    regions: tuple[int, int] = (2, 2),
    global_fraction: float = 0.5,
) -> list[int]:
    """The K kept flat indices (row * W + col), ascending."""
    H = len(scores)
    W = len(scores[0])
    N = H * W
    if not (1 <= K <= N):
        raise ValueError(f"K must be in [1, {N}], got {K}")
    if not (0 <= global_fraction <= 1):
        raise ValueError(f"global fraction must be in [0, 1], got {global_fraction!r}")
    if len(regions) != 2 or regions[0] < 1 or regions[1] < 1:
        raise ValueError(f"regions must be two integers >= 1, got {regions!r}")

    flat = [scores[row][col] for row in range(H) for col in range(W)]

    # "Ranking everywhere: higher score first; equal scores: lower flat index
    # first." rank_key(p) < rank_key(q) means p is ranked before q.
    def rank_key(p: int) -> tuple[float, int]:
        return (-flat[p], p)

    def best_ranked(tokens: list[int]) -> list[int]:
        return sorted(tokens, key=rank_key)

    kept: set[int] = set()

    # ---- Global stage ----------------------------------------------------
    K_g, K_l = reference_counts(K, global_fraction)
    region_tokens = reference_regions(H, W, regions)
    quotas = reference_quotas([len(t) for t in region_tokens], K_g)
    for tokens, q_t in zip(region_tokens, quotas, strict=True):
        # "In each region keep its q_t best-ranked tokens."
        for p in best_ranked(tokens)[:q_t]:
            kept.add(p)

    # ---- Local stage -----------------------------------------------------
    # Candidates: the tokens the global stage did not keep.
    candidates = [p for p in range(N) if p not in kept]
    if K_l > 0:
        w = reference_window_size(H, W, K_l)
        winners = []
        for i in range(ceil_div(H, w)):
            for j in range(ceil_div(W, w)):
                # Window (i, j): rows [i*w, min((i+1)*w, H)),
                # columns [j*w, min((j+1)*w, W)).
                in_window = []
                for row in range(i * w, min((i + 1) * w, H)):
                    for col in range(j * w, min((j + 1) * w, W)):
                        p = row * W + col
                        if p not in kept:
                            in_window.append(p)
                # A window with at least one candidate has one winner: its
                # best-ranked candidate.
                if in_window:
                    winners.append(best_ranked(in_window)[0])
        if len(winners) >= K_l:
            # Keep the K_l best-ranked winners.
            local = best_ranked(winners)[:K_l]
        else:
            # Keep all winners and fill up to K_l with the best-ranked
            # candidates not yet kept.
            winner_set = set(winners)
            others = [p for p in candidates if p not in winner_set]
            local = winners + best_ranked(others)[: K_l - len(winners)]
        for p in local:
            kept.add(p)

    result = sorted(kept)
    assert len(result) == K
    return result
