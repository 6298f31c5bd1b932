"""HIVTP token counts and exact-budget hierarchical selection (torch only).

This module is the specification (docs/algorithm.md, shared hivtp-spec.md)
turned into code. It imports nothing from vLLM so it can be read, tested and
reused on its own: the multimodal processor calls :func:`num_retained` to
reserve exactly the right number of placeholder tokens before any image is
encoded, and the model calls :func:`select_tokens` (or the batched
:func:`select_tokens_batched`) to pick exactly that many.

All ranking is done on integer ranks ("higher score first, lower flat index
first on ties"), computed once with a stable sort. That makes every later
comparison exact and tie-free, which is what lets two implementations of the
spec agree token for token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "default_band",
    "windowed_band",
    "num_retained",
    "check_num_tokens",
    "window_size",
    "region_quotas",
    "apportion",
    "budget_range",
    "split_budget",
    "select_tokens",
    "select_tokens_batched",
    "uniform_lattice",
    "uniform_tokens",
]


def default_band(num_layers: int) -> tuple[int, int]:
    """Return the middle band ``(m, q)`` of layers that scores are read from.

    ``m = floor(L/4 + 1/2)`` and ``q = max(1, floor(L/8 + 1/2))``, written in
    integer arithmetic so no float rounding can move a boundary. For CLIP-L
    (24 layers) this is ``(6, 3)``, the layers the authors' code uses.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return (num_layers + 2) // 4, max(1, (num_layers + 4) // 8)


def windowed_band(start: int, count: int, full_layers: Sequence[int]) -> tuple[int, ...]:
    """The band of a tower that attends globally only in ``full_layers``.

    Spec section 5 (Qwen2.5-VL): windowed layers spread each query over its
    own window only, so what a token receives there cannot be compared
    across windows. The band is the full-attention layers in
    ``[start, start + count)``; if there is none, the one nearest to
    ``start`` (ties: the lower). Qwen2.5-VL-7B (full attention at 7, 15, 23,
    31; band (8, 4)): layer 7.
    """
    if not full_layers:
        raise ValueError("full_layers must name at least one layer")
    inside = tuple(i for i in sorted(full_layers) if start <= i < start + count)
    if inside:
        return inside
    return (min(sorted(full_layers), key=lambda i: abs(i - start)),)


def num_retained(num_tokens: int, retain_ratio: float) -> int:
    """Number of tokens kept out of ``num_tokens`` at ``retain_ratio``.

    ``K = max(1, min(N, floor(r * N + 0.5)))``: round half up, never zero
    (an image always leaves a trace) and never more than N. A view with no
    tokens (``N = 0``: the unpadded grid of an image with an extreme aspect
    ratio can have no rows or no columns) keeps none: docs/spec.md section 2.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if not (isinstance(retain_ratio, (int, float)) and 0.0 < retain_ratio <= 1.0):
        raise ValueError(f"retain_ratio must be in (0, 1], got {retain_ratio!r}")
    if num_tokens == 0:
        return 0
    return max(1, min(num_tokens, math.floor(retain_ratio * num_tokens + 0.5)))


def check_num_tokens(num_tokens: int, num_keep: int) -> int:
    """Validate an absolute budget ``1 <= k <= N`` and return it."""
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [1, {num_tokens}], got {num_keep}")
    return num_keep


def window_size(height: int, width: int, num_local: int) -> int:
    """Largest window side ``w`` with ``ceil(H/w) * ceil(W/w) >= num_local``.

    The window count only falls as ``w`` grows, so the first ``w`` from the
    top that has enough windows is the answer; this loop is over candidate
    sizes (at most ``max(H, W)``), never over tokens, and runs on host ints
    only, so a traced selection sees it as a constant.
    """
    for w in range(max(height, width), 0, -1):
        if (-(-height // w)) * (-(-width // w)) >= num_local:
            return w
    return 1


def apportion(total: int, sizes: torch.Tensor) -> torch.Tensor:
    """Largest-remainder split of ``total`` over parts in proportion to ``sizes``.

    Each part gets ``floor(total * n_t / N)``; what is left goes one each to
    the parts with the largest remainder, ties to the lower index (a stable
    descending sort keeps index order among equals).
    """
    n = int(sizes.sum())
    scaled = total * sizes
    share = scaled // n
    left = total - int(share.sum())
    if left > 0:
        order = torch.sort(scaled % n, descending=True, stable=True).indices
        share[order[:left]] += 1
    return share


def budget_range(sizes: Sequence[int]) -> tuple[int, int]:
    """Smallest and largest budget one image with views of ``sizes`` takes.

    Every view with tokens keeps at least one; a view with none keeps none
    (docs/spec.md section 2), so an image whose high-resolution grid is empty takes
    budgets from 1.
    """
    return sum(1 for n in sizes if n > 0), sum(sizes)


def split_budget(num_keep: int, sizes: Sequence[int]) -> list[int]:
    """Split one image's budget over its views (LLaVA-NeXT: base view, high-res grid).

    :func:`apportion` in proportion to the views' token counts; a view with
    tokens left with nothing then takes one token from the largest share
    (ties: the lower view), so every such view keeps at least one token. An
    empty view gets nothing, so the whole budget goes to the others. Needs
    ``num_keep`` inside :func:`budget_range`.
    """
    low, high = budget_range(sizes)
    if not max(low, 1) <= num_keep <= high:
        raise ValueError(f"num_keep must be in [{low}, {high}], got {num_keep}")
    share = apportion(num_keep, torch.tensor(sizes)).tolist()
    for view, got in enumerate(share):
        if got == 0 and sizes[view] > 0:
            donor = max(range(len(share)), key=lambda v: (share[v], -v))
            share[donor] -= 1
            share[view] = 1
    return share


def _band_bounds(size: int, parts: int, device: torch.device | None = None) -> torch.Tensor:
    """Band boundaries ``floor(i*size/parts)`` for ``i = 0..parts``.

    Built with ``arange`` on the target device, never copied from the host:
    a host-to-device copy of pageable memory would make the host wait for
    every kernel already queued (the encoder's), which selection must not do.
    """
    return (torch.arange(parts + 1, device=device) * size) // parts


def _bands(size: int, parts: int, device: torch.device | None = None) -> torch.Tensor:
    """Band index of each of ``size`` rows: boundaries ``floor(i*size/parts)``."""
    idx = torch.arange(size, device=device)
    # Row x lies in band i iff floor(i*S/P) <= x < floor((i+1)*S/P), which is
    # the count of boundaries i >= 1 that are <= x.
    bounds = _band_bounds(size, parts, device)[1:-1]
    return (idx[:, None] >= bounds[None, :]).sum(dim=1)


def _region_layout(
    height: int, width: int, regions: tuple[int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region of each flat token ``[N]`` and size of each region ``[Rh*Rw]``.

    Sizes come from band widths rather than ``bincount``, whose output length
    depends on the data and so cannot be traced as a static shape.
    """
    rh, rw = regions
    region = _bands(height, rh, device)[:, None] * rw + _bands(width, rw, device)[None, :]
    rows = torch.diff(_band_bounds(height, rh, device))
    cols = torch.diff(_band_bounds(width, rw, device))
    return region.reshape(-1), (rows[:, None] * cols[None, :]).reshape(-1)


def _largest_remainder(total: int, sizes: torch.Tensor, whole: int) -> torch.Tensor:
    """:func:`apportion` of ``total`` over ``sizes`` (summing to ``whole``), on device.

    Same rule, but the count of leftover units stays a device scalar and the
    "+1" goes to every part whose place in the remainder order is below it,
    so no value is read back to the host and no shape depends on data.
    """
    scaled = total * sizes
    share = scaled // whole
    left = total - share.sum()
    order = torch.sort(scaled % whole, descending=True, stable=True).indices
    place = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    return share + (place < left).long()


def region_quotas(
    height: int,
    width: int,
    num_global: int,
    regions: tuple[int, int],
    *,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region of each flat token and the global-stage quota of each region.

    Quotas are the largest-remainder apportionment of ``K_g`` over regions in
    proportion to their sizes, ties going to the lower region (row-major).
    Returns ``(region_of_token [N], quota [Rh*Rw])``, built on ``device`` so
    that selection can use them without a host round trip.
    """
    region, sizes = _region_layout(height, width, regions, device)
    return region, _largest_remainder(num_global, sizes, height * width)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each token per row: 0 is best (highest score, then lowest index)."""
    # float64 stays float64 so no two distinct scores collapse into a tie.
    flat = scores if scores.dtype == torch.float64 else scores.float()
    # NaN ranks last (as -inf, then by index) instead of poisoning the sort.
    flat = flat.nan_to_num(nan=-math.inf)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _check_params(
    height: int, width: int, num_keep: int, regions: Sequence[int], global_fraction: float
) -> tuple[int, int]:
    """Validate on host ints and floats only, before any tensor work.

    Every check reads Python values, never a tensor, so a traced selection
    turns them into constants instead of guards on device data.
    """
    check_num_tokens(height * width, num_keep)
    if len(regions) != 2 or min(regions) < 1:
        raise ValueError(f"regions must be two integers >= 1, got {tuple(regions)!r}")
    if not 0.0 <= global_fraction <= 1.0:
        raise ValueError(f"global_fraction must be in [0, 1], got {global_fraction!r}")
    return int(regions[0]), int(regions[1])


def select_tokens_batched(
    scores: torch.Tensor,
    num_keep: int,
    *,
    regions: Sequence[int] = (2, 2),
    global_fraction: float = 0.5,
) -> torch.Tensor:
    """HIVTP selection for ``B`` images that share a grid and a budget.

    ``scores`` is ``[B, H, W]``; returns ``LongTensor [B, num_keep]`` of
    ascending flat indices (raster order). Every step is a tensor operation
    over the whole batch: one stable sort for the ranks, one sort for the
    per-region best tokens, one ``scatter_reduce`` for the window winners, one
    ``topk`` for the local pick and one sort for the output order.

    Nothing computed from ``scores`` goes back to the host and every shape
    is fixed by ``B, H, W, num_keep`` alone, so on a GPU the call only queues
    kernels (the host never waits for the encoder) and the function traces
    into one static graph (tests/test_select_compile.py).
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, W], got shape {tuple(scores.shape)}")
    b, h, w = scores.shape
    n = h * w
    rh, rw = _check_params(h, w, num_keep, regions, global_fraction)
    device = scores.device
    positions = torch.arange(n, device=device)
    if num_keep == n:
        return positions.expand(b, n).clone()

    ranks = _ranks(scores.reshape(b, n))
    num_global = math.floor(global_fraction * num_keep)
    num_local = num_keep - num_global
    kept = torch.zeros(b, n, dtype=torch.bool, device=device)

    if num_global > 0:
        # Global stage: in each region, the quota's best-ranked tokens. Sorted
        # by (region, rank), a token is kept when its place within its region's
        # run is below the region's quota.
        region, sizes = _region_layout(h, w, (rh, rw), device)
        quota = _largest_remainder(num_global, sizes, n)
        starts = torch.cumsum(sizes, 0) - sizes
        sorted_key, order = torch.sort(region[None, :] * n + ranks, dim=1)
        sorted_region = sorted_key // n
        in_quota = positions[None, :] - starts[sorted_region] < quota[sorted_region]
        kept.scatter_(1, order, in_quota)

    if num_local > 0:
        # Local stage: one winner per window among the candidates, then the
        # best winners; short of winners, the best remaining candidates.
        side = window_size(h, w, num_local)
        cols = -(-w // side)
        rows_idx = torch.arange(h, device=device) // side
        cols_idx = torch.arange(w, device=device) // side
        window = (rows_idx[:, None] * cols + cols_idx[None, :]).reshape(-1).expand(b, n)
        num_windows = (-(-h // side)) * cols
        cand_rank = torch.where(kept, n, ranks)
        best = torch.full((b, num_windows), n, dtype=ranks.dtype, device=device)
        best.scatter_reduce_(1, window, cand_rank, reduce="amin")
        winner = (~kept) & (cand_rank == best.gather(1, window))
        # One key orders everything: winners by rank, then other candidates
        # by rank, then the tokens already kept (never picked here).
        key = ranks + n * (~winner).long() + 2 * n * kept.long()
        local = torch.topk(key, num_local, dim=1, largest=False).indices
        kept.scatter_(1, local, True)

    # Kept tokens first, each group in index order: the first num_keep of
    # this sort are exactly kept.nonzero(), with a shape known in advance.
    order_key = torch.where(kept, positions, positions + n)
    return torch.sort(order_key, dim=1).values[:, :num_keep].contiguous()


def select_tokens(
    scores: torch.Tensor,
    num_keep: int,
    *,
    regions: Sequence[int] = (2, 2),
    global_fraction: float = 0.5,
) -> torch.Tensor:
    """HIVTP selection for one image.

    ``scores`` is a float tensor ``[H, W]``; returns ``LongTensor [num_keep]``
    with the kept flat indices (``row * W + col``) in ascending order.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [H, W], got shape {tuple(scores.shape)}")
    return select_tokens_batched(
        scores[None], num_keep, regions=regions, global_fraction=global_fraction
    )[0]


def uniform_lattice(height: int, width: int, num_keep: int) -> tuple[int, int]:
    """Cells ``(a, b)`` of the uniform baseline's split: ``a * b >= K``, near square cells.

    ``a = clamp(isqrt(floor(K * H / W)), 1, H)`` rows of cells and
    ``b = ceil(K / a)`` columns; if that is more columns than the grid has,
    ``b = W`` and ``a = ceil(K / W)`` (at most H, since ``K <= H * W``).
    Integer arithmetic only, so every implementation gets the same split.
    """
    rows = min(height, max(1, math.isqrt(num_keep * height // width)))
    cols = -(-num_keep // rows)
    if cols > width:
        cols, rows = width, -(-num_keep // width)
    return rows, cols


def uniform_tokens(
    height: int, width: int, num_keep: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The uniform baseline (docs/spec.md section 6): K tokens spread evenly, no scores.

    The grid is split into ``a x b`` cells (:func:`uniform_lattice`); the
    token nearest each cell's centre is row ``floor((2i + 1) H / (2a))`` and
    column ``floor((2j + 1) W / (2b))``, distinct because ``a <= H`` and
    ``b <= W``. Of the ``a * b`` centres, in raster order, the ones at
    positions ``floor(t * a * b / K)`` for ``t = 0 .. K - 1`` are kept, so the
    ``a * b - K`` left out are spread over the grid too. Returns the K flat
    indices in ascending (raster) order; every size is known on the host, so
    nothing waits on the device.
    """
    check_num_tokens(height * width, num_keep)
    a, b = uniform_lattice(height, width, num_keep)
    t = torch.arange(num_keep, device=device)
    cell = t * (a * b) // num_keep
    i, j = cell // b, cell % b
    rows = ((2 * i + 1) * height) // (2 * a)
    cols = ((2 * j + 1) * width) // (2 * b)
    return rows * width + cols
