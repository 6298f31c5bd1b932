"""M-RoPE positions of pruned Qwen-VL prompts (spec section 5), torch only.

Qwen-VL gives every prompt token a (t, h, w) position. Text tokens count up
on all three axes; an image's tokens take ``base + (0, row, col)`` on its
merged grid, and the text after it resumes at ``base + max(rows, cols)``.
Spec section 5: a kept image token carries the position it has without
pruning, and so does every text token, so a prompt's positions never depend
on the ratio.

vLLM computes positions when a request arrives, before any image is
encoded, but which tokens are kept is known only after the tower has run.
So the positions are made in two steps, as vLLM does for its own video
pruning (``SupportsMultiModalPruning``):

1. At arrival, vLLM's own positions of the unpruned prompt
   (:func:`unpruned_prompt`), read back at the pruned prompt's tokens:
   exact for every text token, and the exact ``delta`` for decoding; a
   pruned image's slots get placeholder positions for now.
2. :func:`place_kept`, after the tower, for each prefill chunk: each emitted
   embedding carries its token's (row, col) in :data:`CHANNELS` extra
   columns (:func:`position_channels`), which are read, stripped, and
   written into the slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "CHANNELS",
    "unpruned_prompt",
    "position_channels",
    "unchanged_channels",
    "place_kept",
]

# (row, col) as base-256 digits: each channel is an integer in [0, 255], which
# bfloat16 (8 significant bits) holds exactly; a grid side is at most 65,535.
CHANNELS = 4
_UNCHANGED = -1.0  # every channel: the rows keep the positions of step 1


def unpruned_prompt(
    input_tokens: Sequence[int], runs: Sequence[tuple[int, int, int]]
) -> tuple[list[int], list[int]]:
    """The prompt as it would be unpruned, and where each of its tokens lands.

    ``runs`` are the pruned images' placeholder runs, ``(offset, length,
    full)``: ``length`` placeholders where unpruned there are ``full``. Each
    run grows to ``full`` copies of its token; ``where[i]`` is the index of
    token ``i`` in the grown prompt (the k-th slot of a run lands on the
    run's k-th unpruned slot). Step 1 runs vLLM's own position code on the
    grown prompt and reads the positions back through ``where``, so every
    text token gets exactly its unpruned position, whatever the family's
    rules for videos and timestamps.
    """
    tokens: list[int] = []
    where: list[int] = []
    cursor = 0
    for offset, length, full in sorted(runs):
        where.extend(range(len(tokens), len(tokens) + offset - cursor))
        tokens.extend(input_tokens[cursor:offset])
        where.extend(range(len(tokens), len(tokens) + length))
        tokens.extend([input_tokens[offset]] * full)
        cursor = offset + length
    where.extend(range(len(tokens), len(tokens) + len(input_tokens) - cursor))
    tokens.extend(input_tokens[cursor:])
    return tokens, where


def position_channels(kept: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``[K, CHANNELS]`` columns that carry each kept token's (row, col).

    ``kept`` holds flat raster indices on a grid of ``cols`` columns.
    """
    rows, col = kept // cols, kept % cols
    return torch.stack([rows // 256, rows % 256, col // 256, col % 256], dim=1).to(dtype)


def unchanged_channels(n: int, like: torch.Tensor) -> torch.Tensor:
    """Columns for ``n`` embeddings whose positions step 1 already made
    exact (unpruned images, videos)."""
    return torch.full((n, CHANNELS), _UNCHANGED, dtype=like.dtype, device=like.device)


def place_kept(
    input_ids: Sequence[int] | torch.Tensor,
    positions: torch.Tensor,
    embeddings: Sequence[torch.Tensor],
    num_computed_tokens: int,
    media_token_ids: Sequence[int],
    vision_start_id: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step 2, for the media embeddings of one request's prefill chunk.

    ``embeddings`` are the chunk's media embeddings with their channels, in
    prompt order, as vLLM's model runner gathers them; they fill the first
    media placeholders at or after ``num_computed_tokens``. Returns the
    embeddings without channels and new positions, where every slot of a
    pruned image holds ``base + (0, row, col)`` with ``base`` one past its
    ``<|vision_start|>`` token's position. Idempotent: a chunk gathered twice
    gets the same positions.
    """
    stripped = [e[:, :-CHANNELS] for e in embeddings]
    if not embeddings:
        return stripped, positions
    channels = torch.cat([e[:, -CHANNELS:] for e in embeddings]).float().cpu()
    moved = channels[:, 0] >= 0
    if not bool(moved.any()):
        return stripped, positions
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    media = torch.isin(ids[num_computed_tokens:], torch.tensor(list(media_token_ids)))
    slots = media.nonzero().flatten()[: channels.shape[0]] + num_computed_tokens
    starts = (ids == vision_start_id).nonzero().flatten()
    slots, channels = slots[moved], channels[moved].round().long()
    owner = starts[torch.searchsorted(starts, slots) - 1]
    base = positions[0, owner.to(positions.device)] + 1
    rows = channels[:, 0] * 256 + channels[:, 1]
    cols = channels[:, 2] * 256 + channels[:, 3]
    out = positions.clone()
    slots_d = slots.to(positions.device)
    out[0, slots_d] = base
    out[1, slots_d] = base + rows.to(positions.device)
    out[2, slots_d] = base + cols.to(positions.device)
    return stripped, out
