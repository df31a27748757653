"""Stitch tile probabilities and DT Grad-CAM maps into a slide-level tumour-probability map.

The map's cells are the CAM's cells: ``cell = tile size (level-0 px) / g`` for a g x g feature map, so
a tile covers exactly g x g cells. Layers, each overlap-averaged (sum and count over the tiles that
cover a cell; no value — NaN — where no tile lies, i.e. no tissue):

- ``probability``: the tile's (calibrated) tumour probability over its whole area;
- ``tumour``: the probability interpolated between tile centres, weighed against each cell's Grad-CAM
  evidence as a prior against a likelihood ratio (:mod:`wsi_dala.outputs.tumour_layer`): smooth inside tumour and
  outside it, following the CAM within the tiles along an edge. The evidence is
  ``1 - exp(-3 CAM' / s)``: ``CAM'`` the raw map divided by the model's border profile
  (:mod:`wsi_dala.explain.border_profile`; without it every tile's dim corners would print the tile grid along edges),
  ``s`` one slide-wide scale (a percentile of the tumour tiles' corrected peaks), so a benign tile's weak
  map is not stretched to 1. A model without a feature map has no CAM: its tumour layer is the
  interpolated probability;
- ``uncertainty``: the SD of the tile's probability over test-time views or MC-dropout passes (only when
  scoring measured it);
- ``qc_flagged``: the share of the tiles over each cell that quality control flagged (out of focus,
  folded, inked): drawn hatched on the overlay, and measured per tumour region; it changes no other
  layer. Under ``qc.mode: exclude`` flagged tiles are not stitched at all.

The stitch is vectorised (``np.add.at`` over every cell of a block of tiles, one layer at a time; the
per-tile scores read once, the CAMs a block of chunks at a time): its cost grows linearly with the tiles
and stays a small share of scoring (``benchmarks/heatmap.py``): 10^6 tiles in ~15 s on 2 cores, in
~1.6 GB with the map's layers (``benchmarks/scale.py``). All layers are stored as a
multiscale Zarr (level k = 2^k cells per pixel) with their level-0 pixel size and µm/px in the
attributes, and rendered as ``overview.png`` and ``overlay.png`` (:mod:`wsi_dala.outputs.overlay`). The
border profile, CAM scale and evidence profile come from :mod:`wsi_dala.outputs.cam_reference`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from wsi_dala.core.config import HeatmapConfig
from wsi_dala.core.layout import building_path
from wsi_dala.explain.border_profile import (
    correct,
    symmetrised,
)
from wsi_dala.outputs.cam_reference import (
    ReferenceCams,
    border_profile_of,
    evidence_profile_of,
    interior_positive,
    reference_tiles,
    slide_cam_scale_of,
)
from wsi_dala.outputs.heatmap_grid import seam_index, tile_period_power
from wsi_dala.outputs.store_reads import STITCH_BLOCK_TILES, ReadOnceStore, row_blocks
from wsi_dala.outputs.tumour_layer import TileLattice, cam_evidence, cell_values
from wsi_dala.tiling.grid import grid_origins
from wsi_dala.tiling.store import TileStore

LAYERS = ("probability", "tumour", "uncertainty", "qc_flagged", "attention")
LAYER_MEANINGS = {
    "probability": "the tile's calibrated tumour probability, overlap-averaged over the tiles covering the cell",
    "tumour": "the probability p interpolated between tile centres, weighed against the cell's Grad-CAM evidence "
    "e = 1 - exp(-3 CAM / slide scale): sigmoid(logit(p) + 2 logit(e))",
    "uncertainty": "SD of the tile's tumour probability over test-time views / MC-dropout passes",
    "qc_flagged": "share of the tiles over the cell that quality control flagged",
    "attention": "an attention-MIL model's attention to the tile, times the slide's tile count (1: an even share)",
}


@dataclass
class Heatmap:
    """Level 0 of the stitched layers, in cells of ``cell_l0`` level-0 pixels."""

    probability: np.ndarray  # [rows, cols] float32, NaN where no tile
    tumour: np.ndarray
    qc_flagged: np.ndarray  # share of the tiles over the cell that QC flagged, NaN where no tile
    cell_l0: float
    cam_scale: float
    slide_mpp: float
    uncertainty: np.ndarray | None = None  # None: scoring measured no spread
    attention: np.ndarray | None = None  # an attention-MIL model's (run --mil), painted by paint_tiles
    cam_profile: np.ndarray = field(default_factory=lambda: np.ones((1, 1)))  # what each CAM was divided by
    evidence_profile: np.ndarray = field(default_factory=lambda: np.ones((1, 1)))  # ... and each cell's evidence
    profile_tiles: int = 0  # positive tiles of this slide the profile was measured on
    seam_index: float | None = None  # mean of tile-corner cells / mean of the other cells, inside tumour
    tile_period_power: float | None = None  # power at the tile period inside tumour / neighbouring frequencies

    @property
    def cell_mpp(self) -> float:
        return self.cell_l0 * self.slide_mpp

    @property
    def layers(self) -> dict[str, np.ndarray]:
        """The layers that hold values, by name, in LAYERS order."""
        present = {name: getattr(self, name) for name in LAYERS}
        return {name: layer for name, layer in present.items() if layer is not None}

    def summary(self) -> dict[str, Any]:
        """For run.json: how the map was made, and whether it shows the tile grid."""
        return {
            "cell_um": round(self.cell_mpp, 3),
            "cam_scale": round(self.cam_scale, 6),
            "border_profile": {
                "tiles": self.profile_tiles,
                "min": round(float(self.cam_profile.min()), 3),
                "max": round(float(self.cam_profile.max()), 3),
            },
            "seam_index": None if self.seam_index is None else round(self.seam_index, 4),
            "tile_period_power": None if self.tile_period_power is None else round(self.tile_period_power, 3),
            "layers": list(self.layers),
        }


def stitch(
    store_path: str | Path, config: HeatmapConfig | None = None, card_profile: np.ndarray | None = None
) -> Heatmap:
    """Sum-and-count stitching, a block of chunks at a time and one layer at a time.

    ``card_profile``: the model card's CAM border profile, the prior for this slide's own estimate.
    Memory: the map's float32 layers, plus one float64 sum and the counts over the map while a layer is
    summed, plus a few bytes per tile; the CAMs are read a block of chunks at a time. Each cell's sum
    adds the tiles over it in store order, as a per-tile loop would.
    """
    config = config or HeatmapConfig()
    store = ReadOnceStore(store_path)
    info = store.info
    scoring = info.require_scores(str(store.path))
    grid = scoring.cam_grid
    cell_l0 = info.tile_size_l0 / grid
    width, height = info.tiling.slide.width, info.tiling.slide.height
    rows, cols = math.ceil(height / cell_l0), math.ceil(width / cell_l0)
    stride = cols + grid  # margin for edge tiles
    size = (rows + grid) * stride
    measured_sd = scoring.uncertainty != "none"
    interior = interior_positive(store, config)
    reference = reference_tiles(store, config, interior)
    if card_profile is not None and scoring.uncertainty.startswith("tta:"):
        card_profile = symmetrised(card_profile, scoring.uncertainty.split("+")[0].removeprefix("tta:"))
    profile, profile_tiles, scale = np.ones((grid, grid)), 0, 0.0
    evidence_profile = np.ones((grid, grid))
    if scoring.has_cams:
        reference_cams = ReferenceCams.read(store, reference)  # what border_profile and slide_cam_scale read
        if config.border_correction:
            profile, profile_tiles = border_profile_of(grid, reference_cams, card_profile)
        scale = slide_cam_scale_of(config, reference_cams, profile)
        evidence_profile = evidence_profile_of(reference_cams, profile, scale)
        del reference_cams
    # A tile is kept for its tissue, but parts of it are glass or ink: no value there either.
    no_tissue = _cells_without_tissue(store, config, rows, cols, cell_l0)
    probability = store.positive_scores().astype(np.float64)
    kept = np.isfinite(probability) & store.usable_tiles()
    cells = np.round(store.coords()[kept] / cell_l0).astype(np.int64)
    first_cell = cells[:, 1] * stride + cells[:, 0]  # of each kept tile, in the flat map
    del cells
    offsets = (np.arange(grid)[:, None] * stride + np.arange(grid)[None, :]).ravel()  # the cells of a tile
    counts = np.zeros(size, dtype=np.int32)
    for part in row_blocks(len(first_cell), STITCH_BLOCK_TILES):
        index = (first_cell[part, None] + offsets[None, :]).ravel()
        low, high = int(index.min()), int(index.max())
        if low >= 0 and high < size:
            counts[low : high + 1] += np.bincount(index - low).astype(np.int32)
        else:  # a tile off the map: fail (or wrap) exactly as a per-tile loop would
            np.add.at(counts, index, 1)
    most = int(counts.max()) if size else 0
    counts = counts.astype(np.uint8 if most < 2**8 else np.uint16 if most < 2**16 else np.int32)  # a byte a cell
    empty = counts == 0

    def layer_of(per_tile: Iterator[tuple[slice, np.ndarray]]) -> np.ndarray:
        """Overlap-averaged layer [rows, cols] (float32) from (kept-tile rows, values [n, g*g] or [n])."""
        sums = np.zeros(size, dtype=np.float64)
        for part, values in per_tile:
            index = (first_cell[part, None] + offsets[None, :]).ravel()
            spread = np.repeat(values, len(offsets)) if values.ndim == 1 else values.ravel()
            np.add.at(sums, index, np.asarray(spread, dtype=np.float64))
        np.divide(sums, counts, out=sums, where=~empty)
        sums[empty] = np.nan
        layer = sums.reshape(rows + grid, stride)[:rows, :cols]
        if no_tissue is not None:
            layer[no_tissue] = np.nan
        return layer.astype(np.float32)

    p = probability[kept]
    flagged = store.qc_flags()[kept] > 0
    blocks = row_blocks(len(p), STITCH_BLOCK_TILES)
    layers = {"probability": layer_of((part, p[part]) for part in blocks)}
    # Without CAMs (a model with no feature map) the tumour layer is the interpolated probability.
    has_cams = scoring.has_cams
    cam_terms = (profile, scale, evidence_profile) if has_cams else None
    layers["tumour"] = layer_of(_tumour_values(store, kept, p, cam_terms))
    layers["qc_flagged"] = layer_of((part, flagged[part]) for part in blocks)
    if measured_sd:
        sd = np.nan_to_num(store.score_sd()[kept])
        layers["uncertainty"] = layer_of((part, sd[part]) for part in blocks)
    heatmap = Heatmap(
        probability=layers["probability"],
        tumour=layers["tumour"],
        qc_flagged=layers["qc_flagged"],
        cell_l0=cell_l0,
        cam_scale=scale,
        slide_mpp=info.slide_mpp,
        uncertainty=layers["uncertainty"] if measured_sd else None,
        cam_profile=profile,
        evidence_profile=evidence_profile,
        profile_tiles=profile_tiles,
    )
    corners = np.round(store.coords()[interior] / cell_l0).astype(np.int64)
    heatmap.seam_index = seam_index(heatmap.tumour, corners, grid)
    heatmap.tile_period_power = tile_period_power(heatmap.tumour, _inside_tumour(heatmap, config, grid), grid)
    return heatmap


def paint_tiles(heatmap: Heatmap, coords_l0: np.ndarray, tile_size_l0: float, values: np.ndarray) -> np.ndarray:
    """A layer on the heatmap's cells from per-tile values of another tiling (an attention-MIL model's tiles):
    each cell the mean of the tiles whose square holds its centre; NaN where none does, or no tissue is."""
    rows, cols = heatmap.probability.shape
    cell = heatmap.cell_l0
    sums = np.zeros((rows, cols), dtype=np.float64)
    counts = np.zeros((rows, cols), dtype=np.int32)
    for (x, y), value in zip(
        np.asarray(coords_l0, dtype=np.float64), np.asarray(values, dtype=np.float64), strict=True
    ):
        c0, c1 = max(0, math.ceil(x / cell - 0.5)), min(cols, math.ceil((x + tile_size_l0) / cell - 0.5))
        r0, r1 = max(0, math.ceil(y / cell - 0.5)), min(rows, math.ceil((y + tile_size_l0) / cell - 0.5))
        sums[r0:r1, c0:c1] += value
        counts[r0:r1, c0:c1] += 1
    layer = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    layer[~np.isfinite(heatmap.probability)] = np.nan  # glass and ink stay empty, as in every layer
    return layer.astype(np.float32)


def _inside_tumour(heatmap: Heatmap, config: HeatmapConfig, grid: int) -> np.ndarray:
    """Cells of the tumour layer at or above the positive threshold and a tile's width from its edge: the
    inside of a tumour, where a checkerboard or a dotted grid would show (edges are judged by their outlines)."""
    with np.errstate(invalid="ignore"):
        tumour = heatmap.tumour >= config.positive_threshold
    return ndimage.binary_erosion(tumour, structure=np.ones((3, 3), dtype=bool), iterations=max(1, grid))


def _tumour_values(
    store: TileStore,
    kept: np.ndarray,
    probability: np.ndarray,
    cams: tuple[np.ndarray, float, np.ndarray] | None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Per block of kept tiles, the tumour layer's value per cell ([n, g*g], :mod:`wsi_dala.outputs.tumour_layer`):
    the probability interpolated between tile centres, handed to the CAM evidence where the tiles around a
    cell disagree. ``cams``: the border profile, the slide scale and the evidence profile (None: the model has
    no CAM). Whole chunks of CAMs are read at a time."""
    info = store.info
    grid = info.require_scores(str(store.path)).cam_grid
    coords = store.coords()[kept]
    lattice = TileLattice(coords, probability, info.tiling.stride_l0, info.tile_size_l0)
    step = info.chunk_tiles * max(1, STITCH_BLOCK_TILES // info.chunk_tiles)
    done = 0
    for rows in row_blocks(info.n_tiles, step):
        chosen = kept[rows]
        n = int(chosen.sum())
        if not n:
            continue
        part = slice(done, done + n)
        interpolated = lattice.at_cells(coords[part], grid)
        evidence = None
        if cams is not None:
            profile, scale, evidence_profile = cams
            evidence = cam_evidence(correct(store.cams(rows)[chosen], profile) / scale) / evidence_profile
            evidence = np.minimum(evidence, 1.0).reshape(n, -1)
        yield part, cell_values(interpolated, evidence)
        done += n


def _cells_without_tissue(
    store: TileStore, config: HeatmapConfig, rows: int, cols: int, cell_l0: float
) -> np.ndarray | None:
    """[rows, cols] True where less than ``min_cell_tissue`` of the cell is tissue by the tissue mask
    (None: no mask). The cells' tissue fractions are :func:`wsi_dala.tiling.grid.tissue_fractions` of the cell
    grid, counted a band of cell rows at a time (an integral image of the whole mask would take 8 bytes a
    mask pixel: 2.5 GB for a 10^6-tile slide)."""
    mask = store.tissue_mask()
    if mask is None:
        return None
    downsample = store.info.tiling.mask_downsample
    xs = grid_origins(cols * cell_l0, cell_l0, cell_l0, cell_l0)[:, 0].astype(np.float64)
    ys = grid_origins(cell_l0, rows * cell_l0, cell_l0, cell_l0)[:, 1].astype(np.float64)
    side = max(1, round(cell_l0 / downsample))
    height, width = mask.shape
    x0 = np.round(xs / downsample).astype(np.int64)
    y0 = np.round(ys / downsample).astype(np.int64)
    cx0, cx1 = np.clip(x0, 0, width), np.clip(x0 + side, 0, width)
    cy0, cy1 = np.clip(y0, 0, height), np.clip(y0 + side, 0, height)
    out = np.empty((len(ys), len(xs)), dtype=bool)
    band = max(1, 2**22 // max(1, width * side))  # cell rows at a time: ~16 MB of column counts
    for top in range(0, len(ys), band):
        part = slice(top, min(len(ys), top + band))
        strips = np.zeros((part.stop - part.start, width), dtype=np.int32)  # per cell row: tissue px per column
        for k in range(side):
            row = cy0[part] + k
            inside = row < cy1[part]
            strips[inside] += mask[row[inside]]
        counts = np.zeros((len(strips), len(xs)), dtype=np.int32)
        for k in range(side):
            column = cx0 + k
            inside = column < cx1
            counts[:, inside] += strips[:, column[inside]]
        fraction = (counts / float(side * side)).astype(np.float32)
        out[part] = fraction < config.min_cell_tissue
    return out.reshape(rows, cols)


def _halve(layer: np.ndarray) -> np.ndarray:
    """2x2 NaN-aware mean (a cell with no tile stays NaN)."""
    h, w = (layer.shape[0] + 1) // 2 * 2, (layer.shape[1] + 1) // 2 * 2
    padded = np.full((h, w), np.nan, dtype=np.float32)
    padded[: layer.shape[0], : layer.shape[1]] = layer
    blocks = padded.reshape(h // 2, 2, w // 2, 2)
    valid = np.isfinite(blocks)
    total = np.where(valid, blocks, 0).sum(axis=(1, 3))
    count = valid.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def write_heatmap(
    heatmap: Heatmap, path: str | Path, config: HeatmapConfig, extra_attrs: dict[str, Any] | None = None
) -> None:
    """Multiscale Zarr: ``<layer>/<level>`` arrays; written under a temporary name, then renamed."""
    path = Path(path)
    tmp = building_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(tmp, mode="w", zarr_format=3)
    levels = []
    first = next(iter(heatmap.layers))
    for name, layer in heatmap.layers.items():
        level = 0
        while True:
            group.create_array(
                f"{name}/{level}",
                data=layer,
                chunks=(min(512, max(1, layer.shape[0])), min(512, max(1, layer.shape[1]))),
            )
            if name == first:
                downsample = heatmap.cell_l0 * 2**level
                levels.append(
                    {
                        "path": str(level),
                        "level0_px_per_pixel": downsample,
                        "mpp": downsample * heatmap.slide_mpp,
                        "shape": list(layer.shape),
                    }
                )
            if max(layer.shape) < 2 * config.min_level_px:
                break
            layer, level = _halve(layer), level + 1
    group.update_attributes(
        {
            "format": "wsi-dala.heatmap/1",
            "layers": {name: LAYER_MEANINGS[name] for name in heatmap.layers},
            "levels": levels,
            "cell_l0": heatmap.cell_l0,
            "cell_mpp": heatmap.cell_mpp,
            "cam_scale": heatmap.cam_scale,
            "cam_border_profile": np.round(heatmap.cam_profile, 4).tolist(),
            "seam_index": heatmap.seam_index,
            "tile_period_power": heatmap.tile_period_power,
            "config": config.to_dict(),
            "no_value": "NaN where no tile was scored (no tissue)",
            **(extra_attrs or {}),
        }
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
