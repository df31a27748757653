"""Stitch tile probabilities and DT Grad-CAM maps into a slide-level tumour-probability map.

The map's cells are the CAM's cells: ``cell = tile size (level-0 px) / g`` for a g x g feature map, so
a tile covers exactly g x g cells. Two layers, each overlap-averaged (sum and count; no value — NaN —
where no tile lies, i.e. no tissue):

- ``probability``: the tile's tumour probability over its whole area;
- ``tumour``: the probability weighted, cell by cell, by the tile's Grad-CAM normalised with ONE
  slide-wide scale (a percentile of the raw CAM over positive tiles), clipped to [0, 1]. Per-tile
  min-max normalisation would stretch a benign tile's weak map to 1; one scale keeps tiles comparable
  and gives regions finer than a tile (``shared/model-spec.md``, DT Grad-CAM step 7).

Both are stored as a multiscale Zarr (level k = 2^k cells per pixel) with their level-0 pixel size and
µm/px in the attributes, and rendered as ``overview.png`` and ``overlay.png`` (with a colour bar).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_dala.fileio import atomic_open
from wsi_dala.grid import grid_origins, tissue_fractions
from wsi_dala.scoring import CAMS, SCORES
from wsi_dala.store import TISSUE_MASK, open_store

LAYERS = ("probability", "tumour")


@dataclass(frozen=True)
class HeatmapConfig:
    cam_scale_percentile: float = 5.0  # of the peak raw CAM of tiles with p >= positive_threshold
    positive_threshold: float = 0.5
    min_level_px: int = 64  # stop the pyramid when a level is smaller than this
    min_cell_tissue: float = 0.5  # cells with less tissue (by the tissue mask) get no value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Heatmap:
    """Level 0 of the stitched layers, in cells of ``cell_l0`` level-0 pixels."""

    probability: np.ndarray  # [rows, cols] float32, NaN where no tile
    tumour: np.ndarray
    cell_l0: float
    cam_scale: float
    slide_mpp: float

    @property
    def cell_mpp(self) -> float:
        return self.cell_l0 * self.slide_mpp


def slide_cam_scale(store: Any, positive_index: int, config: HeatmapConfig) -> float:
    """One scale for the whole slide: a percentile of the positive tiles' peak raw CAM values.

    A cell as hot as a typical positive tile's hottest cell maps to 1; tiles stay comparable (one
    scale), and the cold part of a tile that is only partly tumour stays cold.
    """
    chunk = int(store.attrs["chunk_tiles"])
    n = store[SCORES].shape[0]
    values = []
    for start in range(0, n, chunk):
        scores = np.asarray(store[SCORES][start : start + chunk])
        positive = scores[:, positive_index] >= config.positive_threshold
        if positive.any():
            cams = np.asarray(store[CAMS][start : start + chunk])[positive]
            values.append(cams.reshape(len(cams), -1).max(axis=1))
    if not values:
        return 1.0
    scale = float(np.percentile(np.concatenate(values), config.cam_scale_percentile))
    return scale if scale > 0 else 1.0


def stitch(store_path: str | Path, config: HeatmapConfig | None = None) -> Heatmap:
    """Sum-and-count stitching, chunk by chunk (memory: the map, plus one chunk of scores)."""
    config = config or HeatmapConfig()
    store = open_store(store_path)
    attrs = store.attrs
    positive_index = list(attrs["class_names"]).index(attrs["positive_class"])
    grid = int(attrs["cam_grid"])
    cell_l0 = float(attrs["tile_size_l0"]) / grid
    width, height = int(attrs["slide"]["width"]), int(attrs["slide"]["height"])
    rows, cols = math.ceil(height / cell_l0), math.ceil(width / cell_l0)
    sums = np.zeros((2, rows + grid, cols + grid), dtype=np.float64)  # margin for edge tiles
    counts = np.zeros((rows + grid, cols + grid), dtype=np.int32)
    scale = slide_cam_scale(store, positive_index, config)
    chunk = int(attrs["chunk_tiles"])
    n = store["coords"].shape[0]
    for start in range(0, n, chunk):
        coords = np.asarray(store["coords"][start : start + chunk])
        probability = np.asarray(store[SCORES][start : start + chunk])[:, positive_index]
        cams = np.clip(np.asarray(store[CAMS][start : start + chunk]) / scale, 0.0, 1.0)
        cells = np.round(coords / cell_l0).astype(np.int64)
        for (cx, cy), p, cam in zip(cells, probability, cams, strict=True):
            if not np.isfinite(p):
                continue
            sums[0, cy : cy + grid, cx : cx + grid] += p
            sums[1, cy : cy + grid, cx : cx + grid] += p * cam
            counts[cy : cy + grid, cx : cx + grid] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)[:, :rows, :cols].astype(np.float32)
    if TISSUE_MASK in store:
        # A tile is kept for its tissue, but parts of it are glass or ink: no value there either.
        mask = np.asarray(store[TISSUE_MASK][:])
        cells_xy = grid_origins(cols * cell_l0, rows * cell_l0, cell_l0, cell_l0).astype(np.float64)
        tissue = tissue_fractions(mask, float(attrs["mask_downsample"]), cells_xy, cell_l0).reshape(rows, cols)
        mean[:, tissue < config.min_cell_tissue] = np.nan
    return Heatmap(mean[0], mean[1], cell_l0, scale, float(attrs["slide_mpp"]))


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


def write_heatmap(heatmap: Heatmap, path: str | Path, config: HeatmapConfig, extra_attrs: dict | None = None) -> None:
    """Multiscale Zarr: ``<layer>/<level>`` arrays; written under a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        import shutil

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
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def render_overlay(thumbnail: np.ndarray, layer: np.ndarray, path: Path, title: str) -> None:
    """Heatmap (0-1, no colour where there is no value) over the thumbnail, with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
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
    dpi = 100
    fig, ax = plt.subplots(figsize=(width / dpi + 1.6, height / dpi + 0.6), dpi=dpi)
    ax.imshow(blend)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    mappable = plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=ax, fraction=0.035, pad=0.02, label="tumour probability")
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", bbox_inches="tight")
    plt.close(fig)
