"""``hivtp-vllm explain``: kept indices vs transformers, the picture by pixel, bad input.

Expected selections are rebuilt here from an independent score: transformers'
``CLIPVisionModel(output_attentions=True)`` on the checkpoint's own weights
(tests/reference_scores.py), LLaVA-NeXT tiles stitched with transformers'
``unpad_image``, then ``select_tokens``. The picture is checked by pixel:
panels are found as the non-white blocks of the last band of the page, and
each grid cell is outlined in the outline colour exactly when the JSON lists
its index as kept.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoImageProcessor
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from hivtp_vllm.cli import main
from hivtp_vllm.pruning import num_retained, select_tokens, split_budget
from hivtp_vllm.tools.heatmap import OUTLINE
from tests.reference_scores import transformers_scores

SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
RATIOS = [0.5, 0.25, 0.1]


def noise(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(path)
    return path


def run(*args: object) -> int:
    return main(["explain", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory) -> Path:
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("next") / "tiny-next", arch="llava-next")


@pytest.fixture(scope="module")
def llava_out(tiny_llava, tmp_path_factory) -> tuple[list[Path], Path]:
    """Two images through LLaVA-1.5 at three ratios and a 100-token budget."""
    out = tmp_path_factory.mktemp("explain-llava")
    images = [SHAPES, noise(out / "noise.png", 500, 300, 0)]
    assert (
        run(tiny_llava, *images, "--ratios", "0.5,0.25,0.1", "--num-tokens", 100, "--out", out) == 0
    )
    return images, out


@pytest.fixture(scope="module")
def next_out(tiny_next, tmp_path_factory) -> tuple[list[Path], Path]:
    """A wide and a tall image through LLaVA-NeXT (views stacked / side by side).

    Both take 1 x 2 (2 x 1) tiles plus the base view: small enough to keep the
    reference forward quick, and both orientations of the picture's layout.
    """
    out = tmp_path_factory.mktemp("explain-next")
    images = [noise(out / "wide.png", 600, 280, 1), noise(out / "tall.png", 280, 600, 2)]
    assert run(tiny_next, *images, "--ratios", "0.5,0.25", "--num-tokens", 64, "--out", out) == 0
    return images, out


def report(out: Path, image: Path) -> dict:
    return json.loads((out / f"{image.stem}.hivtp.json").read_text())


def reference_tiles(checkpoint: Path, image: Path) -> dict:
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    return processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")


# -- indices ---------------------------------------------------------------


def test_llava_indices_equal_selection_on_transformers_scores(tiny_llava, llava_out):
    from transformers import LlavaForConditionalGeneration

    images, out = llava_out
    pixels = torch.cat([reference_tiles(tiny_llava, image).pixel_values for image in images])
    scores = transformers_scores(LlavaForConditionalGeneration, tiny_llava, pixels)
    for image, row in zip(images, scores, strict=True):
        doc = report(out, image)
        grid = row.view(24, 24)
        (view,) = doc["views"]
        assert view["grid"] == [24, 24]
        torch.testing.assert_close(torch.tensor(view["scores"]), row, rtol=1e-4, atol=1e-7)
        budgets = [num_retained(576, r) for r in RATIOS] + [100]
        assert [s["K"] for s in doc["selections"]] == budgets
        for selection, k in zip(doc["selections"], budgets, strict=True):
            (kept,) = selection["views"]
            assert kept["grid"] == [24, 24] and kept["K"] == k
            assert kept["kept"] == select_tokens(grid, k).tolist(), selection["label"]


def test_next_indices_equal_selection_on_transformers_scores(tiny_next, next_out):
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    pinpoints = AutoConfig.from_pretrained(tiny_next).image_grid_pinpoints
    images, out = next_out
    tiles, layouts = [], []
    for image in images:
        batch = reference_tiles(tiny_next, image)
        size = tuple(batch.image_sizes[0].tolist())
        rows, cols = get_anyres_image_grid_shape(size, pinpoints, 336)
        tiles.append(batch.pixel_values[0][: 1 + rows * cols])
        layouts.append((size, (rows, cols)))
    # One forward for both images' tiles; then split per image.
    scores = transformers_scores(LlavaNextForConditionalGeneration, tiny_next, torch.cat(tiles))
    per_image = torch.split(scores, [t.shape[0] for t in tiles])
    for image, tile_scores, (size, (rows, cols)) in zip(images, per_image, layouts, strict=True):
        doc = report(out, image)
        base = tile_scores[0].view(24, 24)
        # Stitched the way transformers packs LLaVA-NeXT features (view, permute, unpad).
        hr = tile_scores[1:].view(rows, cols, 24, 24, 1).permute(4, 0, 2, 1, 3)
        highres = unpad_image(hr.reshape(1, rows * 24, cols * 24), size)[0]
        assert [v["name"] for v in doc["views"]] == ["base", "highres"]
        assert doc["views"][1]["grid"] == list(highres.shape)
        assert doc["views"][1]["tile_grid"] == [rows, cols]
        torch.testing.assert_close(
            torch.tensor(doc["views"][1]["scores"]), highres.reshape(-1), rtol=1e-4, atol=1e-7
        )
        n = [576, highres.numel()]
        budgets = [[num_retained(v, r) for v in n] for r in (0.5, 0.25)] + [split_budget(64, n)]
        assert len(doc["selections"]) == len(budgets)
        for selection, ks in zip(doc["selections"], budgets, strict=True):
            base_view, hr_view = selection["views"]
            assert [base_view["K"], hr_view["K"]] == ks and selection["K"] == sum(ks)
            assert base_view["kept"] == select_tokens(base, ks[0]).tolist()
            assert hr_view["kept"] == select_tokens(highres, ks[1]).tolist()


def test_reads_only_the_vision_tower(tiny_llava, llava_out, tmp_path):
    """A sharded checkpoint in transformers' newer key layout, the LM shard unreadable."""
    ckpt = tmp_path / "sharded"
    shutil.copytree(tiny_llava, ckpt)
    (ckpt / "model.safetensors").unlink()
    with safe_open(str(tiny_llava / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tower = {
        k.replace("vision_tower.vision_model.", "model.vision_tower."): v
        for k, v in tensors.items()
        if k.startswith("vision_tower.")
    }
    rest = {k: v for k, v in tensors.items() if not k.startswith("vision_tower.")}
    save_file(tower, str(ckpt / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"not safetensors" * 100)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tower}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in rest}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert (
        run(ckpt, SHAPES, "--ratios", "0.5,0.25,0.1", "--num-tokens", 100, "--out", tmp_path) == 0
    )
    _, out = llava_out
    want = [s["views"] for s in report(out, SHAPES)["selections"]]
    got = [s["views"] for s in report(tmp_path, SHAPES)["selections"]]
    assert [[v["kept"] for v in s] for s in got] == [[v["kept"] for v in s] for s in want]


# -- picture ---------------------------------------------------------------


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def check_picture(out: Path, image: Path) -> None:
    doc = report(out, image)
    picture = Image.open(out / doc["png"])
    picture.load()
    pixels = np.asarray(picture.convert("RGB"))
    ink = (pixels != 255).any(axis=2)
    # Panels: the last band of non-white rows, split by all-white columns.
    top, bottom = runs(ink.any(axis=1))[-1]
    panels = runs(ink[top:bottom].any(axis=0))
    assert len(panels) == len(doc["selections"])
    outline = (pixels == OUTLINE).all(axis=2)
    seen = np.zeros_like(outline)
    for (left, right), selection in zip(panels, doc["selections"], strict=True):
        assert selection["panel_box"] == [left, top, right, bottom]
        for view in selection["views"]:
            x0, y0, x1, y1 = view["png_box"]
            assert left <= x0 < x1 <= right and top <= y0 < y1 <= bottom
            h, w = view["grid"]
            cell = (x1 - x0) // w
            assert (x1 - x0, y1 - y0) == (w * cell, h * cell)
            cells = outline[y0:y1, x0:x1].reshape(h, cell, w, cell).transpose(0, 2, 1, 3)
            counts = cells.sum(axis=(2, 3)).reshape(-1)
            kept = np.zeros(h * w, dtype=bool)
            kept[view["kept"]] = True
            assert kept.sum() == view["K"]
            # Kept: the cell's whole 1-pixel border and nothing inside.
            border = np.ones((cell, cell), dtype=bool)
            border[1:-1, 1:-1] = False
            assert (cells.reshape(h * w, cell, cell)[kept] == border).all()
            assert (counts[~kept] == 0).all()
            seen[y0:y1, x0:x1] = True
    assert not outline[~seen].any()  # the outline colour appears nowhere else


def test_llava_picture_panels_and_outlines(llava_out):
    images, out = llava_out
    for image in images:
        check_picture(out, image)


def test_next_picture_panels_and_outlines(next_out):
    images, out = next_out
    for image in images:
        check_picture(out, image)
    # The wide image stacks its views, the tall one puts them side by side.
    wide, tall = ([v["png_box"] for v in report(out, i)["selections"][0]["views"]] for i in images)
    assert wide[0][3] <= wide[1][1] and tall[0][2] <= tall[1][0]


# -- bad input ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_llava, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    config = json.loads((tiny_llava / "config.json").read_text())
    out = {}
    for name, change in (
        ("qwen", {"architectures": ["Qwen2VLForConditionalGeneration"]}),
        ("full", {"vision_feature_select_strategy": "full"}),
    ):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
        out[name] = root / name
    return out


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing image", "no such file"),
        ("not an image", "not an image"),
        ("ratio too big", "hivtp_retain_ratio must be in (0, 1], got 1.5"),
        ("ratio zero", "hivtp_retain_ratio must be in (0, 1], got 0"),
        ("ratio not a number", "hivtp_retain_ratio must be a number, got 'half'"),
        ("too many tokens", "hivtp_num_tokens=577 is out of range"),
        ("bad regions", "hivtp_regions must be an integer >= 1"),
        ("band outside the tower", "hivtp_layer_start=10, hivtp_num_layers=3"),
        ("unsupported architecture", "unsupported architecture Qwen2VLForConditionalGeneration"),
        ("full feature strategy", "vision_feature_select_strategy='default'"),
        ("no checkpoint", "no such checkpoint directory"),
        ("hub name offline", "the Hugging Face hub could not provide it"),
        ("unknown device", "unknown torch device 'gpu0'"),
        ("no images", "the following arguments are required"),
    ],
)
def test_bad_input_is_one_line(case, expected, tiny_llava, bad_checkpoints, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    args = {
        "missing image": [tiny_llava, tmp_path / "nope.png"],
        "not an image": [tiny_llava, text],
        "ratio too big": [tiny_llava, SHAPES, "--ratios", "0.5,1.5"],
        "ratio zero": [tiny_llava, SHAPES, "--ratios", "0"],
        "ratio not a number": [tiny_llava, SHAPES, "--ratios", "half"],
        "too many tokens": [tiny_llava, SHAPES, "--num-tokens", 577],
        "bad regions": [tiny_llava, SHAPES, "--regions", 0, 2],
        "band outside the tower": [tiny_llava, SHAPES, "--layer-start", 10, "--num-layers", 3],
        "unsupported architecture": [bad_checkpoints["qwen"], SHAPES],
        "full feature strategy": [bad_checkpoints["full"], SHAPES],
        "no checkpoint": [tmp_path / "no-such-model", SHAPES],
        "hub name offline": ["nobody-hivtp/no-such-model", SHAPES],
        "unknown device": [tiny_llava, SHAPES, "--device", "gpu0"],
        "no images": [tiny_llava],
    }[case]
    out = tmp_path / "out"
    try:
        code = run(*args, "--out", out)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("hivtp-vllm explain: ") and expected in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_bad_input_exit_status_without_traceback(tiny_llava, tmp_path):
    """The installed command, as a user runs it: status 2, one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "hivtp_vllm.cli", "explain", str(tiny_llava), str(SHAPES)]
        + ["--ratios", "1.5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "hivtp-vllm explain: hivtp_retain_ratio must be in (0, 1], got 1.5"
    ]
    assert "Traceback" not in result.stdout + result.stderr
