"""The processor-to-model contract: what each image carries from one to the other.

vLLM lays out the prompt, and so the KV cache, before any image is encoded.
The processor (in the API server) therefore decides everything about an
image's pruning from its size and the request alone: the grid of each view,
how many tokens each view keeps, the global fraction. It writes a
:class:`Plan` into the image's multimodal kwargs under the field names below;
the model (in the engine) reads it back and does exactly that. The model
recomputes no count and no grid, so the two sides cannot disagree, and
nothing a request carries is checked, or can fail, inside the engine: every
check ran when the plan was made (:func:`plan`), where an error is a 400.

Torch only, no vLLM: both sides import it, and so do the property tests that
prove the model emits ``Plan.tokens`` embeddings for every image.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import torch

from hivtp_vllm.params import UNIFORM as UNIFORM_SELECTION
from hivtp_vllm.params import PruningRequest

__all__ = [
    "NUM_KEEP",
    "GRIDS",
    "TILES",
    "NEWLINES",
    "GLOBAL_FRACTION",
    "DUMMY",
    "UNIFORM",
    "FIELDS",
    "Layout",
    "Plan",
    "plan",
    "to_fields",
    "pop_plans",
    "any_counted",
]

# Per-image multimodal kwargs (vLLM "batched" fields, kept on the CPU).
NUM_KEEP = "hivtp_num_keep"  # [views] tokens each view keeps
GRIDS = "hivtp_grids"  # [views, 2] (rows, cols) of each view, unpruned
TILES = "hivtp_tiles"  # [2] (rows, cols) of tiles behind a stitched view; (0, 0): none
NEWLINES = "hivtp_newlines"  # [] always-kept embeddings after the last view's rows
GLOBAL_FRACTION = "hivtp_global_fraction"  # [] the spec's a
DUMMY = "hivtp_dummy"  # [] 1 on vLLM's warm-up and profiling items: never counted
UNIFORM = "hivtp_uniform"  # [] 1: the uniform baseline, no scores computed
FIELDS = (NUM_KEEP, GRIDS, TILES, NEWLINES, GLOBAL_FRACTION, DUMMY, UNIFORM)


@dataclass(frozen=True)
class Layout:
    """How one image lands in the prompt without pruning.

    ``grids`` holds the (rows, cols) of each view that selection runs on, in
    prompt order: LLaVA-1.5 has one, LLaVA-NeXT two (the base view and the
    unpadded high-resolution grid, which can have no rows or no columns).
    ``newlines`` counts the embeddings that follow the last view's rows and
    are always kept; ``tiles`` is the tile grid the last view is stitched
    from, ``(0, 0)`` where there is none.
    """

    grids: tuple[tuple[int, int], ...]
    newlines: int = 0
    tiles: tuple[int, int] = (0, 0)

    @property
    def sizes(self) -> list[int]:
        """Tokens of each view."""
        return [rows * cols for rows, cols in self.grids]

    @property
    def tokens(self) -> int:
        """Embeddings the image takes unpruned (stock vLLM's count)."""
        return sum(self.sizes) + self.newlines


@dataclass(frozen=True)
class Plan:
    """One image's pruning, decided by the processor and followed by the model."""

    layout: Layout
    keep: tuple[int, ...]
    global_fraction: float
    dummy: bool = False
    uniform: bool = False  # the scoring-free baseline instead of HIVTP

    @property
    def tokens(self) -> int:
        """Placeholder tokens in the prompt = embeddings the model emits."""
        return sum(self.keep) + self.layout.newlines

    @property
    def prunes(self) -> bool:
        """Whether any view drops a token; if not, the model's stock path runs."""
        return list(self.keep) != self.layout.sizes


def plan(layout: Layout, request: PruningRequest, *, dummy: bool = False) -> Plan:
    """The plan for one image; raises :class:`~hivtp_vllm.params.HivtpParamError`.

    The only check left here is the one that needs the image (a budget above
    the image's token count); the request's own values were checked when it
    was parsed.
    """
    keep = request.view_budgets(layout.sizes)
    uniform = request.selection == UNIFORM_SELECTION
    return Plan(layout, tuple(keep), request.global_fraction, dummy, uniform)


def to_fields(plans: Sequence[Plan]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The plans of a request's images as batched fields, one row per image:
    tensors, except where images have different numbers of views (Gemma 3's
    pan-and-scan crops), whose per-view fields are one tensor per image."""
    keep = [torch.tensor(p.keep, dtype=torch.long) for p in plans]
    grids = [torch.tensor(p.layout.grids, dtype=torch.long).view(-1, 2) for p in plans]
    ragged = len({len(p.keep) for p in plans}) > 1
    return {
        NUM_KEEP: keep if ragged else torch.stack(keep) if plans else torch.zeros(0, 1).long(),
        GRIDS: grids if ragged else torch.stack(grids) if plans else torch.zeros(0, 1, 2).long(),
        TILES: torch.tensor([p.layout.tiles for p in plans], dtype=torch.long),
        NEWLINES: torch.tensor([p.layout.newlines for p in plans], dtype=torch.long),
        GLOBAL_FRACTION: torch.tensor([p.global_fraction for p in plans], dtype=torch.float64),
        DUMMY: torch.tensor([int(p.dummy) for p in plans], dtype=torch.long),
        UNIFORM: torch.tensor([int(p.uniform) for p in plans], dtype=torch.long),
    }


def _rows(value: object) -> list:
    """A batched field as one Python value per image (a CPU tensor or a list)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return [v.tolist() if isinstance(v, torch.Tensor) else v for v in value]  # type: ignore[union-attr]


def pop_plans(kwargs: MutableMapping[str, object]) -> list[Plan] | None:
    """Take the plans out of a model's multimodal kwargs, in image order.

    ``None`` where the processor wrote none (client embeddings). The fields
    are kept on the CPU by vLLM, so reading them does not wait on the device.
    """
    fields = {name: kwargs.pop(name, None) for name in FIELDS}
    if fields[NUM_KEEP] is None:
        return None
    columns = [_rows(fields[name]) for name in FIELDS]
    return [
        Plan(
            Layout(
                grids=tuple((int(r), int(c)) for r, c in grids),
                newlines=int(newlines),
                tiles=(int(tiles[0]), int(tiles[1])),
            ),
            keep=tuple(int(k) for k in keep),
            global_fraction=float(fraction),
            dummy=bool(dummy),
            uniform=bool(uniform),
        )
        for keep, grids, tiles, newlines, fraction, dummy, uniform in zip(*columns, strict=True)
    ]


def any_counted(plans: Sequence[Plan] | None) -> bool:
    """Whether a forward serves real requests (not warm-up or profiling)."""
    return plans is None or not any(p.dummy for p in plans)
