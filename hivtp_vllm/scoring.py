"""Importance of each patch: the attention it receives in the middle layers.

Torch only. The score of patch ``p`` is the softmax attention that sequence
position ``p + 1`` receives, averaged over the layers of the middle band, all
heads and all queries (CLS included as a query, the CLS column dropped).

Serving must not run the vision tower twice, and vLLM's fused encoder
attention never materialises the probabilities. So :class:`ReceivedAttention`
listens to the query and key tensors that the band's attention modules are
called with (a forward pre-hook, a public torch extension point), and
recomputes only ``softmax(q k^T * scale)`` summed over queries. For a
24-layer CLIP-L at 336 px that is 3 extra ``QK^T`` products out of the 23
layers' work: well under 1% of the tower's FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["received_attention", "ReceivedAttention", "check_band"]

# Logit elements held at once, per device: on a CPU, query blocks that fit
# in cache run about twice as fast as one [B, heads, S, S] block; a GPU
# wants large blocks and has the memory for them.
_BLOCK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_BLOCK_ELEMENTS = 1 << 27


def check_band(start: int, count: int, num_run_layers: int) -> None:
    """Refuse a band that reaches past the layers the tower actually runs."""
    if start < 0 or count < 1 or start + count > num_run_layers:
        raise ValueError(
            f"hivtp_layer_start={start}, hivtp_num_layers={count}: the band "
            f"[{start}, {start + count}) must lie inside the {num_run_layers} "
            f"layers the vision tower runs (start >= 0, count >= 1, "
            f"start + count <= {num_run_layers})"
        )


def received_attention(
    query: torch.Tensor, key: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """Attention received by each key position, summed over heads and queries.

    ``query`` and ``key`` are ``[B, S, num_heads * head_dim]`` as the
    attention module gets them. Returns float32 ``[B, S]``. Summing (not
    averaging) lets partial results from tensor-parallel shards or several
    layers be added before one final division.

    Per block of queries: logits, a max-subtracted ``exp`` in place, and the
    column sum of the row-normalised probabilities as one batched
    vector-matrix product (``(1/Z)^T E``), so the normalised probability
    matrix is never written out.
    """
    b, s, _ = query.shape
    bh = b * num_heads
    q = query.reshape(b, s, num_heads, -1).transpose(1, 2).reshape(bh, s, -1).float() * scale
    k_t = key.reshape(b, s, num_heads, -1).permute(0, 2, 3, 1).reshape(bh, -1, s).float()
    budget = _BLOCK_ELEMENTS.get(query.device.type, _DEFAULT_BLOCK_ELEMENTS)
    rows = min(s, max(16, budget // (bh * s)))
    received = torch.zeros(bh, 1, s, dtype=torch.float32, device=query.device)
    for lo in range(0, s, rows):  # blocks of queries, not single tokens
        e = torch.bmm(q[:, lo : lo + rows], k_t)
        e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
        inv_z = e.sum(dim=-1, keepdim=True).reciprocal_()
        received.baddbmm_(inv_z.transpose(1, 2), e)
    return received.reshape(b, num_heads, s).sum(dim=1)


class ReceivedAttention:
    """Collects :func:`received_attention` from attention modules in one forward.

    ``modules`` are the band's attention modules, each called as
    ``module(query, key, value, ...)``. ``num_heads`` is the number of heads
    each module holds locally (a tensor-parallel shard holds a part), and
    ``total_heads`` the model's full count, used for the mean. ``rows``
    restricts the work to the images that are pruned; ``reduce`` adds up the
    partial sums across shards (identity on one worker).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        *,
        num_heads: int,
        total_heads: int,
        scale: float,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.modules = list(modules)
        self.num_heads = num_heads
        self.total_heads = total_heads
        self.scale = scale
        self.reduce = reduce
        self._sum: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self.seconds = 0.0  # host time spent scoring in the last recording

    def _hook(self, module: nn.Module, args: tuple) -> None:
        start = time.perf_counter()
        query, key = args[0], args[1]
        if self._rows is not None:
            query, key = query[self._rows], key[self._rows]
        part = received_attention(query, key, self.num_heads, self.scale)
        self._sum = part if self._sum is None else self._sum + part
        self.seconds += time.perf_counter() - start

    @contextmanager
    def recording(self, rows: torch.Tensor | None = None) -> Iterator[ReceivedAttention]:
        """Listen to the band's modules for the duration of one tower forward."""
        self._sum, self._rows, self.seconds = None, rows, 0.0
        handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def patch_scores(self) -> torch.Tensor:
        """Mean received attention per patch, ``[B, S - 1]`` (CLS dropped)."""
        if self._sum is None:
            raise RuntimeError("no attention was recorded: the band's layers did not run")
        total = self._sum if self.reduce is None else self.reduce(self._sum)
        seq = total.shape[1]
        return total[:, 1:] / (len(self.modules) * self.total_heads * seq)
