"""Quality control per tile: out of focus, folded, inked.

**Blur** is measured on the tile's own pixels, as a ratio of detail at two physical scales: the median
absolute Laplacian of the tile resampled to about 2 µm/px over the same at twice that (about 4 µm/px;
nuclei are 5-10 µm across, so in-focus tissue has edges at 2 µm that blur takes away first). Both
grow with contrast, so the ratio does not: a pale slide is not "blurred". For a smooth image the
ratio tends to 1/4 (the Laplacian scales with 1/h²); we map it to a sharpness ``(ratio - 1/4) / (3/4)``
(0: no detail; in-focus tissue is near 1, noisy tiles above). Finer scales are left out on purpose:
there JPEG block noise, sensor noise and 8-bit quantisation look like detail, and a tile blurred by
3 µm reads as sharp (measured: the half/quarter-resolution ratio of a CMU-1 tile blurred by σ = 4 µm
and given σ = 3 grey levels of noise is as high as an in-focus tile's).

Measured on OpenSlide's CMU-1 crop (224 px tiles at 0.5 µm/px, noise σ = 3, JPEG q80 after blurring):
in focus 0.76-1.17 (5th-95th percentile, median 0.95); Gaussian blur σ = 1 µm 0.50, σ = 2 µm 0.23,
σ = 3-4 µm 0.15-0.17 (medians).

A part is *blurred* when its sharpness is below ``blur_drop`` times the median of the slide's
tiles (the slide is judged against itself, whatever its texture and scanner), or below ``blur_floor``
whatever the slide (so a slide out of focus everywhere is still reported). The blur score stored per
tile is the share of its tissue judged out of focus: each tile is judged in 4 x 4 parts (parts that
are glass are not judged), because the mean over a whole tile is ruled by its sharp part, and a tile
two-thirds out of focus would read as sharp. A tile is flagged when ``max_blur_fraction`` of it is.

**Folds and ink** come from the low-resolution masks (:mod:`wsi_dala.tissue`): the fraction of each
tile they cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsi_dala.config import QCConfig
from wsi_dala.store import QC_PARTS

BLUR, FOLD, INK = 1, 2, 4  # bits of the per-tile flags
SMOOTH_RATIO = 0.25  # the detail ratio of an image without detail
DETAIL_UM = 2.0  # the finer of the two scales compared, in µm per pixel
MIN_SIDE_PX = 12  # the coarser image must keep at least this many pixels a side
BLOCKS = QC_PARTS  # each tile is judged in BLOCKS x BLOCKS parts: a tile half out of focus is found
MIN_BLOCK_PX = 6  # ... each at least this many pixels a side at the coarser scale
GLASS_SHARE = 0.92  # a pixel brighter than this share of the glass (green channel) is glass
MIN_PART_TISSUE = 0.75  # a part with less tissue than this is not judged (a tissue edge is not blur)


def tile_sharpness(tiles: np.ndarray, tile_mpp: float, glass_green: float = 255.0) -> np.ndarray:
    """Sharpness per part of each tile of a uint8 batch [n, T, T, 3] at ``tile_mpp``: [n, b, b] float32,
    0 no detail, about 1 in focus, NaN where the part is mostly glass. Vectorised on the batch."""
    if len(tiles) == 0:
        return np.zeros((0, 1, 1), dtype=np.float32)
    green: np.ndarray = tiles[..., 1]  # haematoxylin and eosin both absorb green: most of the contrast
    halvings = max(0, round(np.log2(DETAIL_UM / tile_mpp)))
    scale = 1
    if halvings > 0:  # box sums in integers (255 x 4^k fits uint16 for k <= 4): no float copy of the tile
        green = green.astype(np.uint16)
        while halvings > 0 and scale < 16 and green.shape[1] // 2 >= 2 * MIN_SIDE_PX:
            green, halvings, scale = _sum_halve(green), halvings - 1, scale * 4
    green = green.astype(np.float32) / np.float32(scale)
    while halvings > 0 and green.shape[1] // 2 >= 2 * MIN_SIDE_PX:
        green, halvings = _halve(green), halvings - 1
    coarse = _halve(green)
    blocks = max(1, min(BLOCKS, coarse.shape[1] // MIN_BLOCK_PX))
    fine_detail = _block_median(_abs_laplacian(green), blocks)
    coarse_detail = _block_median(_abs_laplacian(coarse), blocks)
    ratio = fine_detail / np.maximum(coarse_detail, 1e-3)
    sharpness = np.maximum((ratio - SMOOTH_RATIO) / (1 - SMOOTH_RATIO), 0.0)
    tissue_share = _block_mean((coarse <= GLASS_SHARE * glass_green).astype(np.float32), blocks)
    return np.where(tissue_share >= MIN_PART_TISSUE, sharpness, np.nan).astype(np.float32)


def _sum_halve(images: np.ndarray) -> np.ndarray:
    """2 x 2 box sum, in the input's integer type."""
    h2, w2 = images.shape[1] // 2 * 2, images.shape[2] // 2 * 2
    a = images[:, :h2, :w2]
    return a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]


def _halve(images: np.ndarray) -> np.ndarray:
    """2 x 2 box average (four strided views added: numpy reduces small inner axes slowly)."""
    h2, w2 = images.shape[1] // 2 * 2, images.shape[2] // 2 * 2
    a = images[:, :h2, :w2]
    return (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]) * np.float32(0.25)


def _abs_laplacian(images: np.ndarray) -> np.ndarray:
    """|4-neighbour Laplacian|, edge pixels repeated so the map keeps the image's size."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = padded[:, 1:-1, 1:-1]
    return np.abs(4 * centre - padded[:, :-2, 1:-1] - padded[:, 2:, 1:-1] - padded[:, 1:-1, :-2] - padded[:, 1:-1, 2:])


def _block_median(images: np.ndarray, blocks: int) -> np.ndarray:
    """Median of each of blocks x blocks parts: a tissue edge or a colour boundary crossing a part is a
    thin line of large values, which the median ignores and a mean does not (it would read as coarse detail,
    and the part as blurred)."""
    n, h, w = images.shape
    bh, bw = h // blocks, w // blocks
    trimmed = images[:, : bh * blocks, : bw * blocks].reshape(n, blocks, bh, blocks, bw)
    return np.median(trimmed.transpose(0, 1, 3, 2, 4).reshape(n, blocks, blocks, bh * bw), axis=-1)


def _block_mean(images: np.ndarray, blocks: int) -> np.ndarray:
    """Mean of each of blocks x blocks parts (the last pixels of an uneven side go to no part)."""
    n, h, w = images.shape
    bh, bw = h // blocks, w // blocks
    trimmed = images[:, : bh * blocks, : bw * blocks]
    return trimmed.reshape(n, blocks, bh, blocks, bw).mean(axis=(2, 4))


@dataclass(frozen=True)
class QCResult:
    """Per-tile QC of one slide, and how it was judged."""

    blur: np.ndarray  # [N] share of the tile's tissue that is out of focus, in [0, 1]
    flags: np.ndarray  # [N] uint8, bits BLUR | FOLD | INK
    median_sharpness: float


def judge(sharpness: np.ndarray, fold_fraction: np.ndarray, ink_fraction: np.ndarray, config: QCConfig) -> QCResult:
    """Flag each tile from its measurements; blur is judged part by part against the slide's own tiles.

    ``sharpness`` is [N, b, b] (NaN: glass, or not measured).
    """
    n = len(sharpness)
    parts = sharpness.reshape(n, int(np.prod(sharpness.shape[1:])))
    measured = parts[np.isfinite(parts)]
    median = float(np.median(measured)) if measured.size else float("nan")
    flags = np.zeros(n, dtype=np.uint8)
    blur = np.zeros(n, dtype=np.float32)
    if measured.size:
        with np.errstate(invalid="ignore"):
            blurred_parts = (parts < config.blur_drop * median) | (parts < config.blur_floor)
        tissue_parts = np.isfinite(parts).sum(axis=1)
        blur = np.where(tissue_parts > 0, blurred_parts.sum(axis=1) / np.maximum(tissue_parts, 1), 0.0)
        blur = blur.astype(np.float32)
        flags[blur >= config.max_blur_fraction] |= BLUR
    flags[fold_fraction > config.max_fold_fraction] |= FOLD
    flags[ink_fraction > config.max_ink_fraction] |= INK
    return QCResult(blur=np.nan_to_num(blur, nan=0.0), flags=flags, median_sharpness=median)
