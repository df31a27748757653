"""What the tumour layer weighs each cell's Grad-CAM against, measured on the slide's own tumour tiles.

- the **border profile**: the mean CAM over a tile of typical tumour tiles (interior ones, whose
  neighbours are tumour too), blended with the model card's and divided out, so a tile's dim corners do
  not print the tile grid along an edge;
- the **slide's CAM scale**: a percentile of those tiles' corrected peaks, so a benign tile's weak map is
  not stretched to 1;
- the **evidence profile**: the corrected evidence's mean per cell over the same tiles, dividing out
  what the correction leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsi_dala.core.config import HeatmapConfig
from wsi_dala.explain.border_profile import (
    MIN_PROFILE,
    MIN_SLIDE_TILES,
    blend_profile,
    correct,
    profile_sum,
)
from wsi_dala.outputs.store_reads import STITCH_BLOCK_TILES, ChunkCams
from wsi_dala.outputs.tumour_layer import cam_evidence
from wsi_dala.tiling.store import TileStore


def interior_positive(store: TileStore, config: HeatmapConfig) -> np.ndarray:
    """Per tile: positive, and so are its eight neighbours on the tile grid — deep inside tumour, where
    every cell should be tumour (what the CAM's border profile and scale are measured on)."""
    coords, positive = store.coords(), _positive(store, slice(None), config)
    if not positive.any():
        return positive
    lattice = np.round((coords - coords.min(axis=0)) / store.info.tiling.stride_l0).astype(np.int64)
    grid = np.zeros(tuple(lattice.max(axis=0)[::-1] + 3), dtype=bool)  # margin: edge tiles are never interior
    grid[lattice[positive, 1] + 1, lattice[positive, 0] + 1] = True
    interior = ndimage.binary_erosion(grid, structure=np.ones((3, 3), dtype=bool))
    return positive & interior[lattice[:, 1] + 1, lattice[:, 0] + 1]


def reference_tiles(store: TileStore, config: HeatmapConfig, interior: np.ndarray) -> np.ndarray:
    """The tiles a "typical tumour cell" is learnt from: the ``interior`` positive tiles when there are at
    least MIN_SLIDE_TILES of them, else every positive tile (small tumours: tiles that are partly tumour
    dilute the estimate, but it is all there is)."""
    return interior if interior.sum() >= MIN_SLIDE_TILES else _positive(store, slice(None), config)


def border_profile(
    store: TileStore, config: HeatmapConfig, reference: np.ndarray, prior: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """The CAM profile over a tile (mean 1) the slide's maps are divided by, and the tiles it rests on.

    Measured on this slide's ``reference`` tiles and shrunk towards ``prior`` (the model card's profile);
    flat when ``border_correction`` is off.
    """
    grid = store.info.require_scores(str(store.path)).cam_grid
    if not config.border_correction:
        return np.ones((grid, grid)), 0
    return border_profile_of(grid, ReferenceCams.read(store, reference), prior)


def border_profile_of(grid: int, reference: ReferenceCams, prior: np.ndarray | None) -> tuple[np.ndarray, int]:
    total, n = np.zeros((grid, grid)), 0
    for cams in reference.by_chunk():  # summed chunk by chunk, as the tiles were scored
        part, count = profile_sum(cams)
        total, n = total + part, n + count
    return blend_profile(total, n, prior), n


def slide_cam_scale(store: TileStore, config: HeatmapConfig, reference: np.ndarray, profile: np.ndarray) -> float:
    """One scale for the whole slide: a percentile of the reference tiles' peak corrected CAM.

    A cell at least as hot as the hottest cell of a typical tumour tile counts as fully tumour (its
    tile's probability); cooler cells lower it in proportion. Peaks, not all cells: a positive tile is
    often mostly something else (a model that calls a tile tumour from a few cells), and its peak is
    still its tumour. One scale keeps tiles comparable, and the cold part of a partly tumorous tile
    stays cold.
    """
    return slide_cam_scale_of(config, ReferenceCams.read(store, reference), profile)


def slide_cam_scale_of(config: HeatmapConfig, reference: ReferenceCams, profile: np.ndarray) -> float:
    if not len(reference.cams):
        return 1.0
    values = []
    for start in range(0, len(reference.cams), STITCH_BLOCK_TILES):
        corrected = correct(reference.cams[start : start + STITCH_BLOCK_TILES], profile)
        values.append(corrected.reshape(len(corrected), -1).max(axis=1))
    finite = np.concatenate(values)
    finite = finite[np.isfinite(finite)]
    scale = float(np.percentile(finite, config.cam_scale_percentile)) if finite.size else 0.0
    return scale if scale > 0 else 1.0


@dataclass(frozen=True)
class ReferenceCams:
    """The raw CAMs of the reference tiles [n, g, g], in store order, and the chunk of each: read once for
    both the border profile and the slide's scale."""

    cams: np.ndarray
    chunks: np.ndarray

    @classmethod
    def read(cls, store: TileStore, reference: np.ndarray) -> ReferenceCams:
        grid = store.info.require_scores(str(store.path)).cam_grid
        cams, chunks, reader = [], [], ChunkCams(store)
        for index, rows in enumerate(store.info.chunk_rows()):
            chosen = reference[rows]
            if chosen.any():
                cams.append(reader(rows)[chosen])
                chunks.append(np.full(len(cams[-1]), index))
        if not cams:
            return cls(np.zeros((0, grid, grid), dtype=np.float32), np.zeros(0, dtype=np.int64))
        return cls(np.concatenate(cams), np.concatenate(chunks))

    def by_chunk(self) -> list[np.ndarray]:
        return np.split(self.cams, np.flatnonzero(np.diff(self.chunks)) + 1) if len(self.cams) else []


def evidence_profile_of(reference: ReferenceCams, profile: np.ndarray, scale: float) -> np.ndarray:
    """The mean CAM evidence of the reference (typical tumour) tiles at each cell of a tile, over its mean
    across cells (flat without reference tiles). Dividing by the border profile evens out the CAM's mean,
    not its spread: a corner divided by 0.6 is noisier, and the saturating evidence of a noisier cell is
    lower on average (a seam index of 0.957 on a real-texture slide); dividing the evidence by this evens
    out what the tumour layer uses."""
    grid = profile.shape[0]
    if len(reference.cams) < MIN_SLIDE_TILES:
        return np.ones((grid, grid))
    mean = cam_evidence(correct(reference.cams, profile) / scale).mean(axis=0)
    if not np.isfinite(mean).all() or mean.mean() <= 0:
        return np.ones((grid, grid))
    return np.maximum(mean / mean.mean(), MIN_PROFILE)


def _positive(store: TileStore, rows: slice, config: HeatmapConfig) -> np.ndarray:
    probability = store.positive_scores(rows)
    return np.isfinite(probability) & (probability >= config.positive_threshold) & store.usable_tiles(rows)
