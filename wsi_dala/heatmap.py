"""Stitch tile probabilities and DT Grad-CAM maps into a slide-level tumour-probability map.

The map's cells are the CAM's cells: ``cell = tile size (level-0 px) / g`` for a g x g feature map, so
a tile covers exactly g x g cells. Two layers, each overlap-averaged (sum and count; no value — NaN —
where no tile lies, i.e. no tissue):

- ``probability``: the tile's tumour probability over its whole area;
- ``tumour``: the probability weighted, cell by cell, by the tile's Grad-CAM normalised with ONE
  slide-wide scale (a percentile of the raw CAM over positive tiles), clipped to [0, 1]. Per-tile
  min-max normalisation would stretch a benign tile's weak map to 1; one scale keeps tiles comparable
  and gives regions finer than a tile (``shared/model-spec.md``, DT Grad-CAM step 7).

A third layer, ``qc_flagged``, is the share of the tiles over each cell that quality control flagged
(out of focus, folded, inked): drawn hatched on the overlay and left out of tumour regions. Under
``qc.mode: exclude`` flagged tiles are not stitched at all.

All are stored as a multiscale Zarr (level k = 2^k cells per pixel) with their level-0 pixel size and
µm/px in the attributes, and rendered as ``overview.png`` and ``overlay.png`` (with a colour bar).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_dala.config import HeatmapConfig
from wsi_dala.fileio import atomic_open
from wsi_dala.grid import grid_origins, tissue_fractions
from wsi_dala.layout import building_path
from wsi_dala.store import TileStore

LAYERS = ("probability", "tumour", "qc_flagged")
HATCH_RGB = (0, 230, 255)  # cyan: not in the inferno scale, not in H&E
FLAGGED_CELL = 0.5  # a cell at least this much covered by flagged tiles is drawn hatched, and is no region


@dataclass
class Heatmap:
    """Level 0 of the stitched layers, in cells of ``cell_l0`` level-0 pixels."""

    probability: np.ndarray  # [rows, cols] float32, NaN where no tile
    tumour: np.ndarray
    qc_flagged: np.ndarray  # share of the tiles over the cell that QC flagged, NaN where no tile
    cell_l0: float
    cam_scale: float
    slide_mpp: float

    @property
    def cell_mpp(self) -> float:
        return self.cell_l0 * self.slide_mpp


def slide_cam_scale(store: TileStore, config: HeatmapConfig) -> float:
    """One scale for the whole slide: a percentile of the positive tiles' peak raw CAM values.

    A cell as hot as a typical positive tile's hottest cell maps to 1; tiles stay comparable (one
    scale), and the cold part of a tile that is only partly tumour stays cold.
    """
    values = []
    for rows in store.info.chunk_rows():
        positive = (store.positive_scores(rows) >= config.positive_threshold) & store.usable_tiles(rows)
        if positive.any():
            cams = store.cams(rows)[positive]
            values.append(cams.reshape(len(cams), -1).max(axis=1))
    if not values:
        return 1.0
    scale = float(np.percentile(np.concatenate(values), config.cam_scale_percentile))
    return scale if scale > 0 else 1.0


def stitch(store_path: str | Path, config: HeatmapConfig | None = None) -> Heatmap:
    """Sum-and-count stitching, chunk by chunk (memory: the map, plus one chunk of scores)."""
    config = config or HeatmapConfig()
    store = TileStore(store_path)
    info = store.info
    grid = info.require_scores(str(store.path)).cam_grid
    cell_l0 = info.tile_size_l0 / grid
    width, height = info.tiling.slide.width, info.tiling.slide.height
    rows, cols = math.ceil(height / cell_l0), math.ceil(width / cell_l0)
    sums = np.zeros((3, rows + grid, cols + grid), dtype=np.float64)  # margin for edge tiles
    counts = np.zeros((rows + grid, cols + grid), dtype=np.int32)
    scale = slide_cam_scale(store, config)
    for chunk in info.chunk_rows():
        cells = np.round(store.coords(chunk) / cell_l0).astype(np.int64)
        probability = store.positive_scores(chunk)
        cams = np.clip(store.cams(chunk) / scale, 0.0, 1.0)
        flagged = store.qc_flags(chunk) > 0
        usable = store.usable_tiles(chunk)
        for (cx, cy), p, cam, bad, use in zip(cells, probability, cams, flagged, usable, strict=True):
            if not np.isfinite(p) or not use:
                continue
            sums[0, cy : cy + grid, cx : cx + grid] += p
            sums[1, cy : cy + grid, cx : cx + grid] += p * cam
            sums[2, cy : cy + grid, cx : cx + grid] += bad
            counts[cy : cy + grid, cx : cx + grid] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)[:, :rows, :cols].astype(np.float32)
    mask = store.tissue_mask()
    if mask is not None:
        # A tile is kept for its tissue, but parts of it are glass or ink: no value there either.
        cells_xy = grid_origins(cols * cell_l0, rows * cell_l0, cell_l0, cell_l0).astype(np.float64)
        tissue = tissue_fractions(mask, info.tiling.mask_downsample, cells_xy, cell_l0).reshape(rows, cols)
        mean[:, tissue < config.min_cell_tissue] = np.nan
    return Heatmap(mean[0], mean[1], mean[2], cell_l0, scale, info.slide_mpp)


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
    for name in LAYERS:
        layer = getattr(heatmap, name)
        level = 0
        while True:
            group.create_array(
                f"{name}/{level}",
                data=layer,
                chunks=(min(512, max(1, layer.shape[0])), min(512, max(1, layer.shape[1]))),
            )
            if name == LAYERS[0]:
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
    group.attrs.update(
        {
            "format": "wsi-dala.heatmap/1",
            "layers": {
                "probability": "tile tumour probability, overlap-averaged",
                "tumour": "tile probability x Grad-CAM (one slide-wide scale), overlap-averaged",
                "qc_flagged": "share of the tiles over the cell that quality control flagged",
            },
            "levels": levels,
            "cell_l0": heatmap.cell_l0,
            "cell_mpp": heatmap.cell_mpp,
            "cam_scale": heatmap.cam_scale,
            "config": config.to_dict(),
            "no_value": "NaN where no tile was scored (no tissue)",
            **(extra_attrs or {}),
        }
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def render_overlay(
    thumbnail: np.ndarray, layer: np.ndarray, path: Path, title: str, flagged: np.ndarray | None = None
) -> None:
    """Heatmap (0-1, no colour where there is no value) over the thumbnail, with a colour bar.

    Cells mostly covered by QC-flagged tiles (``flagged`` ≥ FLAGGED_CELL) are hatched. Drawn on a bare
    ``matplotlib.figure.Figure``: no pyplot, no global backend to switch.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import Image

    height, width = thumbnail.shape[:2]
    resized = np.asarray(
        Image.fromarray(np.nan_to_num(layer, nan=-1.0).astype(np.float32), mode="F").resize(
            (width, height), Image.Resampling.NEAREST
        )
    )
    valid = resized >= 0
    value = np.clip(resized, 0, 1)[..., None]
    coloured = colormaps["inferno"](value[..., 0])[..., :3] * 255
    alpha = np.where(valid[..., None], 0.15 + 0.6 * value, 0.0)  # low probability: the tissue shows through
    blend = ((1 - alpha) * thumbnail + alpha * coloured).astype(np.uint8)
    hatched = _hatch_mask(flagged, (height, width)) if flagged is not None else None
    if hatched is not None:
        blend[hatched] = HATCH_RGB
    dpi = 100
    fig = Figure(figsize=(width / dpi + 1.6, height / dpi + 0.6), dpi=dpi)
    ax = fig.subplots()
    ax.imshow(blend)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    mappable = ScalarMappable(cmap="inferno", norm=Normalize(0, 1))
    fig.colorbar(mappable, ax=ax, fraction=0.035, pad=0.02, label="tumour probability")
    if hatched is not None and hatched.any():
        from matplotlib.patches import Patch

        key = Patch(
            facecolor="white",
            edgecolor=(HATCH_RGB[0] / 255, HATCH_RGB[1] / 255, HATCH_RGB[2] / 255),
            hatch="///",
            label="QC-flagged tiles",
        )
        ax.legend(handles=[key], loc="upper left", bbox_to_anchor=(0.0, -0.01), fontsize=8, frameon=False)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", bbox_inches="tight")


def _hatch_mask(flagged: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of diagonal hatch lines (every 6th diagonal) over cells flagged by QC."""
    from PIL import Image

    height, width = shape
    cells = np.nan_to_num(flagged, nan=0.0) >= FLAGGED_CELL
    resized = np.asarray(Image.fromarray(cells).resize((width, height), Image.Resampling.NEAREST))
    rows, cols = np.mgrid[0:height, 0:width]
    return resized & ((rows + cols) % 6 == 0)
