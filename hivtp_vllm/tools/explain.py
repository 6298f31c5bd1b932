"""``hivtp-vllm explain``: what HIVTP keeps of an image, as a picture and JSON.

Before switching pruning on, a user wants to see which patches of their own
images survive at a given ratio. This module answers with the server's own
pieces, not a re-implementation: the image goes through the checkpoint's own
image processor, the vision tower its family's row names runs on the
checkpoint's own weights (:mod:`hivtp_vllm.tools.tower`), the band's
attention is scored by the server's
:func:`hivtp_vllm.scoring.received_attention`, budgets come from
:class:`hivtp_vllm.params.PruningRequest` (an anyres budget is split over
base view and high-res grid exactly as the processor splits it), views are
laid out by the row's layout with :mod:`hivtp_vllm.views` as the model lays
them out (stitched and unpadded; with ``max_views``, as LLaVA-OneVision, then
shrunk past about that many views' tokens), and
tokens are picked by :func:`hivtp_vllm.pruning.select_tokens`, or, for the
uniform baseline of the same size (``hivtp_selection: "uniform"``), by
:func:`hivtp_vllm.pruning.uniform_tokens`, as the server picks them. No vLLM
import.

Per image it writes ``<stem>.hivtp.png`` (:mod:`hivtp_vllm.tools.heatmap`) and
``<stem>.hivtp.json``: per request the selection, the grid, K and kept flat
indices of each view, where each grid sits in the picture, and the scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from hivtp_vllm import params
from hivtp_vllm.pruning import select_tokens, uniform_tokens
from hivtp_vllm.tools.heatmap import Panel, View, render
from hivtp_vllm.tools.tower import (
    BandScorer,
    Checkpoint,
    ExplainError,
    MergedBandScorer,
    open_checkpoint,
    progress,
)
from hivtp_vllm.views import pool_scores, stitch

__all__ = [
    "ExplainError",
    "DEFAULT_RATIOS",
    "explain",
    "parse_requests",
    "parse_selections",
    "parse_value",
]

DEFAULT_RATIOS = (0.5, 0.25, 0.1)
VIEW_NAMES = {
    "base": "base view",
    "highres": "high-res grid",
    "merged": "merged grid",
    "pooled": "pooled grid",
    "crop": "crop's pooled grid",
}
SELECTION_NAMES = {params.HIVTP: "HIVTP", params.UNIFORM: "uniform"}


# -- inputs ----------------------------------------------------------------


def parse_value(value: object) -> object:
    """A command-line string as the JSON number it spells, else unchanged.

    Whatever is not a number then reaches :mod:`hivtp_vllm.params`, which
    refuses it with the message the server gives a client.
    """
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_selections(selections: Sequence[object], default: params.PruningRequest) -> list[str]:
    """``hivtp_selection`` values, validated as a request's; repeats dropped.

    None given means the default request's (``"hivtp"`` unless the options
    say otherwise).
    """
    picked = [params.parse_request({params.SELECTION: s}, default).selection for s in selections]
    return list(dict.fromkeys(picked)) or [default.selection]


def parse_requests(
    ratios: Sequence[object],
    num_tokens: Sequence[object],
    default: params.PruningRequest,
    selections: Sequence[object] = (),
) -> list[params.PruningRequest]:
    """One pruning request per panel, validated as a request's keys are.

    Per ratio, then per budget, one request for each selection, in the
    order given: HIVTP and uniform at one size end up next to each other.
    """
    how = parse_selections(selections, default)
    sizes = [{params.RATIO: parse_value(r)} for r in ratios]
    sizes += [{params.NUM_TOKENS: parse_value(k)} for k in num_tokens]
    return [
        params.parse_request({**size, params.SELECTION: s}, default) for size in sizes for s in how
    ]


def load_image(path: str | Path) -> Image.Image:
    """Open an image the way vLLM does: RGB, transparency over white."""
    path = Path(path)
    if path.is_dir():
        raise ExplainError(f"{path}: is a directory, not an image")
    if not path.exists():
        raise ExplainError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if image.mode == "RGB" or not transparent:
                return image.convert("RGB")
            rgba = image.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.split()[3])
            return rgb
    except UnidentifiedImageError:
        raise ExplainError(f"{path}: not an image (Pillow cannot identify it)") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ExplainError(f"{path}: cannot read the image ({exc})") from None


# -- one image -------------------------------------------------------------


def _to_uint8(pixels: torch.Tensor, processor) -> torch.Tensor:
    """Preprocessed ``[3, H, W]`` back to displayable ``[H, W, 3]`` uint8."""
    x = pixels.float()
    if getattr(processor, "do_normalize", False):
        mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]
        x = x * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def _patches(tiles: torch.Tensor, patch: int) -> torch.Tensor:
    """``[n, 3, S, S]`` -> ``[n, (S/p)^2, 3*p*p]``: each patch's pixels as its channels.

    In this form :func:`hivtp_vllm.views.stitch` places pixels exactly where
    it places the patches' scores.
    """
    n, c, size, _ = tiles.shape
    side = size // patch
    return (
        tiles.view(n, c, side, patch, side, patch)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(n, side * side, c * patch * patch)
    )


def _unpatch(grid: torch.Tensor, patch: int) -> torch.Tensor:
    """``[H, W, 3*p*p]`` -> the image ``[3, H*p, W*p]``."""
    h, w, _ = grid.shape
    return grid.view(h, w, 3, patch, patch).permute(2, 0, 3, 1, 4).reshape(3, h * patch, w * patch)


def _heat(scores: torch.Tensor) -> torch.Tensor:
    """Importance rank in [0, 1] (1 = best), ties as selection breaks them.

    Ranks, not raw scores: a few tokens take most of CLIP's attention, and
    selection only ever compares ranks.
    """
    flat = scores.reshape(-1).double()
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel())
    return (1 - rank.double() / max(1, flat.numel() - 1)).view(scores.shape)


@dataclass(frozen=True)
class Selection:
    """What one request keeps of one image: K and kept indices per view."""

    request: params.PruningRequest
    num_keep: list[int]
    kept: list[torch.Tensor]

    @property
    def size(self) -> str:
        """The size asked for: ``r = 0.25`` or ``k = 64``."""
        if self.request.num_tokens is not None:
            return f"k = {self.request.num_tokens}"
        return f"r = {self.request.retain_ratio:g}"

    def label(self, named: bool) -> str:
        """The size, after the selection's name (``uniform r = 0.25``) if ``named``."""
        if not named:
            return self.size
        return f"{SELECTION_NAMES[self.request.selection]} {self.size}"


def pick(
    scores: torch.Tensor, num_keep: int, ask: params.PruningRequest, regions: tuple[int, int]
) -> torch.Tensor:
    """Kept flat indices of one view, as the server's ``select_views`` picks them.

    HIVTP ranks ``scores``; the uniform baseline ignores them and spreads K
    over the grid; a view that keeps nothing gets an empty index.
    """
    if num_keep == 0:
        return torch.zeros(0, dtype=torch.long)
    if ask.selection == params.UNIFORM:
        return uniform_tokens(*scores.shape, num_keep)
    return select_tokens(scores, num_keep, regions=regions, global_fraction=ask.global_fraction)


@dataclass(frozen=True)
class ImageResult:
    """Scores per view (named, ``[H, W]``), their pixels, and each selection.

    ``unpadded`` is the high-res grid before a ``max_views`` shrink
    (LLaVA-OneVision's; without one, as LLaVA-NeXT, that of ``scores[1]``);
    its patches are what ``pixels[1]`` shows, so after a shrink a grid cell
    covers more than one patch.
    """

    names: list[str]
    scores: list[torch.Tensor]
    pixels: list[torch.Tensor]
    tile_grid: tuple[int, int] | None
    unpadded: tuple[int, int] | None
    selections: list[Selection]


def explain_image(
    checkpoint: Checkpoint,
    scorer: BandScorer | MergedBandScorer,
    processor,
    image: Image.Image,
    asks: Sequence[params.PruningRequest],
    regions: tuple[int, int],
) -> ImageResult:
    """Score one image's views and run every request's selection on them.

    Anyres layouts (LLaVA-NeXT, LLaVA-OneVision): the processor's tiles are
    the base view and the high-res tiles; scores (and pixels) of the latter
    are stitched and unpadded by the model's own function, with the
    processor's ``image_sizes``, and with ``max_views`` the scores are then
    shrunk as the server shrinks them (:meth:`Checkpoint.resample`). The
    pixels stay at the unpadded grid's resolution: the picture maps each cell
    of the shrunk grid onto its share of them. The merged layout has one
    grid (:func:`_explain_merged`).
    """
    batch = processor(images=[image], return_tensors="pt")
    tile_grid, shapes = checkpoint.layout(image)
    if checkpoint.family.layout == "merged":
        vision = checkpoint.config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size  # px per merged token
        return _explain_merged(scorer, batch, image, shapes[0], unit, asks, regions)
    if checkpoint.family.layout == "pooled":
        return _explain_pooled(checkpoint, scorer, processor, batch, shapes, asks, regions)
    tiles = batch["pixel_values"]
    if tile_grid is not None:
        tiles = tiles[0][: 1 + tile_grid[0] * tile_grid[1]]
    scores = scorer(tiles)
    side, patch = checkpoint.side, checkpoint.config.vision_config.patch_size
    # The patch convolution sees a tile's first side * patch pixels only
    # (SigLIP/14 at 384 px: 378 of them); the picture shows those.
    seen = tiles[:, :, : side * patch, : side * patch].float()
    grids = [scores[0].view(side, side)]
    pixels = [_to_uint8(seen[0], processor)]
    unpadded = None
    if tile_grid is not None:
        size = tuple(int(x) for x in batch["image_sizes"][0])
        highres = stitch(scores[1:, :, None], tile_grid, size)[..., 0]
        unpadded = (highres.shape[0], highres.shape[1])
        grids.append(checkpoint.resample(highres[None])[0])
        picture = stitch(_patches(seen[1:], patch), tile_grid, size)
        pixels.append(_to_uint8(_unpatch(picture, patch), processor))
    if [tuple(g.shape) for g in grids] != shapes:
        raise RuntimeError(f"views {[tuple(g.shape) for g in grids]} are not {shapes}")
    selections = select_views(grids, asks, regions)
    names = ["base", "highres"][: len(grids)]
    return ImageResult(names, grids, pixels, tile_grid, unpadded, selections)


def select_views(
    grids: Sequence[torch.Tensor], asks: Sequence[params.PruningRequest], regions: tuple[int, int]
) -> list[Selection]:
    """Each request's budget split over the views (as the server splits it)
    and its selection on each view's score grid."""
    sizes = [g.numel() for g in grids]
    selections = []
    for ask in asks:
        num_keep = ask.view_budgets(sizes)
        kept = [pick(g, k, ask, regions) for g, k in zip(grids, num_keep, strict=True)]
        selections.append(Selection(ask, num_keep, kept))
    return selections


def _explain_pooled(
    checkpoint: Checkpoint,
    scorer: BandScorer,
    processor,
    batch: Mapping[str, torch.Tensor],
    shapes: list[tuple[int, int]],
    asks: Sequence[params.PruningRequest],
    regions: tuple[int, int],
) -> ImageResult:
    """The pooled layout (Gemma 3): each view's patch scores averaged over
    the projector's pooling blocks (:func:`hivtp_vllm.views.pool_scores`, as
    the server), selected on the pooled grid; the picture is the view the
    tower sees, each cell over its block of pixels."""
    views = batch["pixel_values"]
    if len(views) != len(shapes):
        raise RuntimeError(f"{len(views)} views from the processor, {len(shapes)} expected")
    grids = list(pool_scores(scorer(views), shapes[0][0]))
    pixels = [_to_uint8(view.float(), processor) for view in views]
    selections = select_views(grids, asks, regions)
    names = ["pooled"] + ["crop"] * (len(grids) - 1)
    return ImageResult(names, grids, pixels, None, None, selections)


def _explain_merged(
    scorer: MergedBandScorer,
    batch: Mapping[str, torch.Tensor],
    image: Image.Image,
    grid: tuple[int, int],
    unit: int,
    asks: Sequence[params.PruningRequest],
    regions: tuple[int, int],
) -> ImageResult:
    """The merged layout (Qwen-VL): one merged grid over the resized image
    (``unit`` px a token, 28 for Qwen2.5-VL); the picture is the image
    resized as the processor resizes it."""
    rows, cols = grid
    scores = scorer(batch["pixel_values"], batch["image_grid_thw"]).view(rows, cols)
    shown = image.convert("RGB").resize((cols * unit, rows * unit), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(shown.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(rows * unit, cols * unit, 3)
    selections = []
    for ask in asks:
        (k,) = ask.view_budgets([rows * cols])
        selections.append(Selection(ask, [k], [pick(scores, k, ask, regions)]))
    return ImageResult(["merged"], [scores], [pixels], None, None, selections)


# -- output ----------------------------------------------------------------


def _grid_names(result: ImageResult) -> list[str]:
    """Each view's name and grid, and where a shrunk grid comes from."""
    out = []
    for name, grid in zip(result.names, result.scores, strict=True):
        text = f"{VIEW_NAMES[name]} {grid.shape[0]} x {grid.shape[1]}"
        if name == "highres" and tuple(grid.shape) != result.unpadded:
            text += f" (shrunk from {result.unpadded[0]} x {result.unpadded[1]})"
        out.append(text)
    return out


def _named(result: ImageResult) -> bool:
    """Whether labels name the selection: not when every panel is HIVTP."""
    return any(s.request.selection != params.HIVTP for s in result.selections)


def _panels(result: ImageResult) -> list[Panel]:
    """One panel per request; the selections of one size drawn close together.

    Requests come per size, one for each selection in a fixed order
    (:func:`parse_requests`), so a panel starts a size's group exactly when
    its selection is the first one.
    """
    total = sum(g.numel() for g in result.scores)
    named = _named(result)
    first = result.selections[0].request.selection
    panels = []
    for s in result.selections:
        captions = [
            f"{name}: K = {k} of {g.numel()}"
            for name, g, k in zip(_grid_names(result), result.scores, s.num_keep, strict=True)
        ]
        title = f"{s.label(named)}: K = {' + '.join(map(str, s.num_keep))} of {total}"
        joined = s.request.selection != first
        panels.append(Panel(title, s.kept, captions if len(captions) > 1 else [], joined))
    return panels


def _document(result: ImageResult, layout: list[dict]) -> dict:
    """The JSON's views and selections; ``layout`` is where render put each grid."""
    views = []
    for name, grid in zip(result.names, result.scores, strict=True):
        view = {"name": name, "grid": list(grid.shape), "tokens": grid.numel()}
        if name == "highres":
            view["tile_grid"] = list(result.tile_grid)
            view["unpadded_grid"] = list(result.unpadded)
        views.append({**view, "scores": grid.reshape(-1).tolist()})
    selections = []
    named = _named(result)
    for s, placed in zip(result.selections, layout, strict=True):
        ask = s.request
        selections.append(
            {
                "label": s.label(named),
                "selection": ask.selection,
                "retain_ratio": ask.retain_ratio,
                "num_tokens": ask.num_tokens,
                "global_fraction": ask.global_fraction,
                "K": sum(s.num_keep),
                "panel_box": placed["box"],
                "views": [
                    {
                        "name": v["name"],
                        "grid": v["grid"],
                        "K": k,
                        "kept": kept.tolist(),
                        "png_box": box,
                    }
                    for v, k, kept, box in zip(
                        views, s.num_keep, s.kept, placed["views"], strict=True
                    )
                ],
            }
        )
    return {"views": views, "selections": selections}


def _to_json(value: object, depth: int = 0) -> str:
    """JSON with one key per line but each list of numbers on one line.

    ``json.dumps(indent=...)`` would put every kept index and every score on
    a line of its own: thousands of lines nobody can read.
    """
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_to_json(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + _to_json(v, depth + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value)


def _stems(images: Sequence[str | Path]) -> list[str]:
    """Output names: the image's stem, ``-2``, ``-3``... where stems repeat."""
    seen: dict[str, int] = {}
    out = []
    for image in images:
        stem = Path(image).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


@dataclass(frozen=True)
class _Plan:
    """Everything checked before the tower is read: a bad input costs little."""

    server: params.ServerOptions
    asks: list[params.PruningRequest]
    checkpoint: Checkpoint
    band: tuple[int, int]
    images: list[Image.Image]


def _plan(
    model: str,
    images: Sequence[str | Path],
    ratios: Sequence[object],
    num_tokens: Sequence[object],
    selections: Sequence[object],
    options: Mapping[str, object] | None,
    device: str,
) -> _Plan:
    server = params.parse_server(options)
    if not ratios and not num_tokens:
        ratios = DEFAULT_RATIOS
    asks = parse_requests(ratios, num_tokens, server.default, selections)
    if not images:
        raise ExplainError("no image given")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ExplainError(f"unknown torch device {device!r} (try cpu or cuda)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ExplainError(f"device {device!r} asked for, but torch sees no CUDA device")
    checkpoint = open_checkpoint(model)
    band = checkpoint.band(server)
    loaded = [load_image(path) for path in images]
    for path, image in zip(images, loaded, strict=True):
        shapes = checkpoint.layout(image)[1]
        sizes = [h * w for h, w in shapes]
        if min(sizes) < 1:  # LLaVA-NeXT unpads a sliver of an image to nothing
            raise ExplainError(
                f"{path}: {image.width} x {image.height} px leaves an empty "
                f"{shapes[-1][0]} x {shapes[-1][1]} high-resolution grid; the model cannot "
                "take an image this thin"
            )
        for ask in asks:
            try:
                ask.view_budgets(sizes)  # a budget may fit one image and not another
            except params.HivtpParamError as exc:
                raise params.HivtpParamError(exc.key, f"{path}: {exc}") from None
    return _Plan(server, asks, checkpoint, band, loaded)


def explain(
    model: str,
    images: Sequence[str | Path],
    *,
    ratios: Sequence[object] = (),
    num_tokens: Sequence[object] = (),
    selections: Sequence[object] = (),
    options: Mapping[str, object] | None = None,
    out_dir: str | Path = ".",
    device: str = "cpu",
    show_progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> list[tuple[Path, Path]]:
    """Write ``<stem>.hivtp.png`` and ``<stem>.hivtp.json`` per image; return their paths.

    ``ratios`` and ``num_tokens`` (numbers or their strings) give one panel
    each, ratios first; neither means 0.5, 0.25 and 0.1. ``selections``
    (``"hivtp"``, ``"uniform"``; none: the options' ``hivtp_selection``,
    else HIVTP) draw each of those panels once per selection, side by side:
    a uniform panel keeps the uniform baseline of the same K per view over
    the same heatmap, shown for comparison. ``options`` are the server's keys
    (``hivtp_regions``, ``hivtp_layer_start``, ``hivtp_num_layers``,
    ``hivtp_global_fraction``, ``hivtp_selection``). Every input is checked
    before the tower is read, and nothing is written for a bad one.
    """
    if log is None:
        from tqdm.auto import tqdm

        log = tqdm.write  # prints above a progress bar, not through it
    plan = _plan(model, images, ratios, num_tokens, selections, options, device)
    checkpoint, band = plan.checkpoint, plan.band
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = checkpoint.image_processor()
    start = time.perf_counter()
    scorer = checkpoint.scorer_class(checkpoint, band, device, show_progress)
    scored = checkpoint.scored_layers(band)
    last = max(scored)
    log(f"{checkpoint.label}: vision layers 0-{last} read in {time.perf_counter() - start:.1f} s")
    which = f"{scored[0]}-{last}" if scored == tuple(range(scored[0], last + 1)) else scored
    if len(scored) == 1:
        which = f"{last}"
    legend = (
        f"importance: attention received in vision layers {which}, ranked   "
        "outlined: kept   dimmed: pruned"
    )
    if any(ask.selection == params.UNIFORM for ask in plan.asks):
        legend += "   uniform: evenly spread, importance not used"
    about = {
        "checkpoint": checkpoint.name,
        "architecture": checkpoint.architecture,
        "layer_start": band[0],
        "num_layers": band[1],
        "regions": list(plan.server.regions),
    }
    written = []
    items = zip(images, plan.images, _stems(images), strict=True)
    show = show_progress if len(images) > 1 else False
    for path, image, stem in progress(items, total=len(images), desc="explain", show=show):
        start = time.perf_counter()
        result = explain_image(checkpoint, scorer, processor, image, plan.asks, plan.server.regions)
        header = (
            f"{Path(path).name} ({image.width} x {image.height} px) as {checkpoint.label} "
            "sees it, after its own image processor"
        )
        picture, layout = render(header, legend, _views(result), _panels(result))
        png, report = out / f"{stem}.hivtp.png", out / f"{stem}.hivtp.json"
        picture.save(png)
        document = {"image": str(path), "image_size": [image.width, image.height], **about}
        document |= {"png": png.name, **_document(result, layout)}
        report.write_text(_to_json(document) + "\n")
        log(f"{path}: wrote {png} and {report} in {time.perf_counter() - start:.1f} s")
        written.append((png, report))
    return written


def _views(result: ImageResult) -> list[View]:
    return [
        View(name, pixels, _heat(grid))
        for name, pixels, grid in zip(result.names, result.pixels, result.scores, strict=True)
    ]
