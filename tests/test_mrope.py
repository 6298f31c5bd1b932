"""hivtp_vllm.mrope against a plain reference of Qwen-VL's M-RoPE rules.

A prompt holds, between text: a pruned image, a wide pruned image (columns
past 256, so every digit of the columns is used), a video pruned the way
vLLM's video pruning lays out Qwen3-VL videos (each frame's timestamp text,
``<|vision_start|>``, its kept tokens, ``<|vision_end|>``, all embedded, the
placeholder's tokens lumped into the first frame), and an unpruned image.
The positions after both steps must be the unpruned prompt's at every text
token and every kept media token, for every way of cutting the prompt into
prefill chunks, and doing step 2 twice must change nothing.
"""

from __future__ import annotations

import pytest
import torch

from hivtp_vllm import mrope

TEXT, IMAGE, VIDEO, START, END = 1, 2, 3, 4, 5


def full_positions(tokens: list[int], grids: list[tuple[int, int]]) -> torch.Tensor:
    """Qwen-VL's positions, written out by hand: text counts up on all axes;
    a media run (one frame: a grid of ``IMAGE`` or ``VIDEO`` tokens) takes
    ``base + (0, row, col)``; the text after resumes at ``base + max(rows, cols)``."""
    out, at, p, grid = [], 0, 0, iter(grids)
    while at < len(tokens):
        if tokens[at] in (IMAGE, VIDEO):
            rows, cols = next(grid)
            out += [(p, p + r, p + c) for r in range(rows) for c in range(cols)]
            at, p = at + rows * cols, p + max(rows, cols)
        else:
            out.append((p, p, p))
            at, p = at + 1, p + 1
    return torch.tensor(out).T


class Prompt:
    """A pruned prompt, its unpruned twin, and what the model emits."""

    def __init__(self) -> None:
        self.ids: list[int] = []  # pruned prompt
        self.full: list[int] = []  # unpruned prompt
        self.grids: list[tuple[int, int]] = []  # one a frame, in prompt order
        self.truth: list[int | None] = []  # pruned slot -> unpruned index (None: set by a row)
        self.items: list[dict] = []  # placeholder run, rows, channels, runs for step 1

    def text(self, n: int) -> None:
        for _ in range(n):
            self.truth.append(len(self.full))
            self.ids.append(TEXT)
            self.full.append(TEXT)

    def image(self, rows: int, cols: int, kept: list[int] | None) -> None:
        self.text(1)  # <|vision_start|>, as text
        n = rows * cols
        kept_t = torch.arange(n) if kept is None else torch.tensor(kept)
        offset, base = len(self.ids), len(self.full)
        self.ids += [IMAGE] * len(kept_t)
        self.truth += (base + kept_t).tolist()
        self.full += [IMAGE] * n
        self.grids.append((rows, cols))
        if kept is None:
            channels = mrope.unchanged_channels(n, torch.zeros(1, dtype=torch.bfloat16))
            runs = []
        else:
            relative = torch.stack([0 * kept_t, kept_t // cols, kept_t % cols], 1)
            channels = mrope.row_channels(
                torch.arange(len(kept_t)), relative, 0, torch.bfloat16, max(rows, cols)
            )
            runs = [(offset, len(kept_t), n, IMAGE)]
        self.items.append({"offset": offset, "rows": channels, "runs": runs})
        self.text(1)  # <|vision_end|>

    def video(self, frames: list[tuple[int, int, int, list[int]]]) -> None:
        """Frames of (timestamp length, rows, cols, kept tokens of the frame)."""
        offset, block_start = len(self.ids), len(self.full)
        layout: list[int] = []  # the run as the model embeds it: unpruned indices
        for stamp, rows, cols, kept in frames:
            begin = len(self.full)
            self.full += [TEXT] * (stamp + 1) + [VIDEO] * rows * cols + [TEXT]
            self.grids.append((rows, cols))
            layout += list(range(begin, begin + stamp + 1))
            layout += [begin + stamp + 1 + k for k in kept]
            layout.append(len(self.full) - 1)
        # The prompt's run: the same text, every kept token lumped into frame 0.
        total = sum(len(kept) for *_, kept in frames)
        runs = []
        for f, (stamp, rows, cols, _) in enumerate(frames):
            self.ids += [TEXT] * stamp + [START]
            count = total if f == 0 else 0
            if count != rows * cols:
                runs.append((len(self.ids), count, rows * cols, VIDEO))
            self.ids += [VIDEO] * count + [END]
        self.truth += [None] * len(layout)
        reference = full_positions(self.full, self.grids)
        relative = reference[:, layout].T - reference[0, block_start]
        lead = frames[0][0] + 1
        channels = mrope.row_channels(torch.arange(len(layout)), relative, lead, torch.bfloat16)
        self.items.append({"offset": offset, "rows": channels, "runs": runs, "layout": layout})


def build() -> Prompt:
    prompt = Prompt()
    prompt.text(5)
    prompt.image(3, 4, kept=[0, 5, 6, 11])  # the last row and column kept: 11
    prompt.text(2)
    prompt.image(2, 300, kept=[1, 299, 300, 557])  # columns past 256
    prompt.text(3)
    prompt.video([(3, 2, 3, [0, 1, 2, 3, 4, 5]), (4, 2, 3, [5]), (3, 2, 3, [])])
    prompt.text(2)
    prompt.image(2, 2, kept=None)
    prompt.text(4)
    # Text start markers and video frame markers are ordinary text tokens here.
    prompt.ids = [TEXT if t in (START, END) else t for t in prompt.ids]
    return prompt


def media_ids() -> tuple[int, int]:
    return (IMAGE, VIDEO)


def test_step_one_grows_the_prompt_back_and_reads_text_exactly():
    prompt = build()
    runs = [run for item in prompt.items for run in item["runs"]]
    tokens, where = mrope.unpruned_prompt(prompt.ids, runs)
    assert len(tokens) == len(prompt.full)
    assert [t if t in (IMAGE, VIDEO) else TEXT for t in tokens] == prompt.full
    reference = full_positions(prompt.full, prompt.grids)
    arrival = reference[:, where]
    for slot, index in enumerate(prompt.truth):
        if index is not None and prompt.ids[slot] == TEXT:
            assert torch.equal(arrival[:, slot], reference[:, index]), slot


def place_in_chunks(prompt: Prompt, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Step 1, then step 2 chunk by chunk as vLLM's runners call it: the
    positions placed, the ones wanted, and the decoding start as V2 takes it
    (the last call with rows: past the largest position or the runs' end)."""
    runs = [run for item in prompt.items for run in item["runs"]]
    tokens, where = mrope.unpruned_prompt(prompt.ids, runs)
    reference = full_positions(prompt.full, prompt.grids)
    positions = reference[:, where].clone()
    hidden = 3
    spans = []
    for item in prompt.items:
        rows = item["rows"]
        embeds = torch.cat([torch.randn(len(rows), hidden, dtype=torch.bfloat16), rows], 1)
        spans.append((item["offset"], embeds))
    want = torch.empty_like(positions)
    for slot, index in enumerate(prompt.truth):
        if index is not None:
            want[:, slot] = reference[:, index]
    for item in prompt.items:
        for k, index in enumerate(item.get("layout", [])):
            want[:, item["offset"] + k] = reference[:, index]
    next_position = None
    for start in range(0, len(prompt.ids), chunk):
        end = min(start + chunk, len(prompt.ids))
        # As vLLM's runner gathers them: each item's rows inside the chunk.
        gathered = [
            embeds[max(start - offset, 0) : end - offset]
            for offset, embeds in spans
            if offset < end and offset + len(embeds) > start
        ]
        stripped, placed, run_end = mrope.place(prompt.ids, positions, gathered, start, media_ids())
        assert [s.shape[1] for s in stripped] == [hidden] * len(gathered)
        assert torch.equal(placed[:, start:end], want[:, start:end]), (start, end)
        again, twice, _ = mrope.place(prompt.ids, placed, gathered, start, media_ids())
        assert torch.equal(twice, placed)
        if gathered:
            next_position = max(int(placed.max()) + 1, run_end)
        positions = placed
    return positions, want, next_position


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_step_two_places_every_row_in_any_chunking(chunk):
    prompt = build()
    positions, want, next_position = place_in_chunks(prompt, chunk)
    assert torch.equal(positions, want)
    assert next_position == int(full_positions(prompt.full, prompt.grids).max()) + 1


@pytest.mark.parametrize("chunk", [1, 2, 5, 10_000])
def test_a_prompt_ending_in_a_pruned_image_decodes_after_its_unpruned_end(chunk):
    """A raw prompt whose last tokens are a pruned image's (no text after):
    decoding starts after the unpruned image, not after its largest kept
    token (V2 hands the hook a copy of the positions, so the end travels in
    the rows' extent)."""
    prompt = Prompt()
    prompt.text(3)
    prompt.image(3, 5, kept=[0, 6])  # neither the last row nor the last column
    prompt.truth.pop()  # no <|vision_end|>: the prompt ends in the run
    prompt.ids.pop()
    prompt.full.pop()
    positions, want, next_position = place_in_chunks(prompt, chunk)
    assert torch.equal(positions, want)
    unpruned_next = 3 + 1 + max(3, 5)  # text, <|vision_start|>, then the grid
    assert int(positions.max()) + 1 < unpruned_next
    assert next_position == unpruned_next


def test_channels_are_exact_in_bfloat16_and_unchanged_rows_read_negative():
    slots = torch.tensor([0, 255, 256, 70_000])
    relative = torch.tensor([[0, 1, 2], [3, 257, 65_537], [9, 0, 16_777_215], [1, 2, 3]])
    channels = mrope.row_channels(slots, relative, 7, torch.bfloat16, 300_000)
    fields = mrope.read_channels(torch.cat([torch.zeros(4, 2, dtype=torch.bfloat16), channels], 1))
    assert fields.tolist() == [
        [s, *r, 7, 300_000] for s, r in zip(slots.tolist(), relative.tolist(), strict=True)
    ]
    # Without an extent: one past the largest relative position given.
    default = mrope.row_channels(slots[:1], relative[:1], 0, torch.bfloat16)
    assert mrope.read_channels(default)[0, 5] == 3
    unchanged = mrope.unchanged_channels(2, torch.zeros(1, dtype=torch.bfloat16))
    assert (mrope.read_channels(unchanged) < 0).all()
    assert mrope.CHANNELS not in (4, 5)  # vLLM's own position columns
