"""Selection is shape-static and never reads device data back to the host.

On a GPU, any ``nonzero``, ``.item()``, ``.tolist()`` or boolean-mask index
in :func:`hivtp_vllm.pruning.select_tokens_batched` makes the host wait for
every kernel queued before it (the whole encoder), once per image batch.
These tests catch such an op on a CPU-only machine by tracing the function
with TorchDynamo: ``fullgraph=True`` turns a graph break into an error, and
``dynamic=False`` makes every shape a constant.

``fullgraph=True`` alone is not enough on recent torch (2.13 here): rather
than break the graph, it captures ``nonzero`` or ``.item()`` as an "unbacked"
symbolic size or value. So the backend below is the eager backend plus one
check: no node of the graph may carry a symbolic shape or value. With
``dynamic=False`` only data can create one, so a symbol means a
data-dependent op. The sanity tests prove that this check fails where it
must, so a green run means something.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_symbols

from hivtp_vllm.pruning import num_retained, select_tokens_batched

# (H, W, K): LLaVA-1.5's 24x24 grid at the budgets the server sees (K = 575
# is N - 1: the local stage alone fills all but one token at a = 0), then
# LLaVA-NeXT-like unpadded high-resolution grids, tall, wide and degenerate.
GRIDS_24 = [(24, 24, k) for k in (288, 144, 64, 1, 575)]
GRIDS_NEXT = [
    (h, w, num_retained(h * w, r))
    for h, w in ((48, 19), (24, 72), (72, 10), (13, 1), (1, 40))
    for r in (0.5, 0.25)
]
CASES = [
    (b, h, w, k, a) for b in (1, 3) for h, w, k in GRIDS_24 + GRIDS_NEXT for a in (0.0, 0.5, 1.0)
]


def static_eager(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The eager backend, refusing any graph with a data-dependent size or value."""
    dependent = [
        node.format_node()
        for node in gm.graph.nodes
        if free_symbols(node.meta.get("example_value"))
    ]
    if dependent:
        raise AssertionError("data-dependent ops in the graph:\n" + "\n".join(dependent))
    return gm.forward


def compile_static(fn: Callable) -> Callable:
    # A fresh cache per configuration: dynamic=False recompiles for every
    # new (B, H, W, K), and past the recompile limit a fullgraph compile
    # fails for reasons that have nothing to do with the function.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=static_eager)


def scores_for(b: int, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * b + 100 * h + w)
    return torch.rand(b, h, w, generator=gen).to(dtype)


@pytest.mark.parametrize(
    ("b", "h", "w", "k", "a"), CASES, ids=[f"B{b}-{h}x{w}-K{k}-a{a}" for b, h, w, k, a in CASES]
)
def test_selection_traces_into_one_static_graph(b, h, w, k, a):
    scores = scores_for(b, h, w)
    got = compile_static(select_tokens_batched)(scores, k, global_fraction=a)
    expected = select_tokens_batched(scores, k, global_fraction=a)
    assert got.shape == (b, k) and got.dtype == torch.long
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("dtype", "regions"),
    [(torch.bfloat16, (2, 2)), (torch.float16, (3, 2)), (torch.float64, (1, 1))],
)
def test_other_dtypes_and_regions_trace_too(dtype, regions):
    # Scores may come in the encoder's dtype; regions are a server option.
    for h, w, k in [(24, 24, 144), (48, 19, 228)]:
        scores = scores_for(3, h, w, dtype)
        got = compile_static(select_tokens_batched)(scores, k, regions=regions)
        assert torch.equal(got, select_tokens_batched(scores, k, regions=regions))


def test_ties_and_nan_scores_trace_too():
    scores = torch.randint(0, 3, (3, 24, 24), generator=torch.Generator().manual_seed(3)).float()
    scores[0, 5:9, 2:7] = torch.nan
    got = compile_static(select_tokens_batched)(scores, 128)
    assert torch.equal(got, select_tokens_batched(scores, 128))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return x.nonzero()


def _item(x: torch.Tensor) -> torch.Tensor:
    return x[: 1 + int(x.argmax().item())]


def _mask_index(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0.5]


def _branch_on_data(x: torch.Tensor) -> torch.Tensor:
    return x + 1 if int(x.sum()) > 2 else x - 1


def _tolist(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.tolist()) * 2


@pytest.mark.parametrize("fn", [_nonzero, _item, _mask_index, _branch_on_data, _tolist])
def test_a_data_dependent_op_fails_the_same_compile(fn):
    # The check must be able to fail: each of these reads device data on the
    # host (or has a shape that depends on it) and must be refused.
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        compile_static(fn)(torch.rand(6))


def test_static_ops_pass_the_same_compile():
    # ...and the refusal is about data dependence, not about compiling at all.
    def static(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(torch.where(x > 0.5, 0, 1), stable=True).indices[:3]

    x = torch.rand(6)
    assert torch.equal(compile_static(static)(x), static(x))


def test_runs_on_the_meta_device():
    # A second witness, independent of dynamo: meta tensors have shapes but
    # no data, so any op that needs the data (nonzero, .item(), bincount)
    # raises; every output shape follows from (B, H, W, K) alone.
    for b, h, w, k in [(3, 24, 24, 144), (1, 72, 10, 180), (2, 1, 40, 10), (2, 13, 1, 13)]:
        for a in (0.0, 0.5, 1.0):
            out = select_tokens_batched(torch.empty(b, h, w, device="meta"), k, global_fraction=a)
            assert out.shape == (b, k) and out.dtype == torch.long and out.device.type == "meta"


def teardown_module() -> None:
    torch._dynamo.reset()
