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

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from hivtp_vllm.pruning import default_band

__all__ = [
    "received_attention",
    "mean_patch_scores",
    "ReceivedAttention",
    "PackedReceivedAttention",
    "check_band",
    "resolve_band",
]

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


def resolve_band(
    depth: int, run: int, layer_start: int | None = None, num_layers: int | None = None
) -> tuple[int, int]:
    """The band ``(start, count)`` of a tower of ``depth`` layers: section 1's
    defaults, replaced by the server's options where set, and checked
    against the ``run`` layers the tower actually runs (:func:`check_band`)."""
    start, count = default_band(depth)
    if layer_start is not None:
        start = layer_start
    if num_layers is not None:
        count = num_layers
    check_band(start, count, run)
    return start, count


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


def mean_patch_scores(
    total: torch.Tensor, num_layers: int, num_heads: int, cls_tokens: int = 1
) -> torch.Tensor:
    """The spec's score from summed received attention: ``[B, S]`` -> ``[B, S - cls]``.

    ``total`` is :func:`received_attention` added up over ``num_layers``
    layers of ``num_heads`` heads; dividing by layers x heads x queries
    (``S``) gives the mean, and the CLS column is dropped (CLIP:
    ``cls_tokens=1``; SigLIP has none, so every column is a patch). Shared
    by the server's recorder and ``hivtp-vllm explain`` so both score alike.
    """
    return total[:, cls_tokens:] / (num_layers * num_heads * total.shape[1])


class ReceivedAttention:
    """Collects :func:`received_attention` from attention modules in one forward.

    ``modules`` are the band's attention modules, each called as
    ``module(query, key, value, ...)``. ``num_heads`` is the number of heads
    each module holds locally (a tensor-parallel shard holds a part), and
    ``total_heads`` the model's full count, used for the mean. ``rows``
    restricts the work to the images that are pruned; ``reduce`` adds up the
    partial sums across shards (identity on one worker).

    vLLM's two ways of running the tower over tensor-parallel workers map to
    the two ways partial results are combined: sharded heads (vLLM's
    default, ``--mm-encoder-tp-mode weights``) give each worker a slice of
    every image's heads, added up by ``reduce``; a sharded batch
    (``--mm-encoder-tp-mode data``) gives each worker all heads of a slice of
    the images, concatenated by :meth:`sharded_batch`. Either way every
    worker ends with the scores one worker would compute.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        *,
        num_heads: int,
        total_heads: int,
        scale: float,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        span: Callable[[torch.device], AbstractContextManager] | None = None,
        cls_tokens: int = 1,
    ) -> None:
        self.modules = list(modules)
        self.num_heads = num_heads
        self.total_heads = total_heads
        self.scale = scale
        self.reduce = reduce
        self.cls_tokens = cls_tokens
        self._sum: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._recording = False
        # Times each hook's work (hivtp_vllm.timing.PruningTimer.span).
        self.span = span or (lambda device: nullcontext())

    def _hook(self, module: nn.Module, args: tuple) -> None:
        query, key = args[0], args[1]
        with self.span(query.device):
            if self._rows is not None:
                query, key = query[self._rows], key[self._rows]
            part = received_attention(query, key, self.num_heads, self.scale)
            self._sum = part if self._sum is None else self._sum + part

    @contextmanager
    def recording(self, rows: torch.Tensor | None = None) -> Iterator[ReceivedAttention]:
        """Listen to the band's modules for the duration of one tower forward."""
        self._sum, self._rows = None, rows
        with self._listening(with_kwargs=False):
            yield self

    @contextmanager
    def _listening(self, *, with_kwargs: bool) -> Iterator[None]:
        """:meth:`_hook` on the band's modules, for one forward."""
        handles = [
            m.register_forward_pre_hook(self._hook, with_kwargs=with_kwargs) for m in self.modules
        ]
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            for handle in handles:
                handle.remove()

    @contextmanager
    def sharded_batch(
        self, gather: Callable[[torch.Tensor], torch.Tensor], total: int
    ) -> Iterator[None]:
        """The tower runs on this worker's slice of the batch, not all of it.

        For vLLM's data-parallel encoder: the batch (padded to a multiple of
        the workers) is split in equal consecutive slices, one per worker.
        Inside, every local row is scored (the recorded ``rows`` index the
        whole batch, not the slice; scoring an unpruned image costs about 1%
        of its tower pass); on exit ``gather`` concatenates the workers'
        slices in order, the padding is cut to ``total`` rows and the
        recorded rows are kept. Outside a recording it does nothing, so the
        stock path can run through it. Every worker must enter it, as every
        worker runs the same forward.
        """
        if not self._recording:
            yield
            return
        rows, self._rows = self._rows, None
        try:
            yield
        finally:
            self._rows = rows
        if self._sum is not None:
            full = gather(self._sum)[:total]
            self._sum = full if rows is None else full[rows.to(full.device)]

    def patch_scores(self) -> torch.Tensor:
        """Mean received attention per patch, ``[B, S - cls_tokens]`` (CLS dropped)."""
        if self._sum is None:
            raise RuntimeError("no attention was recorded: the band's layers did not run")
        total = self._sum if self.reduce is None else self.reduce(self._sum)
        return mean_patch_scores(total, len(self.modules), self.total_heads, self.cls_tokens)


class PackedReceivedAttention(ReceivedAttention):
    """:class:`ReceivedAttention` for towers that pack images into one sequence.

    Qwen-VL's vision tower runs every image of a batch as one sequence of
    patches and attends within each image's segment only (``cu_seqlens``).
    Its attention modules are called with keywords, ``query`` and ``key``
    ``[1, S, heads, head_dim]`` after the rotary embedding. Each image is
    scored over its own segment (docs/spec.md section 5): softmax within the
    segment, sums over its queries. The segments come from the image grids
    (``lengths``), not from the ``cu_seqlens`` the module gets, whose layout
    depends on vLLM's attention backend. The result is one score per
    sequence position, in the tower's own order (Qwen2.5-VL permutes patches
    by window inside each image); undoing that order is the model's job.
    """

    def __init__(self, modules: Sequence[nn.Module], **kwargs) -> None:
        super().__init__(modules, cls_tokens=0, **kwargs)
        self._segments: list[tuple[int, int]] = []
        self._length = 0

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:  # type: ignore[override]
        query, key = kwargs["query"], kwargs["key"]
        with self.span(query.device):
            part = torch.zeros(self._length, dtype=torch.float32, device=query.device)
            for lo, hi in self._segments:  # per image, not per token
                q = query[0, lo:hi].reshape(1, hi - lo, -1)
                k = key[0, lo:hi].reshape(1, hi - lo, -1)
                part[lo:hi] = received_attention(q, k, self.num_heads, self.scale)[0]
            self._sum = part if self._sum is None else self._sum + part

    @contextmanager
    def recording_segments(
        self, lengths: Sequence[int], scored: Sequence[int]
    ) -> Iterator[PackedReceivedAttention]:
        """Listen for one tower forward over images of ``lengths`` patches
        each, in order; only the images at indices ``scored`` are scored."""
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + int(n))
        self._segments = [(bounds[i], bounds[i + 1]) for i in scored]
        self._length = bounds[-1]
        self._sum = None
        with self._listening(with_kwargs=True):
            yield self

    def position_scores(self, lengths: Sequence[int]) -> torch.Tensor:
        """Mean received attention per sequence position, ``[S]``: each
        image's sum over layers, heads and its own queries, divided by their
        number. Positions of images not scored are 0."""
        if self._sum is None:
            raise RuntimeError("no attention was recorded: the band's layers did not run")
        total = self._sum if self.reduce is None else self.reduce(self._sum)
        queries = torch.cat([torch.full((int(n),), float(n), device=total.device) for n in lengths])
        return total / (len(self.modules) * self.total_heads * queries)
