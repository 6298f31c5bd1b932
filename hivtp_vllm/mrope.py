"""M-RoPE positions of pruned Qwen-VL prompts (docs/spec.md section 5), torch only.

Qwen-VL gives every prompt token a (t, h, w) position. Text tokens count up
on all three axes; an image's tokens take ``base + (0, row, col)`` on its
merged grid, and the text after it resumes at ``base + max(rows, cols)``.
Spec section 5: a kept image token carries the position it has without
pruning, and so does every text token, so a prompt's positions never depend
on the ratio. Videos pruned by vLLM's own video pruning (EVS) are held to the
same rule: a kept video token, and all text, carry their unpruned positions.

vLLM computes positions when a request arrives, before any media is
encoded, but which tokens are kept is known only after the tower has run.
So the positions are made in two steps, as vLLM does for its own video
pruning (``SupportsMultiModalPruning``):

1. At arrival, vLLM's own positions of the unpruned prompt
   (:func:`unpruned_prompt`), read back at the pruned prompt's tokens:
   exact for every text token, and the exact ``delta`` for decoding; a
   pruned item's slots get placeholder positions for now.
2. :func:`place`, after the tower, for each prefill chunk: every emitted
   row carries, in :data:`CHANNELS` extra columns (:func:`row_channels`),
   its slot in its item's placeholder run and its position relative to the
   run, which are read, stripped, and written into the slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "CHANNELS",
    "unpruned_prompt",
    "row_channels",
    "unchanged_channels",
    "read_channels",
    "place",
]

# Six fields per row (slot, t, h, w, lead, extent), each as 3 base-256 digits:
# every digit is an integer in [0, 255], which bfloat16 (8 significant bits)
# holds exactly; a field is below 2**24. 18 columns: never vLLM's own 4
# (Qwen2.5-VL) or 5 (Qwen3-VL) position columns.
FIELDS = 6
DIGITS = 3
CHANNELS = FIELDS * DIGITS
_PLACES = torch.tensor([256**2, 256, 1])
_UNCHANGED = -1.0  # every channel: the rows keep the positions of step 1


def unpruned_prompt(
    input_tokens: Sequence[int], runs: Sequence[tuple[int, int, int, int]]
) -> tuple[list[int], list[int]]:
    """The prompt as it would be unpruned, and where each of its tokens lands.

    ``runs`` are the pruned placeholder runs, ``(offset, length, full,
    token)``: ``length`` placeholders where unpruned there are ``full``
    copies of ``token``. ``where[i]`` is the index of token ``i`` in the
    grown prompt: a text token lands on itself, the k-th slot of a run on the
    run's k-th unpruned slot (its last one where a run holds more slots than
    unpruned, as vLLM's video pruning lumps a video's tokens into its first
    frame). Step 1 runs vLLM's own position code on the grown prompt and
    reads the positions back through ``where``, so every text token gets
    exactly its unpruned position, whatever the family's rules for videos
    and timestamps.
    """
    tokens: list[int] = []
    where: list[int] = []
    cursor = 0
    for offset, length, full, token in sorted(runs):
        where.extend(range(len(tokens), len(tokens) + offset - cursor))
        tokens.extend(input_tokens[cursor:offset])
        fits = min(length, full)
        where.extend(range(len(tokens), len(tokens) + fits))
        where.extend([len(tokens) + full - 1] * (length - fits))
        tokens.extend([token] * full)
        cursor = offset + length
    where.extend(range(len(tokens), len(tokens) + len(input_tokens) - cursor))
    tokens.extend(input_tokens[cursor:])
    return tokens, where


def row_channels(
    slots: torch.Tensor,
    relative: torch.Tensor,
    lead: int,
    dtype: torch.dtype,
    extent: int | None = None,
) -> torch.Tensor:
    """``[n, CHANNELS]`` columns for ``n`` rows of one item.

    ``slots`` is each row's index in the item's placeholder run and
    ``relative`` its ``[n, 3]`` (t, h, w) position from the run's base (one
    past the token before the run). ``lead`` is the run's slot of the first
    media token in the prompt: 0 where the run is media tokens only (images,
    Qwen2.5-VL videos), the timestamp length + 1 for a Qwen3-VL video block,
    whose run starts with its first frame's timestamp text. ``extent`` is
    where the position after the unpruned run resumes, from the run's base
    (an image: ``max(rows, cols)``); by default one past the largest of
    ``relative``, right when the rows hold the run's last position.
    """
    relative = relative.long().cpu()
    if extent is None:
        extent = int(relative.max()) + 1 if len(relative) else 0
    fields = torch.cat(
        [
            slots.view(-1, 1).long().cpu(),
            relative,
            torch.full((len(slots), 1), lead, dtype=torch.long),
            torch.full((len(slots), 1), extent, dtype=torch.long),
        ],
        dim=1,
    )
    digits = fields.unsqueeze(-1) // _PLACES % 256
    return digits.view(len(slots), CHANNELS).to(dtype)


def unchanged_channels(n: int, like: torch.Tensor) -> torch.Tensor:
    """Columns for ``n`` media-token rows whose positions step 1 already
    made exact (unpruned images, videos vLLM did not prune)."""
    return torch.full((n, CHANNELS), _UNCHANGED, dtype=like.dtype, device=like.device)


def read_channels(rows: torch.Tensor) -> torch.Tensor:
    """``[n, FIELDS]`` (slot, t, h, w, lead, extent) of rows with their channels;
    negative where the rows are unchanged."""
    digits = rows[:, -CHANNELS:].float().round().long().cpu()
    return (digits.view(-1, FIELDS, DIGITS) * _PLACES).sum(-1)


def place(
    input_ids: Sequence[int] | torch.Tensor,
    positions: torch.Tensor,
    embeddings: Sequence[torch.Tensor],
    num_computed_tokens: int,
    media_token_ids: Sequence[int],
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Step 2, for the media rows of one request's prefill chunk.

    ``embeddings`` are the chunk's items in prompt order, as vLLM's model
    runner gathers them: the first may continue an item begun in an earlier
    chunk (its rows then start at ``num_computed_tokens``), the others start
    fresh. An item's run starts ``lead`` slots before its first media token
    at or after the previous item's end. Each row's slot gets
    ``base + (t, h, w)``, ``base`` one past the position of the token before
    the run; rows marked unchanged are media tokens that keep their
    positions. Returns the embeddings without channels and the new
    positions, and ``end``: the position after the last placed run as it is
    unpruned (``base + extent``; 0 where no run was placed), which decoding
    follows when the prompt ends in that run. Idempotent, and exact however
    the prompt is split in chunks: it reads only positions that step 1 made
    exact, which it never changes.
    """
    stripped = [e[:, :-CHANNELS] for e in embeddings]
    if not embeddings:
        return stripped, positions, 0
    # One copy to the host for the whole chunk, then split per item.
    columns = torch.cat([e[:, -CHANNELS:] for e in embeddings])
    fields = read_channels(columns).split([len(e) for e in embeddings])
    if not any(len(f) and int(f[0, 0]) >= 0 for f in fields):
        return stripped, positions, 0
    # The V2 runner hands the prompt as a tensor on the model's device.
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    wanted = torch.tensor(list(media_token_ids), device=ids.device)
    media = torch.isin(ids, wanted).nonzero().flatten().cpu()
    out = positions.clone()
    at = num_computed_tokens
    end = 0
    for rows in fields:
        if not len(rows):
            continue
        first = int(torch.searchsorted(media, at))  # the first media token at or after `at`
        slot, lead = int(rows[0, 0]), int(rows[0, 4])
        if slot < 0:  # unchanged: one media token a row
            at = int(media[first + len(rows) - 1]) + 1
            continue
        start = at - slot if slot else int(media[first]) - lead
        slots = (start + rows[:, 0]).to(out.device)
        base = out[0, start - 1] + 1 if start > 0 else 0
        out[:, slots] = base + rows[:, 1:4].T.to(out.device)
        end = max(end, int(base) + int(rows[0, 5]))
        at = int(slots[-1]) + 1
    return stripped, out, end
