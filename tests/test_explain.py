"""``hivtp-vllm explain``: kept indices vs transformers, the picture by pixel, bad input.

Expected selections are rebuilt here from an independent score: transformers'
``CLIPVisionModel`` / ``SiglipVisionModel(output_attentions=True)`` on the
checkpoint's own weights (tests/reference_scores.py), LLaVA-NeXT and
LLaVA-OneVision tiles stitched with transformers' ``unpad_image``,
OneVision's ``anyres_max_9`` shrink written out here, then
``select_tokens``; the uniform baseline's panels (``--selection
hivtp,uniform``) from ``uniform_tokens`` with K from ``num_retained`` /
``split_budget``, as the server's ``select_views`` picks them. The picture is
checked by pixel: panels are found as the non-white blocks of the last band
of the page, and each grid cell (row ``i`` of ``H`` over ``P`` pixels:
``floor(i P / H)`` up to ``floor((i + 1) P / H)``) is outlined in the outline
colour exactly when the JSON lists its index as kept.
"""

from __future__ import annotations

import json
import math
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
from torch.nn.functional import interpolate
from transformers import AutoImageProcessor
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)
from transformers.models.llava_onevision import modeling_llava_onevision as onevision

from hivtp_vllm import params
from hivtp_vllm.cli import main
from hivtp_vllm.pruning import num_retained, select_tokens, split_budget, uniform_tokens
from hivtp_vllm.tools.explain import explain
from hivtp_vllm.tools.heatmap import GAP, JOINED_GAP, OUTLINE
from tests.reference_scores import transformers_scores

SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
RATIOS = [0.5, 0.25, 0.1]
PATCH = 14  # every test checkpoint's patch size, in pixels
BOTH = ["--selection", "hivtp,uniform"]  # each size drawn by HIVTP and by the baseline


def noise(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(path)
    return path


def smooth(path: Path, width: int, height: int, seed: int) -> Path:
    """Low-frequency noise: distinct scores like noise, a small PNG for a big image."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((height // 50, width // 50, 3)) * 255).astype("uint8"))
    small.resize((width, height), Image.BICUBIC).save(path)
    return path


def run(*args: object) -> int:
    return main(["explain", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory) -> Path:
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("next") / "tiny-next", arch="llava-next")


@pytest.fixture(scope="module")
def llava_out(tiny_llava, tmp_path_factory) -> tuple[list[Path], Path]:
    """Two images through LLaVA-1.5 at three ratios and a 100-token budget,
    each by HIVTP and by the uniform baseline."""
    out = tmp_path_factory.mktemp("explain-llava")
    images = [SHAPES, noise(out / "noise.png", 500, 300, 0)]
    sizes = ["--ratios", "0.5,0.25,0.1", "--num-tokens", 100]
    assert run(tiny_llava, *images, *sizes, *BOTH, "--out", out) == 0
    return images, out


@pytest.fixture(scope="module")
def next_out(tiny_next, tmp_path_factory) -> tuple[list[Path], Path]:
    """A wide and a tall image through LLaVA-NeXT (views stacked / side by side).

    Both take 1 x 2 (2 x 1) tiles plus the base view: small enough to keep the
    reference forward quick, and both orientations of the picture's layout.
    HIVTP and the uniform baseline at each size.
    """
    out = tmp_path_factory.mktemp("explain-next")
    images = [noise(out / "wide.png", 600, 280, 1), noise(out / "tall.png", 280, 600, 2)]
    sizes = ["--ratios", "0.5,0.25", "--num-tokens", 64]
    assert run(tiny_next, *images, *sizes, *BOTH, "--out", out) == 0
    return images, out


@pytest.fixture(scope="module")
def tiny_ov(tmp_path_factory) -> Path:
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ov") / "tiny-ov", arch="llava-onevision")


@pytest.fixture(scope="module")
def ov_out(tiny_ov, tmp_path_factory) -> tuple[list[Path], Path]:
    """LLaVA-OneVision: a 2000 x 1500 image, whose 108 x 144 unpadded high-res
    grid (4 x 6 tiles) is shrunk to 70 x 93, and one smaller than a tile;
    HIVTP and the uniform baseline at each size."""
    out = tmp_path_factory.mktemp("explain-ov")
    images = [smooth(out / "large.png", 2000, 1500, 3), noise(out / "small.png", 300, 200, 4)]
    sizes = ["--ratios", "0.5,0.25", "--num-tokens", 100]
    assert run(tiny_ov, *images, *sizes, *BOTH, "--out", out) == 0
    return images, out


def report(out: Path, image: Path) -> dict:
    return json.loads((out / f"{image.stem}.hivtp.json").read_text())


def pairs(doc: dict, labels: list[str]) -> list[tuple[dict, dict]]:
    """(HIVTP, uniform) selections per size, checking their order and labels."""
    selections = doc["selections"]
    assert [s["selection"] for s in selections] == [params.HIVTP, params.UNIFORM] * len(labels)
    assert [s["label"] for s in selections] == [
        f"{name} {label}" for label in labels for name in ("HIVTP", "uniform")
    ]
    return list(zip(selections[::2], selections[1::2], strict=True))


def check_uniform(hivtp: dict, uniform: dict, grids: list[tuple[int, int]]) -> None:
    """The baseline keeps the same K per view as HIVTP, spread by ``uniform_tokens``."""
    for key in ("retain_ratio", "num_tokens", "K"):
        assert uniform[key] == hivtp[key]
    for view, same, grid in zip(uniform["views"], hivtp["views"], grids, strict=True):
        assert view["grid"] == list(grid) and view["K"] == same["K"]
        assert view["kept"] == uniform_tokens(*grid, view["K"]).tolist()


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
        labels = [f"r = {r:g}" for r in RATIOS] + ["k = 100"]
        for (selection, uniform), k in zip(pairs(doc, labels), budgets, strict=True):
            (kept,) = selection["views"]
            assert selection["K"] == kept["K"] == k and kept["grid"] == [24, 24]
            assert kept["kept"] == select_tokens(grid, k).tolist(), selection["label"]
            check_uniform(selection, uniform, [(24, 24)])


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
        labels = ["r = 0.5", "r = 0.25", "k = 64"]
        for (selection, uniform), ks in zip(pairs(doc, labels), budgets, strict=True):
            base_view, hr_view = selection["views"]
            assert [base_view["K"], hr_view["K"]] == ks and selection["K"] == sum(ks)
            assert base_view["kept"] == select_tokens(base, ks[0]).tolist()
            assert hr_view["kept"] == select_tokens(highres, ks[1]).tolist()
            check_uniform(selection, uniform, [(24, 24), tuple(highres.shape)])


def onevision_views(checkpoint: Path, image: Path) -> tuple[torch.Tensor, ...]:
    """(base [27, 27], unpadded [H', W'], high-res grid the LM gets, tile grid)
    from SiglipVisionModel's own attention, stitched and shrunk here."""
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    config = AutoConfig.from_pretrained(checkpoint)
    side = config.vision_config.image_size // config.vision_config.patch_size
    assert side == 27
    batch = reference_tiles(checkpoint, image)
    size = tuple(batch.image_sizes[0].tolist())
    rows, cols = onevision.get_anyres_image_grid_shape(size, config.image_grid_pinpoints, 384)
    tiles = batch.pixel_values[0][: 1 + rows * cols]
    # A few tiles per forward: eager attention keeps every layer's [S, S] maps.
    scores = torch.cat(
        [
            transformers_scores(LlavaOnevisionForConditionalGeneration, checkpoint, part, 0)
            for part in tiles.split(9)
        ]
    )
    assert scores.shape == (1 + rows * cols, side * side)  # SigLIP: every position a patch
    hr = scores[1:].view(rows, cols, side, side, 1).permute(4, 0, 2, 1, 3)
    unpadded = onevision.unpad_image(hr.reshape(1, rows * side, cols * side), size)
    height, width = unpadded.shape[1:]
    # anyres_max_9, as transformers' LlavaOnevisionModel.pack_image_features has it.
    ratio = math.sqrt(height * width / (9 * side**2))
    highres = unpadded
    if ratio > 1.1:
        shape = [int(height // ratio), int(width // ratio)]
        highres = interpolate(unpadded[None], shape, mode="bilinear")[0]
    return scores[0].view(side, side), unpadded[0], highres[0], (rows, cols)


def test_onevision_indices_equal_selection_on_transformers_scores(tiny_ov, ov_out):
    images, out = ov_out
    shrunk = []
    for image in images:
        doc = report(out, image)
        base, unpadded, highres, tile_grid = onevision_views(tiny_ov, image)
        shrunk.append(highres.shape != unpadded.shape)
        assert [v["name"] for v in doc["views"]] == ["base", "highres"]
        assert doc["views"][0]["grid"] == [27, 27]
        assert doc["views"][1]["grid"] == list(highres.shape)
        assert doc["views"][1]["unpadded_grid"] == list(unpadded.shape)
        assert doc["views"][1]["tile_grid"] == list(tile_grid)
        for view, grid in zip(doc["views"], (base, highres), strict=True):
            torch.testing.assert_close(
                torch.tensor(view["scores"]), grid.reshape(-1), rtol=1e-4, atol=1e-7
            )
        n = [729, highres.numel()]
        budgets = [[num_retained(v, r) for v in n] for r in (0.5, 0.25)] + [split_budget(100, n)]
        labels = ["r = 0.5", "r = 0.25", "k = 100"]
        for (selection, uniform), ks in zip(pairs(doc, labels), budgets, strict=True):
            base_view, hr_view = selection["views"]
            assert [base_view["K"], hr_view["K"]] == ks and selection["K"] == sum(ks)
            assert base_view["kept"] == select_tokens(base, ks[0]).tolist()
            assert hr_view["kept"] == select_tokens(highres, ks[1]).tolist()
            # On the shrunk grid the language model gets, as the server picks it.
            check_uniform(selection, uniform, [(27, 27), tuple(highres.shape)])
    # The large image's grid is shrunk (108 x 144 -> 70 x 93), the small one's is not.
    assert shrunk == [True, False]
    assert report(out, images[0])["views"][1]["grid"] == [70, 93]


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
    hivtp = [s for s in report(out, SHAPES)["selections"] if s["selection"] == params.HIVTP]
    got = report(tmp_path, SHAPES)["selections"]
    # No --selection: HIVTP panels only, labelled by size alone.
    assert [s["selection"] for s in got] == [params.HIVTP] * 4
    assert [s["label"] for s in got] == ["r = 0.5", "r = 0.25", "r = 0.1", "k = 100"]
    assert [[v["kept"] for v in s["views"]] for s in got] == [
        [v["kept"] for v in s["views"]] for s in hivtp
    ]


def test_uniform_alone_from_the_server_option(tiny_llava, tmp_path):
    """``hivtp_selection`` among the options, no selections: the baseline's panels
    only, named; the same selection listed twice draws once."""
    for selections, options in (((), {params.SELECTION: params.UNIFORM}), (["uniform"] * 2, {})):
        out = tmp_path / str(len(selections))
        explain(
            str(tiny_llava),
            [SHAPES],
            num_tokens=[100],
            selections=selections,
            options=options,
            out_dir=out,
            show_progress=False,
            log=lambda _: None,
        )
        (selection,) = report(out, SHAPES)["selections"]
        assert (selection["selection"], selection["label"]) == (params.UNIFORM, "uniform k = 100")
        assert selection["views"][0]["kept"] == uniform_tokens(24, 24, 100).tolist()
        check_picture(out, SHAPES)


# -- picture ---------------------------------------------------------------


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def cell_edges(start: int, pixels: int, cells: int) -> np.ndarray:
    """Cell i of a view spans pixels [edges[i], edges[i + 1]) along this axis."""
    return start + np.arange(cells + 1) * pixels // cells


def outlines(y_edges: np.ndarray, x_edges: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Where the 1-pixel borders of the kept cells ``kept [H, W]`` lie."""
    mask = np.zeros((y_edges[-1] - y_edges[0], x_edges[-1] - x_edges[0]), dtype=bool)
    ys, xs = y_edges - y_edges[0], x_edges - x_edges[0]
    for i, j in zip(*np.nonzero(kept), strict=True):
        top, bottom, left, right = ys[i], ys[i + 1] - 1, xs[j], xs[j + 1] - 1
        mask[[top, bottom], left : right + 1] = True
        mask[top : bottom + 1, [left, right]] = True
    return mask


def check_picture(out: Path, image: Path) -> None:
    doc = report(out, image)
    views = {v["name"]: v for v in doc["views"]}
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
            # The view shows its patches at one pixel per pixel: the grid's
            # own for a base view, the unpadded grid's for a high-res one
            # (LLaVA-OneVision's shrunk grid then spreads over them).
            ph, pw = views[view["name"]].get("unpadded_grid", [h, w])
            assert (x1 - x0, y1 - y0) == (pw * PATCH, ph * PATCH)
            y_edges, x_edges = cell_edges(y0, y1 - y0, h), cell_edges(x0, x1 - x0, w)
            assert (np.diff(y_edges) >= PATCH).all() and (np.diff(x_edges) >= PATCH).all()
            kept = np.zeros(h * w, dtype=bool)
            kept[view["kept"]] = True
            assert kept.sum() == view["K"]
            # Kept: the cell's whole 1-pixel border and nothing inside; pruned: none.
            expected = outlines(y_edges, x_edges, kept.reshape(h, w))
            assert (outline[y0:y1, x0:x1] == expected).all()
            seen[y0:y1, x0:x1] = True
    assert not outline[~seen].any()  # the outline colour appears nowhere else
    selections = doc["selections"]
    for (_, right), (left, _), before, after in zip(
        panels, panels[1:], selections, selections[1:], strict=False
    ):
        # One size's panels (HIVTP, uniform) close together, sizes further apart.
        size = ("retain_ratio", "num_tokens")
        if [before[k] for k in size] != [after[k] for k in size]:
            assert left - right == GAP
            continue
        assert left - right == JOINED_GAP
        assert (before["selection"], after["selection"]) == (params.HIVTP, params.UNIFORM)
        for a, b in zip(before["views"], after["views"], strict=True):
            x0, y0, x1, y1 = a["png_box"]
            u0, v0, u1, v1 = b["png_box"]
            # The uniform panel draws the same heatmap: a pixel differs
            # between the two exactly where one keeps its cell and one not.
            differs = (pixels[y0:y1, x0:x1] != pixels[v0:v1, u0:u1]).any(axis=2)
            assert (differs == (kept_pixels(a) != kept_pixels(b))).all()


def kept_pixels(view: dict) -> np.ndarray:
    """Per pixel of a view's box, whether its cell is kept."""
    x0, y0, x1, y1 = view["png_box"]
    h, w = view["grid"]
    rows = np.searchsorted(cell_edges(0, y1 - y0, h), np.arange(y1 - y0), side="right") - 1
    cols = np.searchsorted(cell_edges(0, x1 - x0, w), np.arange(x1 - x0), side="right") - 1
    kept = np.zeros(h * w, dtype=bool)
    kept[view["kept"]] = True
    return kept.reshape(h, w)[rows][:, cols]


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


def test_onevision_picture_panels_and_outlines(ov_out):
    """Base view 378 px (the 27 x 27 patches SigLIP sees of 384); the large
    image's 70 x 93 cells spread over its 108 x 144 unpadded patches."""
    images, out = ov_out
    for image in images:
        check_picture(out, image)
    for image in images:
        base, highres = report(out, image)["selections"][0]["views"]
        assert base["png_box"][2] - base["png_box"][0] == 27 * PATCH
        assert base["png_box"][3] <= highres["png_box"][1]  # wider than tall: stacked
    large = report(out, images[0])["selections"][0]["views"][1]["png_box"]
    assert (large[2] - large[0], large[3] - large[1]) == (144 * PATCH, 108 * PATCH)


# -- bad input ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_llava, tiny_ov, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name, source, change in (
        ("qwen", tiny_llava, {"architectures": ["Qwen2VLForConditionalGeneration"]}),
        ("full", tiny_llava, {"vision_feature_select_strategy": "full"}),
        ("siglip default", tiny_ov, {"vision_feature_select_strategy": "default"}),
    ):
        config = json.loads((source / "config.json").read_text())
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
        ("SigLIP with default", "or a SigLIP one with 'full'; this checkpoint has Siglip"),
        ("no checkpoint", "no such checkpoint directory"),
        ("hub name offline", "the Hugging Face hub could not provide it"),
        ("unknown device", "unknown torch device 'gpu0'"),
        ("bad selection", "hivtp_selection must be one of 'hivtp', 'uniform', got 'random'"),
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
        "SigLIP with default": [bad_checkpoints["siglip default"], SHAPES],
        "no checkpoint": [tmp_path / "no-such-model", SHAPES],
        "hub name offline": ["nobody-hivtp/no-such-model", SHAPES],
        "unknown device": [tiny_llava, SHAPES, "--device", "gpu0"],
        "bad selection": [tiny_llava, SHAPES, "--selection", "hivtp,random"],
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
