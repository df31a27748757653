"""From a scored tile store and a stitched heatmap to QuPath GeoJSON (via ``qupath_export``).

Tiles become locked ``tile`` detections classed Tumor / Non-tumor at ``tile_threshold`` with their
measurements (QC blur, fold and ink among them); tumour regions become ``annotation`` polygons traced
on the ``tumour`` heatmap layer (calibrated probability, sub-tile through the CAM) at each threshold,
leaving out cells QC flagged, with holes, at least ``min_region_area_um2``. Outlines are traced between
cell centres by marching squares (:func:`qupath_export.polygons.contour_polygons`): no cell staircase,
and a boundary within half a cell of the cells' edges (plus the ``simplify_cells`` tolerance).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from qupath_export.geojson import annotation_feature, tile_features, write_feature_collection
from qupath_export.polygons import contour_polygons
from wsi_dala.cam_profile import correct
from wsi_dala.cam_threshold import CamSettings, dynamic_threshold
from wsi_dala.config import ExportConfig
from wsi_dala.heatmap import FLAGGED_CELL, Heatmap
from wsi_dala.store import TileStore

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
    return np.array(
        [
            ((m >= dynamic_threshold(m, settings)) & (m > 0)).mean() if p > 0 else 0.0
            for m, p in zip(normalised, peak, strict=True)
        ]
    )


def _tile_feature_stream(store: TileStore, config: ExportConfig, heatmap: Heatmap) -> Iterator[dict[str, Any]]:
    settings = CamSettings(method=config.cam_threshold_method)
    scoring = store.info.require_scores(str(store.path))
    for rows in store.info.chunk_rows():
        probability = store.positive_scores(rows)
        raw = store.cams(rows)
        scaled = np.clip(correct(raw, heatmap.cam_profile) / heatmap.cam_scale, 0.0, 1.0).reshape(len(raw), -1)
        spread = {"Tumor probability SD": store.score_sd(rows)} if scoring.uncertainty != "none" else {}
        measurements = {
            "Tumor probability": probability,
            **spread,
            "CAM mean (slide scale)": scaled.mean(axis=1),
            "CAM max (slide scale)": scaled.max(axis=1),
            "DT-CAM area fraction": _dt_cam_area_fraction(raw, settings),
            "Tissue fraction": store.tissue_fraction(rows),
            "QC blur": store.qc_blur(rows),
            "QC fold": store.qc_fold(rows),
            "QC ink": store.qc_ink(rows),
            "QC flagged": (store.qc_flags(rows) > 0).astype(np.float32),
        }
        classes = np.where(probability >= config.tile_threshold, POSITIVE_CLASS, NEGATIVE_CLASS)
        keep = store.usable_tiles(rows)  # QC exclude mode: flagged tiles are as if never cut
        yield from tile_features(
            store.coords(rows)[keep],
            store.info.tile_size_l0,
            {name: values[keep] for name, values in measurements.items()},
            classes[keep],
        )


def region_features(heatmap: Heatmap, config: ExportConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Annotation features and a summary per region (for run.json)."""
    features, summary = [], []
    layer = heatmap.tumour
    min_area_px = config.min_region_area_um2 / heatmap.slide_mpp**2
    traced = np.where(np.nan_to_num(heatmap.qc_flagged, nan=0.0) < FLAGGED_CELL, layer, np.nan)
    rows, cols = np.mgrid[0 : layer.shape[0], 0 : layer.shape[1]]
    centres_x = (cols.ravel() + 0.5) * heatmap.cell_l0
    centres_y = (rows.ravel() + 0.5) * heatmap.cell_l0
    values = layer.ravel()
    for threshold in sorted(config.region_thresholds):
        regions = contour_polygons(  # QC-flagged cells make no region: traced as if they had no value
            traced,
            threshold,
            heatmap.cell_l0,
            simplify_tolerance=config.simplify_cells * heatmap.cell_l0,
            min_area=min_area_px,
        )
        for number, polygon in enumerate(regions.geoms, start=1):
            inside = shapely.contains_xy(polygon, centres_x, centres_y) & np.isfinite(values)
            mean_p = float(values[inside].mean()) if inside.any() else float("nan")
            area_um2 = polygon.area * heatmap.slide_mpp**2
            measurements = {"Area µm^2": area_um2, "Mean tumour probability": mean_p, "Threshold": threshold}
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
                    }
                )
    return features, summary


def export_qupath(
    store_path: str | Path, heatmap: Heatmap, tiles_path: Path, regions_path: Path, config: ExportConfig
) -> ExportResult:
    """Write both GeoJSON files (each atomically); returns counts and the regions' summary."""
    store = TileStore(store_path)
    n_tiles = write_feature_collection(tiles_path, _tile_feature_stream(store, config, heatmap))
    features, summary = region_features(heatmap, config)
    write_feature_collection(regions_path, features)
    return ExportResult(tiles_path, regions_path, n_tiles, len(features), summary)
