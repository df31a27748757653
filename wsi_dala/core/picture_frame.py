"""Slide-sized pictures framed with a title and a key, without drawing the picture through matplotlib.

matplotlib needs about 90 bytes a pixel to save a figure (float RGBA buffers, the Agg canvas, the
PNG of the whole figure): a 6-Mpx thumbnail of a 20 x 15 mm slide took 0.5 GB that way, so the
run's peak memory grew with the slide's area. Here matplotlib draws only the strips around the
picture (title, colour bar, legend), whose pixels grow with the picture's side, not its area, and
Pillow pastes them around the picture and writes the PNG at a few bytes a pixel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from wsi_dala.core.fileio import save_png_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
TITLE_PX = 28
MARGIN_PX = 10
TITLE_FONT_PT = 9
MIN_SIDE_KEY_PX = 240  # a colour bar or legend beside a very flat picture still gets this height
MIN_DRAWN_PX = 600  # a slide picture smaller than this on its longest side is drawn enlarged

DrawStrip = Callable[["Figure"], None]


@dataclass(frozen=True)
class Key:
    """Something drawn beside (``right``) or under (``below``) the picture, ``size_px`` across."""

    draw: DrawStrip
    size_px: int


def enlarged(image: np.ndarray, min_px: int = MIN_DRAWN_PX) -> np.ndarray:
    """A small slide picture (a small slide, or a coarse thumbnail) drawn at least ``min_px`` on its longest
    side, whole pixels kept square and sharp, so the picture and its keys stay readable."""
    height, width = image.shape[:2]
    scale = min_px / max(height, width, 1)
    if scale <= 1:
        return image
    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST))


def draw_strip(width_px: int, height_px: int, draw: DrawStrip) -> Image.Image:
    """A white ``width_px`` x ``height_px`` strip with whatever ``draw`` puts on a bare figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    draw(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def title_width_px(title: str) -> int:
    """Pixels the title needs at TITLE_FONT_PT (measured, so a long slide name is not cut)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1), dpi=DPI)
    text = figure.text(0, 0, title, fontsize=TITLE_FONT_PT)
    extent = text.get_window_extent(FigureCanvasAgg(figure).get_renderer())
    return int(np.ceil(extent.width)) + 2 * MARGIN_PX


def save_framed_png(
    picture: np.ndarray,
    path: str | os.PathLike[str],
    title: str,
    right: Key | None = None,
    below: Key | None = None,
) -> None:
    """``picture`` (RGB uint8) with ``title`` above, ``right`` beside and ``below`` under it, saved
    atomically as PNG."""
    height, width = picture.shape[:2]
    right_px = right.size_px if right is not None else 0
    below_px = below.size_px if below is not None else 0
    side_height = max(height, MIN_SIDE_KEY_PX) if right is not None else height
    content_width = max(width + right_px, title_width_px(title))
    canvas = Image.new(
        "RGB", (content_width + 2 * MARGIN_PX, TITLE_PX + max(side_height, height) + below_px + 2 * MARGIN_PX), "white"
    )

    def draw_title(figure: Figure) -> None:
        figure.text(0.5, 0.5, title, ha="center", va="center", fontsize=TITLE_FONT_PT)

    title_strip = draw_strip(content_width, TITLE_PX, draw_title)
    canvas.paste(title_strip, (MARGIN_PX, MARGIN_PX))
    top = MARGIN_PX + TITLE_PX
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture[..., :3])), (MARGIN_PX, top))
    if right is not None:
        canvas.paste(draw_strip(right_px, side_height, right.draw), (MARGIN_PX + width, top))
    if below is not None:
        canvas.paste(draw_strip(width, below_px, below.draw), (MARGIN_PX, top + max(side_height, height)))
    save_png_atomic(path, canvas)


def colour_bar(colour_map: str, top: float, label: str) -> Key:
    """A vertical colour bar from 0 to ``top`` with ``label`` along it."""

    def draw(figure: Figure) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        width_in, height_in = figure.get_size_inches()
        bar_px, pad_px = 16, 14
        axes = figure.add_axes(
            (pad_px / (width_in * DPI), 6 / (height_in * DPI), bar_px / (width_in * DPI), 1 - 12 / (height_in * DPI))
        )
        figure.colorbar(ScalarMappable(cmap=colour_map, norm=Normalize(0, top)), cax=axes, label=label)

    return Key(draw, 96)


def legend(handles: list, size_px: int, columns: int = 1) -> Key:
    """matplotlib legend ``handles`` in the strip's top left corner."""

    def draw(figure: Figure) -> None:
        figure.legend(handles=handles, loc="upper left", fontsize=8, frameon=False, ncols=columns)

    return Key(draw, size_px)
