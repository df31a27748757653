"""How much of the tile grid shows in a heatmap layer, measured two ways (1: none).

A map built from tiles can print their grid into itself: each tile's CAM is weakest at its corners, and a
tile's probability is one number over its whole area, so tumour reads as a checkerboard of tiles and region
edges as tile-sized stairs. A person sees that at a glance; these numbers say how much there is.

- :func:`seam_index`: the mean of the cells at the four corners of interior tumour tiles over the mean of
  their other cells. It sees the corner dip of the CAM, not a pattern of whole tiles.
- :func:`tile_period_power`: the power of the layer inside tumour at the tile's period and its harmonics
  (and at twice the period: a two-tile checkerboard), by synchronous averaging, relative to the periods
  next to it. A checkerboard of tiles and a corner dip put power there; texture and tumour edges spread
  theirs over all frequencies. About 1 when nothing repeats with the tile period.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SEAM_TILES = 4  # interior tumour tiles needed before the seam index means anything
FLAT_POWER = 1e-10  # a residual power this small is a flat layer (float32 rounding), not a pattern
MIN_PHASE_CELLS = 4  # cells per phase of the period needed before the phase means are worth comparing


def seam_index(layer: np.ndarray, tile_cells: np.ndarray, grid: int) -> float | None:
    """Mean of the cells at the four corners of these tiles ÷ mean of their other cells (1: no seams).

    The CAM is weakest at a tile's corners; a map that shows the tile grid reads well below 1. None with
    fewer than MIN_SEAM_TILES tiles (grid 1 has no corners apart from its one cell).
    """
    if len(tile_cells) < MIN_SEAM_TILES or grid < 2:
        return None
    rows, cols = np.mgrid[0:grid, 0:grid]
    corner = ((rows == 0) | (rows == grid - 1)) & ((cols == 0) | (cols == grid - 1))
    y = tile_cells[:, 1, None, None] + rows[None]
    x = tile_cells[:, 0, None, None] + cols[None]
    inside = (y < layer.shape[0]) & (x < layer.shape[1])
    values = np.where(inside, layer[np.minimum(y, layer.shape[0] - 1), np.minimum(x, layer.shape[1] - 1)], np.nan)
    at_corners = np.nanmean(values[:, corner]) if np.isfinite(values[:, corner]).any() else np.nan
    elsewhere = np.nanmean(values[:, ~corner]) if np.isfinite(values[:, ~corner]).any() else np.nan
    if not (np.isfinite(at_corners) and np.isfinite(elsewhere)) or elsewhere <= 0:
        return None
    return float(at_corners / elsewhere)


def tile_period_power(layer: np.ndarray, inside: np.ndarray, period_cells: int) -> float | None:
    """How strongly the layer repeats with the tile period (or twice it: a two-tile checkerboard), relative to
    the periods next to it: about 1 when nothing repeats with the tiles (0.7-1.5 on a few hundred cells, the
    estimate's own spread), 5 and more where a grid shows.

    Synchronous averaging: the layer is high-passed (minus its mean over a tile's width, cells ``inside``
    only) and averaged per phase (row mod P, column mod P) over the cells ``inside``; the weighted variance of
    those phase means is the power of every frequency that repeats with period P, its harmonics included. It
    is divided by the mean of the same power at the periods P - 1 and P + 1, which sample the same cells out of
    step with the tiles. The larger ratio of P = the tile and P = two tiles is returned; None when the period
    is under 2 cells or fewer than MIN_PHASE_CELLS cells per phase of two tiles lie inside."""
    if period_cells < 2:
        return None
    inside = inside & np.isfinite(layer)
    if inside.sum() < MIN_PHASE_CELLS * (2 * period_cells) ** 2:
        return None
    values = np.where(inside, layer, 0.0).astype(np.float64)
    size = period_cells + 1
    local = ndimage.uniform_filter(values, size) / np.maximum(ndimage.uniform_filter(inside.astype(float), size), 1e-9)
    residual = (values - local)[inside]
    rows, cols = np.nonzero(inside)

    def power(period: int) -> float:
        phase = (rows % period) * period + cols % period
        count = np.bincount(phase, minlength=period * period)
        means = np.bincount(phase, weights=residual, minlength=period * period) / np.maximum(count, 1)
        return float((count * means**2).sum() / max(1, count.sum()))

    ratios = []
    for period in (period_cells, 2 * period_cells):
        reference, repeating = (power(period - 1) + power(period + 1)) / 2, power(period)
        if reference > FLAT_POWER:
            ratios.append(repeating / reference)
        elif repeating <= FLAT_POWER:
            ratios.append(1.0)  # flat inside (a confident model): nothing repeats, with the tiles or without
    return max(ratios) if ratios else None
