"""From a scored tile store and a stitched heatmap to QuPath GeoJSON (via ``qupath_export``).

Tiles become locked ``tile`` detections classed Tumor / Non-tumor at ``tile_threshold`` with their
measurements (QC blur, fold and ink among them); tumour regions become ``annotation`` polygons traced
on the ``tumour`` heatmap layer (calibrated probability, sub-tile through the CAM) at each threshold,
with holes, at least ``min_region_area_um2``. Quality control marks, it does not remove: each region
carries the share of its area over QC-flagged tiles as a measurement (``QC flagged fraction``); only
``qc.mode: exclude`` leaves flagged tiles out, and then they are not in the heatmap at all. Outlines are traced between
cell centres by marching squares (:func:`qupath_export.polygons.contour_polygons`): no cell staircase,
and a boundary within half a cell of the cells' edges (plus the ``simplify_cells`` tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from qupath_export.geojson import (
    annotation_feature,
    tile_feature_texts,
    write_feature_collection,
    write_feature_texts,
)
from qupath_export.polygons import contour_polygons
from wsi_dala.core.config import ExportConfig
from wsi_dala.explain.border_profile import correct
from wsi_dala.explain.threshold import CamSettings, dynamic_threshold
from wsi_dala.outputs.heatmap import Heatmap
from wsi_dala.tiling.store import TileStore

POSITIVE_CLASS, NEGATIVE_CLASS = "Tumor", "Non-tumor"  # QuPath's built-in Tumor class, and ours


@dataclass
class ExportResult:
    tiles_path: Path
    regions_path: Path
    n_tiles: int
    n_regions: int
    regions: list[dict[str, Any]] = field(default_factory=list)


def _dt_cam_area_fraction(raw: np.ndarray, settings: CamSettings) -> np.ndarray:
    """Per tile: the share of its map (normalised to its own peak) that survives the dynamic threshold."""
    flat = raw.reshape(len(raw), -1)
    peak = flat.max(axis=1) if len(flat) else np.zeros(0)
    normalised = flat / np.where(peak > 0, peak, 1.0)[:, None]
    if settings.method == "mean_std" and len(flat):
        # dynamic_threshold for every map at once (row by row, numpy sums exactly as it does for one map)
        tau = normalised.mean(axis=1) + settings.k * normalised.std(axis=1)
        top = normalised.max(axis=1)
        tau = np.where(top < tau, top, tau)  # min(tau, max) as Python's min takes it (NaN stays NaN)
        area = ((normalised >= tau[:, None]) & (normalised > 0)).mean(axis=1)
        return np.where(peak > 0, area, 0.0)
    return np.array(
        [
            ((m >= dynamic_threshold(m, settings)) & (m > 0)).mean() if p > 0 else 0.0
            for m, p in zip(normalised, peak, strict=True)
        ]
    )


CAM_BLOCK_TILES = 16384  # tiles whose CAMs are read at once (~3 MB of a 7 x 7 grid in float32)


def _tile_feature_texts(
    store: TileStore, config: ExportConfig, heatmap: Heatmap, extra: dict[str, np.ndarray] | None = None
) -> Iterator[str]:
    """Every usable tile as a GeoJSON feature (compact JSON text), in store order; ``extra``: more measurements,
    one value per store row (NaN: none for that tile).

    The per-tile columns are read once (a few bytes per tile); the CAMs a block of chunks at a time.
    """
    settings = CamSettings(method=config.cam_threshold_method)
    info = store.info
    scoring = info.require_scores(str(store.path))
    probability = store.positive_scores()
    spread = {"Tumor probability SD": store.score_sd()} if scoring.uncertainty != "none" else {}
    tissue, blur, fold, ink = store.tissue_fraction(), store.qc_blur(), store.qc_fold(), store.qc_ink()
    flagged = (store.qc_flags() > 0).astype(np.float32)
    keep_all = store.usable_tiles()  # QC exclude mode: flagged tiles are as if never cut
    coords = store.coords()
    for rows in _blocks(info.n_tiles, info.chunk_tiles):
        cam_measurements: dict[str, np.ndarray] = {}
        if scoring.has_cams:  # a model without a feature map has no CAM to measure
            raw = store.cams(rows)
            scaled = np.clip(correct(raw, heatmap.cam_profile) / heatmap.cam_scale, 0.0, 1.0).reshape(len(raw), -1)
            cam_measurements = {
                "CAM mean (slide scale)": scaled.mean(axis=1),
                "CAM max (slide scale)": scaled.max(axis=1),
                "DT-CAM area fraction": _dt_cam_area_fraction(raw, settings),
            }
        measurements = {
            "Tumor probability": probability[rows],
            **{name: values[rows] for name, values in spread.items()},
            **cam_measurements,
            "Tissue fraction": tissue[rows],
            "QC blur": blur[rows],
            "QC fold": fold[rows],
            "QC ink": ink[rows],
            "QC flagged": flagged[rows],
            **{name: values[rows] for name, values in (extra or {}).items()},
        }
        classes = np.where(probability[rows] >= config.tile_threshold, POSITIVE_CLASS, NEGATIVE_CLASS)
        keep = keep_all[rows]
        yield from tile_feature_texts(
            coords[rows][keep],
            info.tile_size_l0,
            {name: values[keep] for name, values in measurements.items()},
            classes[keep].tolist(),
        )


def _blocks(n_tiles: int, chunk_tiles: int) -> Iterator[slice]:
    """Row slices of whole chunks, about CAM_BLOCK_TILES rows each."""
    step = chunk_tiles * max(1, CAM_BLOCK_TILES // max(1, chunk_tiles))
    for start in range(0, n_tiles, step):
        yield slice(start, min(n_tiles, start + step))


def region_features(heatmap: Heatmap, config: ExportConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Annotation features and a summary per region (for run.json)."""
    features, summary = [], []
    layer = heatmap.tumour
    min_area_px = config.min_region_area_um2 / heatmap.slide_mpp**2
    for threshold in sorted(config.region_thresholds):
        regions = contour_polygons(
            layer,
            threshold,
            heatmap.cell_l0,
            simplify_tolerance=config.simplify_cells * heatmap.cell_l0,
            min_area=min_area_px,
        )
        for number, polygon in enumerate(regions.geoms, start=1):
            mean_p = _mean_inside(layer, polygon, heatmap.cell_l0)
            flagged = _mean_inside(heatmap.qc_flagged, polygon, heatmap.cell_l0)
            flagged = 0.0 if not np.isfinite(flagged) else flagged
            area_um2 = polygon.area * heatmap.slide_mpp**2
            measurements = {
                "Area µm^2": area_um2,
                "Mean tumour probability": mean_p,
                "Threshold": threshold,
                "QC flagged fraction": flagged,
            }
            feature = annotation_feature(
                polygon, POSITIVE_CLASS, f"Tumour region {number} (p >= {threshold:g})", measurements
            )
            if feature is not None:
                features.append(feature)
                summary.append(
                    {
                        "threshold": threshold,
                        "area_um2": round(area_um2, 1),
                        "mean_probability": round(mean_p, 4) if np.isfinite(mean_p) else None,
                        "qc_flagged_fraction": round(flagged, 4),
                    }
                )
    return features, summary


def _mean_inside(layer: np.ndarray, polygon: BaseGeometry, cell_l0: float) -> float:
    """Mean of the cells of ``layer`` whose centres lie inside ``polygon`` (NaN: none with a value).

    Only the cells under the polygon's bounding box are tested (in row-major order, so the values are
    averaged in the same order as over the whole map).
    """
    x0, y0, x1, y1 = polygon.bounds
    rows, cols = layer.shape
    c0, c1 = max(0, math.floor(x0 / cell_l0) - 1), min(cols, math.ceil(x1 / cell_l0) + 1)
    r0, r1 = max(0, math.floor(y0 / cell_l0) - 1), min(rows, math.ceil(y1 / cell_l0) + 1)
    if c0 >= c1 or r0 >= r1:
        return float("nan")
    centres_x = (np.arange(c0, c1) + 0.5) * cell_l0
    centres_y = (np.arange(r0, r1) + 0.5) * cell_l0
    values = layer[r0:r1, c0:c1].ravel()
    inside = shapely.contains_xy(polygon, np.tile(centres_x, r1 - r0), np.repeat(centres_y, c1 - c0)) & np.isfinite(
        values
    )
    return float(values[inside].mean()) if inside.any() else float("nan")


def export_qupath(
    store_path: str | Path,
    heatmap: Heatmap,
    tiles_path: Path,
    regions_path: Path,
    config: ExportConfig,
    tile_extra: dict[str, np.ndarray] | None = None,
) -> ExportResult:
    """Write both GeoJSON files (each atomically); returns counts and the regions' summary."""
    n_tiles = export_tiles(store_path, heatmap, tiles_path, config, tile_extra)
    n_regions, summary = export_regions(heatmap, regions_path, config)
    return ExportResult(tiles_path, regions_path, n_tiles, n_regions, summary)


def export_tiles(
    store_path: str | Path,
    heatmap: Heatmap,
    tiles_path: Path,
    config: ExportConfig,
    extra: dict[str, np.ndarray] | None = None,
) -> int:
    """The tile detections' GeoJSON, streamed tile by tile (atomically); returns how many were written."""
    return write_feature_texts(tiles_path, _tile_feature_texts(TileStore(store_path), config, heatmap, extra))


def export_regions(heatmap: Heatmap, regions_path: Path, config: ExportConfig) -> tuple[int, list[dict[str, Any]]]:
    """The tumour regions' GeoJSON (atomically); returns how many were written and their summary."""
    features, summary = region_features(heatmap, config)
    write_feature_collection(regions_path, features)
    return len(features), summary
