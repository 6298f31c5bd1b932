"""The picture of ``hivtp-vllm explain``: heatmap panels, kept patches outlined.

Pillow and torch only (no matplotlib), and the geometry is ours: one pixel of
the preprocessed image is one pixel of the picture, and a grid of ``H x W``
cells over a view of ``P x Q`` pixels gives row ``i`` the pixel rows
``floor(i P / H)`` to ``floor((i + 1) P / H) - 1`` (columns alike). For a
grid of patches that is exactly the ``patch x patch`` block of each patch;
for LLaVA-OneVision's shrunk high-res grid each cell gets its proportional
share of the unpadded region it was resampled from (cells then differ by a
pixel in size). A kept cell's outline is the 1-pixel border of its cell, in
pure cyan. Neither the heat overlay (inferno, blended half and half with
the image), the dimmed pruned cells, the text nor the panels can produce
that exact colour, so the outlines can be found by pixel, which the tests
do. :func:`render` returns where every panel and grid landed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["OUTLINE", "BACKGROUND", "PANEL", "View", "Panel", "render", "colormap"]

OUTLINE = (0, 255, 255)
BACKGROUND = (255, 255, 255)
PANEL = (236, 236, 236)
TEXT = (20, 20, 20)
ALPHA = 0.5  # share of the heat colour in a cell
DIM = 0.45  # brightness left to a pruned cell
MARGIN, GAP, INNER = 12, 16, 10
JOINED_GAP = 4  # between panels of one group (HIVTP and uniform at one size)
# matplotlib's "inferno" at 0, 1/8, ..., 1: dark is unimportant, yellow is
# important; readable over photos and for colour-blind viewers.
_INFERNO = torch.tensor(
    [
        (0, 0, 4),
        (33, 12, 74),
        (87, 16, 110),
        (138, 34, 106),
        (188, 55, 84),
        (228, 90, 49),
        (249, 142, 9),
        (249, 203, 53),
        (252, 255, 164),
    ],
    dtype=torch.float32,
)


@dataclass(frozen=True)
class View:
    """One grid of one image: its preprocessed pixels and each cell's heat.

    ``pixels`` is uint8 ``[P, Q, 3]`` (``[H*p, W*p, 3]`` for a grid of
    ``p``-pixel patches); ``heat`` is ``[H, W]`` in [0, 1], ``H <= P`` and
    ``W <= Q``.
    """

    name: str
    pixels: torch.Tensor
    heat: torch.Tensor


@dataclass(frozen=True)
class Panel:
    """One requested ratio or budget: a title and the kept indices per view.

    ``joined``: drawn close to the panel before it, as one group (the same
    size picked by HIVTP and by the uniform baseline).
    """

    title: str
    kept: Sequence[torch.Tensor]
    captions: Sequence[str] = field(default_factory=list)
    joined: bool = False


def colormap(t: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> float RGB in [0, 255] (piecewise linear inferno)."""
    x = t.clamp(0, 1).float() * (len(_INFERNO) - 1)
    low = x.floor().long().clamp(max=len(_INFERNO) - 2)
    frac = (x - low)[..., None]
    return _INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac


def _cells(pixels: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of ``pixels`` split into ``count`` cells: each pixel's
    cell, and whether the pixel is the first or last of its cell."""
    if not 0 < count <= pixels:
        raise ValueError(f"cannot split {pixels} pixels into {count} cells")
    bounds = torch.arange(count + 1) * pixels // count
    at = torch.arange(pixels)
    cell = torch.bucketize(at, bounds[1:], right=True)
    return cell, (at == bounds[cell]) | (at == bounds[cell + 1] - 1)


def compose(view: View, kept: torch.Tensor) -> Image.Image:
    """The view's pixels under its heat, pruned cells dimmed, kept cells outlined."""
    h, w = view.heat.shape
    row, edge_y = _cells(view.pixels.shape[0], h)
    col, edge_x = _cells(view.pixels.shape[1], w)

    def up(t: torch.Tensor) -> torch.Tensor:
        return t[row][:, col]

    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[kept] = True
    mask = up(mask.view(h, w))
    img = view.pixels.float() * (1 - ALPHA) + up(colormap(view.heat)) * ALPHA
    img = torch.where(mask[..., None], img, img * DIM)
    out = img.round().clamp(0, 255).to(torch.uint8)
    border = edge_y[:, None] | edge_x[None, :]
    out[mask & border] = torch.tensor(OUTLINE, dtype=torch.uint8)
    return Image.fromarray(out.numpy())


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom


def render(
    header: str, legend: str, views: Sequence[View], panels: Sequence[Panel]
) -> tuple[Image.Image, list[dict]]:
    """The whole picture, and per panel its box and each view's grid box.

    ``header`` is the first line; ``legend`` follows a low-to-high colour
    bar on the second. Boxes are ``[left, top, right, bottom]`` in picture
    pixels (right and bottom exclusive). Views sit side by side in a panel
    when they are taller than wide together, else one above the other.
    Panels sit in one row, ``GAP`` apart, or ``JOINED_GAP`` after the panel
    before when ``joined``.
    """
    title_font, caption_font, header_font = _font(16), _font(13), _font(14)
    sizes = [(v.pixels.shape[1], v.pixels.shape[0]) for v in views]
    side_by_side = sum(w for w, _ in sizes) <= sum(h for _, h in sizes)
    caption_h = _text_size(caption_font, "Kg")[1] + 6 if any(p.captions for p in panels) else 0
    title_h = _text_size(title_font, "Kg")[1] + 10
    # Column width of each view: its grid or its widest caption.
    cols = [
        max([w] + [_text_size(caption_font, p.captions[i])[0] for p in panels if p.captions])
        for i, (w, _) in enumerate(sizes)
    ]
    if side_by_side:
        content_w = sum(cols) + INNER * (len(views) - 1)
        content_h = caption_h + max(h for _, h in sizes)
    else:
        content_w = max(cols)
        content_h = sum(caption_h + h for _, h in sizes) + INNER * (len(views) - 1)
    widest_title = max(_text_size(title_font, p.title)[0] for p in panels)
    panel_w = max(content_w, widest_title) + 2 * INNER
    panel_h = title_h + content_h + 2 * INNER

    line_h = _text_size(header_font, "Kg")[1] + 8
    bar_w, low_w = 120, _text_size(header_font, "low ")[0]
    legend_x = MARGIN + low_w + bar_w + 6
    legend = f"high   {legend}"
    lefts = [MARGIN]
    for panel in panels[1:]:
        lefts.append(lefts[-1] + panel_w + (JOINED_GAP if panel.joined else GAP))
    page_w = max(
        lefts[-1] + panel_w + MARGIN,
        2 * MARGIN + _text_size(header_font, header)[0],
        MARGIN + legend_x + _text_size(header_font, legend)[0],
    )
    page_h = MARGIN + 2 * line_h + GAP + panel_h + MARGIN
    page = Image.new("RGB", (page_w, page_h), BACKGROUND)
    draw = ImageDraw.Draw(page)

    draw.text((MARGIN, MARGIN), header, fill=TEXT, font=header_font)
    second = MARGIN + line_h
    draw.text((MARGIN, second), "low", fill=TEXT, font=header_font)
    bar = colormap(torch.linspace(0, 1, bar_w))[None].expand(10, -1, -1)
    bar_img = Image.fromarray(bar.round().to(torch.uint8).numpy())
    page.paste(bar_img, (MARGIN + low_w, second + 4))
    draw.text((legend_x, second), legend, fill=TEXT, font=header_font)

    layout = []
    top = MARGIN + 2 * line_h + GAP
    for left, panel in zip(lefts, panels, strict=True):
        draw.rectangle([left, top, left + panel_w - 1, top + panel_h - 1], fill=PANEL)
        draw.text((left + INNER, top + INNER), panel.title, fill=TEXT, font=title_font)
        x, y = left + INNER, top + INNER + title_h
        boxes = []
        for i, view in enumerate(views):
            if panel.captions:
                draw.text((x, y), panel.captions[i], fill=TEXT, font=caption_font)
            w, h = sizes[i]
            page.paste(compose(view, panel.kept[i]), (x, y + caption_h))
            boxes.append([x, y + caption_h, x + w, y + caption_h + h])
            if side_by_side:
                x += cols[i] + INNER
            else:
                y += caption_h + h + INNER
        layout.append({"box": [left, top, left + panel_w, top + panel_h], "views": boxes})
    return page, layout
