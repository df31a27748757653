"""``overlay.png`` and ``overview.png``: a heatmap layer drawn over the slide's thumbnail, in bands.

The layer's cells are interpolated bilinearly between their centres (the map, not its cell grid), its
outline kept at the cells' own (no value bleeds onto glass); coloured with inferno over the tissue, clear
where there is none; QC-flagged cells hatched in cyan (a colour in neither inferno nor H&E). Rows are
coloured a band at a time, so a slide-sized picture needs no full-size float copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_dala.core.picture_frame import colour_bar, enlarged, legend, save_framed_png

RENDER_BAND_ROWS = 256  # overlay rows coloured at once


HATCH_RGB = (0, 230, 255)  # cyan: not in the inferno scale, not in H&E


FLAGGED_CELL = 0.5  # a cell at least this much covered by flagged tiles is drawn hatched


OVERLAY_MAX_PX = 4096  # longest side of an overlay picture (a 16-Mpx PNG: ~50 MB to compose and save)


def _at_most(image: np.ndarray, longest_px: int) -> np.ndarray:
    """``image`` shrunk (box filter) so its longest side is at most ``longest_px``; as is when it already is."""
    height, width = image.shape[:2]
    if max(height, width) <= longest_px:
        return image
    from PIL import Image

    scale = longest_px / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def render_overlay(
    thumbnail: np.ndarray,
    layer: np.ndarray,
    path: Path,
    title: str,
    flagged: np.ndarray | None = None,
    label: str = "tumour probability",
    top: float = 1.0,
    colour_map: str = "inferno",
) -> None:
    """Heatmap (0-``top``, no colour where there is no value) over the thumbnail, with a colour bar.

    Cells are interpolated bilinearly between their centres (values and coverage apart, so no value
    bleeds onto glass): the picture shows the map, not the cell grid. Cells mostly covered by QC-flagged
    tiles (``flagged`` ≥ FLAGGED_CELL) are hatched. The picture is composed here and framed by
    ``picture_frame`` (matplotlib draws only the title and the colour bar), so memory stays a few bytes
    a pixel.
    """
    from matplotlib import colormaps

    thumbnail = enlarged(_at_most(thumbnail, OVERLAY_MAX_PX))
    height, width = thumbnail.shape[:2]
    valid, value = _resample(layer, (height, width))
    blend = np.empty((height, width, 3), dtype=np.uint8)
    for first in range(0, height, RENDER_BAND_ROWS):  # the colours are 64 bytes a pixel: a band at a time
        rows = slice(first, first + RENDER_BAND_ROWS)
        scaled = np.clip(value[rows] / top, 0, 1)[..., None]
        coloured = colormaps[colour_map](scaled[..., 0])[..., :3] * 255
        alpha = np.where(valid[rows, :, None], 0.15 + 0.6 * scaled, 0.0)  # low probability: the tissue shows
        blend[rows] = ((1 - alpha) * thumbnail[rows] + alpha * coloured).astype(np.uint8)
    del valid, value
    hatched = _hatch_mask(flagged, (height, width)) if flagged is not None else None
    if hatched is not None:
        blend[hatched] = HATCH_RGB
    below = None
    if hatched is not None and hatched.any():
        from matplotlib.patches import Patch

        key = Patch(
            facecolor="white",
            edgecolor=(HATCH_RGB[0] / 255, HATCH_RGB[1] / 255, HATCH_RGB[2] / 255),
            hatch="///",
            label="QC-flagged tiles",
        )
        below = legend([key], size_px=24)
    del hatched
    save_framed_png(blend, path, title, right=colour_bar(colour_map, top, label), below=below)


def _resample(layer: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where a value is (nearest cell: the map's own outline) and the value there, interpolated bilinearly
    from the neighbouring cells that have one (normalised convolution: glass contributes nothing)."""
    from PIL import Image

    height, width = shape
    has_value = np.isfinite(layer)

    def resize(image: np.ndarray, method: Image.Resampling) -> np.ndarray:
        return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), method))

    weight = resize(has_value, Image.Resampling.BILINEAR)
    total = resize(np.where(has_value, layer, 0.0), Image.Resampling.BILINEAR)
    valid = resize(has_value, Image.Resampling.NEAREST) > 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(weight > 1e-6, total / weight, 0.0)
    return valid, np.where(valid, value, 0.0)


def _hatch_mask(flagged: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of diagonal hatch lines (every 6th diagonal) over cells flagged by QC."""
    from PIL import Image

    height, width = shape
    cells = np.nan_to_num(flagged, nan=0.0) >= FLAGGED_CELL
    resized = np.asarray(Image.fromarray(cells).resize((width, height), Image.Resampling.NEAREST))
    rows, cols = (np.arange(height) % 6).astype(np.uint8), (np.arange(width) % 6).astype(np.uint8)
    return resized & ((rows[:, None] + cols[None, :]) % 6 == 0)  # (row + col) % 6, a byte a pixel
