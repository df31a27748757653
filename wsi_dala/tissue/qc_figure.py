"""``qc.png``: what tissue detection and quality control saw, for a person to check at a glance.

The slide's thumbnail with the tissue outline, marker ink, folds and out-of-focus tiles in colours
that do not occur in H&E, each named with its area in the legend. Framed by ``picture_frame``: a few bytes a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsi_dala.core.picture_frame import enlarged, legend, save_framed_png

TISSUE_OUTLINE_RGB = (0, 140, 60)
INK_RGB = (255, 200, 0)
FOLD_RGB = (0, 200, 255)
BLUR_RGB = (255, 0, 160)
LEGEND_PX = 190


def _unit(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """An 8-bit colour as matplotlib wants it."""
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)


@dataclass(frozen=True)
class QCPicture:
    """The masks on the thumbnail's grid, and the areas the legend reports."""

    thumbnail: np.ndarray  # [h, w, 3] uint8
    tissue: np.ndarray  # [h, w] bool
    ink: np.ndarray
    fold: np.ndarray
    blur: np.ndarray  # out-of-focus tiles, painted on the thumbnail's grid
    areas_mm2: dict[str, float]  # "tissue", "ink", "fold", "blur"


def blurred_tiles_mask(
    shape: tuple[int, int], origins: np.ndarray, tile_size_l0: float, downsample: float
) -> np.ndarray:
    """The thumbnail pixels covered by the given tiles (level-0 top-left corners)."""
    mask = np.zeros(shape, dtype=bool)
    side = max(1, round(tile_size_l0 / downsample))
    for x, y in np.round(np.asarray(origins, dtype=np.float64).reshape(-1, 2) / downsample).astype(np.int64):
        mask[max(0, y) : max(0, y + side), max(0, x) : max(0, x + side)] = True
    return mask


def render_qc(picture: QCPicture, path: Path, title: str) -> None:
    """Write the QC picture (atomically) with a legend of areas."""
    from matplotlib.patches import Patch

    image = picture.thumbnail[..., :3].copy()
    for mask, rgb, weight in (
        (picture.blur, BLUR_RGB, 0.35),
        (picture.fold, FOLD_RGB, 0.55),
        (picture.ink, INK_RGB, 0.6),
    ):
        blended = (1 - weight) * image[mask] + weight * np.asarray(rgb, dtype=np.float32)
        image[mask] = np.round(blended).astype(np.uint8)
    outline = picture.tissue & ~ndimage.binary_erosion(picture.tissue, iterations=1, border_value=0)
    image[outline] = TISSUE_OUTLINE_RGB
    del outline
    image = enlarged(image)
    areas = {name: _area_text(value) for name, value in picture.areas_mm2.items()}
    handles = [
        Patch(facecolor="none", edgecolor=_unit(TISSUE_OUTLINE_RGB), label=f"tissue {areas['tissue']}"),
        Patch(color=_unit(INK_RGB), label=f"ink {areas['ink']}"),
        Patch(color=_unit(FOLD_RGB), label=f"fold {areas['fold']}"),
        Patch(color=_unit(BLUR_RGB), label=f"out of focus {areas['blur']}"),
    ]
    save_framed_png(image, path, title, right=legend(handles, size_px=LEGEND_PX))


def _area_text(mm2: float) -> str:
    """Two decimals, but never "0.00 mm²" for something that is there (one flagged tile is about 0.01 mm²)."""
    return f"{mm2:.2f} mm²" if mm2 == 0 or mm2 >= 0.01 else "< 0.01 mm²"
