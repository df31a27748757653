"""The tumour layer's value in each cell of a tile: the tiles' probability, interpolated between their
centres, weighed against the cell's own Grad-CAM evidence.

A tile's probability is one number over its whole area. Painted as such, a tumour's edge follows the tile
grid (stairs a tile high). Multiplied by the CAM everywhere (the previous layer, p x e), a tumour also
shows the CAM's dips (holes over lumens, a dotted grid of dim tile corners), and its regions can only
shrink inside a tile called tumour, never grow into a tile called normal.

- **Between tile centres the probability is interpolated** (bilinear, from the up to four tiles around the
  cell; tiles with no value — glass, or left out by QC — do not count): no tile steps, inside a tumour or
  outside it.
- **Each cell's CAM is evidence for or against tumour**, and the two are combined as a prior and a
  likelihood ratio are:

      logit(value) = logit(p̃) + β · logit(e)        (β = 2, e clipped to [0.08, 0.92])

  with e = :func:`cam_evidence` (0.5 is neutral, 0.95 a cell as hot as a typical tumour tile's hottest).
  Where the tiles are sure (p̃ near 0 or 1) a cell needs strong evidence to change; at a tumour's edge
  (p̃ near 0.5) the CAM decides, on the tumour's side of the tile and on the normal side alike. Within a
  tile at a tumour's edge the CAM follows the planted tumour (Spearman 0.83 on a real-texture slide),
  while such tiles' probabilities are mostly below 0.1 or above 0.9.

β (``CAM_WEIGHT``) and ε (``EVIDENCE_CLIP``) were chosen on three models (``benchmarks/unseen.py`` and the
colour reference scorer), region IoU against the planted tumour with the same tiles and scores — previous
layer / this one: DALAResNet50 on the first generator 0.912 / 0.923, on the real-texture generator 0.808 /
0.883 (outlines 40 → 32 µm from the planted ones, seam index 0.957 → 0.996), the colour scorer (whose CAM
is exact) 0.962 / 0.901. A larger β trusts the CAM more: the colour scorer gains, the learned models lose
(β = 4: 0.941, 0.924, 0.876).

A model without a feature map has no CAM: its layer is the interpolated probability.
"""

from __future__ import annotations

import math

import numpy as np

EVIDENCE_AT_SCALE = 0.95  # a cell as hot as the slide scale reads this much evidence
_EVIDENCE_RATE = -math.log(1.0 - EVIDENCE_AT_SCALE)


def cam_evidence(relative: np.ndarray) -> np.ndarray:
    """How strongly a cell's CAM (relative to the slide scale, the hottest cell of a typical tumour tile)
    says tumour: 1 − exp(−3·x), so 0 → 0, the scale → 0.95, twice the scale → 0.9975: it saturates smoothly
    and never reaches 1 (NaN and negative read as 0)."""
    return 1.0 - np.exp(-_EVIDENCE_RATE * np.clip(np.nan_to_num(relative, nan=0.0), 0.0, None))


class TileLattice:
    """The kept tiles' probabilities on their grid (one node per tile, at the tile's centre), for bilinear
    interpolation between centres. A few bytes a grid position."""

    def __init__(self, coords_l0: np.ndarray, probability: np.ndarray, stride_l0: float, tile_l0: float):
        self.stride_l0, self.tile_l0 = float(stride_l0), float(tile_l0)
        self.origin = coords_l0.min(axis=0) if len(coords_l0) else np.zeros(2)
        nodes = self.nodes(coords_l0)
        shape = (int(nodes[:, 1].max()) + 1, int(nodes[:, 0].max()) + 1) if len(nodes) else (1, 1)
        self.values = np.full(shape, np.nan, dtype=np.float64)
        self.values[nodes[:, 1], nodes[:, 0]] = probability

    def nodes(self, coords_l0: np.ndarray) -> np.ndarray:
        """Each tile's (column, row) on the lattice."""
        return np.round((coords_l0 - self.origin) / self.stride_l0).astype(np.int64)

    def at_cells(self, coords_l0: np.ndarray, grid: int) -> np.ndarray:
        """The interpolated probability at the centres of each tile's grid x grid cells: [n, grid * grid]."""
        nodes = self.nodes(coords_l0).astype(np.float64)
        offset = ((np.arange(grid) + 0.5) / grid - 0.5) * self.tile_l0 / self.stride_l0  # from the tile's centre
        rows = (nodes[:, 1, None, None] + offset[None, :, None]) + np.zeros((1, 1, grid))
        cols = (nodes[:, 0, None, None] + offset[None, None, :]) + np.zeros((1, grid, 1))
        return self._bilinear(rows.reshape(len(nodes), -1), cols.reshape(len(nodes), -1))

    def _bilinear(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Bilinear weights over the four nodes around each point; nodes without a value (or off the lattice)
        drop out and the rest are renormalised. The tile's own node is always among them."""
        r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
        fr, fc = rows - r0, cols - c0
        total = np.zeros(rows.shape)
        weight = np.zeros(rows.shape)
        height, width = self.values.shape
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            r, c = r0 + dr, c0 + dc
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            value = np.where(inside, self.values[np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)], np.nan)
            known = np.isfinite(value) & (w > 0)
            total += np.where(known, w * np.nan_to_num(value), 0.0)
            weight += np.where(known, w, 0.0)
        return np.where(weight > 0, total / np.maximum(weight, 1e-12), np.nan)


CAM_WEIGHT = 2.0  # β: how many logits a cell's CAM evidence is worth against the tiles' probability
EVIDENCE_CLIP = 0.08  # ε: evidence is read within [0.08, 0.92]: a cell's CAM is worth at most ±4.9 logits, so
# a cold cell (a lumen, a stroma strand) cannot punch a hole where the tiles around it are sure of tumour
# (p ~ 0.998 read 0.05 there at ε = 0.01: a seam index of 0.966, holes in the regions), and still vetoes
# where they are not (p = 0.95 -> 0.10)


def cell_values(interpolated: np.ndarray, evidence: np.ndarray | None) -> np.ndarray:
    """The tumour layer's value per cell from the interpolated probability p̃ and the CAM evidence e (both
    [n, cells]; e None without a CAM): sigmoid(logit(p̃) + β logit(e))."""
    if evidence is None:
        return interpolated
    prior = np.clip(interpolated, 1e-6, 1 - 1e-6)
    e = np.clip(np.nan_to_num(evidence, nan=0.5), EVIDENCE_CLIP, 1 - EVIDENCE_CLIP)
    logit = np.log(prior / (1 - prior)) + CAM_WEIGHT * np.log(e / (1 - e))
    return np.where(np.isfinite(interpolated), 1.0 / (1.0 + np.exp(-logit)), np.nan)
