"""Tile-grid geometry at a target µm/px: which level to read, how big a read is, where tiles lie.

Pure functions over numbers and arrays, so they are cheap to test exactly. Coordinates are level-0
pixels (QuPath's frame); sizes at the read level are called ``*_level_px``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_dala.core.errors import ResolutionError


@dataclass(frozen=True)
class LevelChoice:
    """Where to read from and how much to resize to serve ``target_mpp``."""

    level: int
    level_mpp: float
    read_size_level_px: int  # side of the square read at ``level`` for one tile
    tile_size_l0: float  # side of one tile in level-0 pixels (what the read covers)
    resize_factor: float  # read_size_level_px / tile_size_px (1.0: no resize)
    effective_mpp: float  # µm/px of the stored tiles


def choose_level(
    level_mpps: list[float] | tuple[float, ...],
    level_downsamples: list[float] | tuple[float, ...],
    target_mpp: float,
    tile_size_px: int,
    tolerance: float = 0.05,
    allow_upsample: bool = False,
    slide_name: str = "slide",
) -> LevelChoice:
    """Pick the coarsest level at least as fine as the target (within ``tolerance``).

    Within the tolerance tiles are read as they are (no resize); otherwise a larger region is read
    and shrunk with antialiasing. A target finer than the finest level is refused unless upsampling is
    explicitly allowed, because upsampled tiles show the model detail that was never scanned.
    """
    if not target_mpp > 0:
        raise ResolutionError(f"target µm/px must be positive, got {target_mpp}")
    candidates = [i for i, mpp in enumerate(level_mpps) if mpp <= target_mpp * (1 + tolerance)]
    if not candidates:
        finest = min(level_mpps)
        if not allow_upsample:
            available = ", ".join(f"{m:.4g}" for m in level_mpps)
            raise ResolutionError(
                f"{slide_name}: target {target_mpp:.4g} µm/px is finer than the slide's finest level "
                f"({finest:.4g} µm/px; levels: {available}); pass --allow-upsample to upsample"
            )
        candidates = [int(np.argmin(level_mpps))]
    level = max(candidates, key=lambda i: level_mpps[i])
    level_mpp = float(level_mpps[level])
    ratio = target_mpp / level_mpp
    read_px = tile_size_px if abs(ratio - 1.0) <= tolerance else max(1, round(tile_size_px * ratio))
    return LevelChoice(
        level=level,
        level_mpp=level_mpp,
        read_size_level_px=read_px,
        tile_size_l0=read_px * float(level_downsamples[level]),
        resize_factor=read_px / tile_size_px,
        effective_mpp=read_px * level_mpp / tile_size_px,
    )


def grid_origins(width: float, height: float, tile_size_l0: float, stride_l0: float) -> np.ndarray:
    """Top-left corners [N, 2] (x, y) of a grid covering the image; edge tiles overhang it.

    Corners are rounded to whole level-0 pixels so that they are exact in QuPath.
    """

    def axis(extent: float) -> np.ndarray:
        count = 1 if extent <= tile_size_l0 else math.ceil((extent - tile_size_l0) / stride_l0 - 1e-9) + 1
        return np.round(np.arange(count) * stride_l0).astype(np.int64)

    xs, ys = axis(width), axis(height)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, mask_downsample: float, origins: np.ndarray, tile_size_l0: float) -> np.ndarray:
    """Fraction of each tile's area covered by tissue, via an integral image (no per-tile loop).

    Area outside the mask (overhanging edge tiles) counts as background.
    """
    if len(origins) == 0:
        return np.zeros(0, dtype=np.float32)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    x0 = np.round(origins[:, 0] / mask_downsample).astype(np.int64)
    y0 = np.round(origins[:, 1] / mask_downsample).astype(np.int64)
    side = max(1, round(tile_size_l0 / mask_downsample))
    x1, y1 = x0 + side, y0 + side
    cx0, cx1 = np.clip(x0, 0, mask.shape[1]), np.clip(x1, 0, mask.shape[1])
    cy0, cy1 = np.clip(y0, 0, mask.shape[0]), np.clip(y1, 0, mask.shape[0])
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return (inside / float(side * side)).astype(np.float32)


def block_order(origins: np.ndarray, block_l0: float) -> np.ndarray:
    """Indices that sort tiles block by block (row-major blocks, row-major inside each).

    Tiles that share a block are read with one large region read, so they should sit together.
    """
    if len(origins) == 0:
        return np.zeros(0, dtype=np.int64)
    bx = (origins[:, 0] // block_l0).astype(np.int64)
    by = (origins[:, 1] // block_l0).astype(np.int64)
    return np.lexsort((origins[:, 0], origins[:, 1], bx, by))
