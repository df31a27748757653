"""``run.json``: the record of a complete run, and what goes into it (QC, stain, calibration, the slide answer
and its whole-tissue annotation, the files written, the versions).

Built once every stage has finished (``build_record``); ``RunRecord.read_complete`` is how a later run, a
batch or the review list reads it back.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qupath_export.geojson import write_feature_collection
from wsi_dala import __version__
from wsi_dala.core.config import PipelineConfig
from wsi_dala.core.identity import slide_fingerprint
from wsi_dala.core.layout import RUN_FORMAT, RunLayout
from wsi_dala.model import ModelCard
from wsi_dala.model.card import card_origin
from wsi_dala.model.slide_thresholds import SlideThresholds
from wsi_dala.outputs.geojson import ExportResult
from wsi_dala.outputs.heatmap import Heatmap
from wsi_dala.outputs.slide_answer import SlideAnswer, quality_notes, slide_answer, tissue_feature
from wsi_dala.runs.slide_mil import MilAnswer, MilPlan
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import TilingResult

if TYPE_CHECKING:
    from wsi_dala.inference.scoring import ScoringResult


@dataclass(frozen=True)
class RunCounts:
    tiles: int
    grid_tiles: int
    tumour_tiles: int
    regions: int


@dataclass(frozen=True)
class RunResolution:
    slide_mpp: float
    slide_mpp_source: str
    tile_mpp: float
    level: int
    resize_factor: float
    heatmap_cell_mpp: float


@dataclass(frozen=True)
class RunRecord:
    """``run.json`` of a complete run: what ran, on what, with which settings, how fast, and where it wrote."""

    run_key: str
    slide_stem: str  # outputs are named by it; a folder holds the run of one slide
    slide: dict[str, Any]
    model: dict[str, Any]
    resolution: RunResolution
    counts: RunCounts
    regions: list[dict[str, Any]]
    timings_s: dict[str, float]
    tiles_per_s: float | None
    scoring: dict[str, Any]
    settings: dict[str, Any]
    outputs: dict[str, str]  # file names inside the run folder
    versions: dict[str, str]
    qc: dict[str, Any] = field(default_factory=dict)  # counts, areas in µm², percentages of tissue
    stain: dict[str, Any] = field(default_factory=dict)  # the slide's, the model's reference, their distance
    calibration: dict[str, Any] = field(default_factory=dict)  # the temperature applied, or "uncalibrated"
    heatmap: dict[str, Any] = field(default_factory=dict)  # cell size, CAM scale, border profile, seam index
    # tumour burden, largest region, top-k probability and the slide call (wsi_dala.outputs.slide_answer)
    slide_answer: dict[str, Any] = field(default_factory=dict)
    mil: dict[str, Any] = field(default_factory=dict)  # run --mil: the model, its features, the slide probability
    status: str = "complete"
    format: str = RUN_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read_complete(cls, path: Path) -> RunRecord | None:
        """The record at ``path`` if it is a complete run of this format; None otherwise."""
        try:
            data = json.loads(path.read_text())
            if data.get("status") != "complete" or data.get("format") != RUN_FORMAT:
                return None
            names = {f.name for f in fields(cls)}
            return cls(
                **{
                    **{k: v for k, v in data.items() if k in names},
                    "resolution": RunResolution(**data["resolution"]),
                    "counts": RunCounts(**data["counts"]),
                }
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None


def qc_summary(store: TileStore, tile_threshold: float | None = None) -> dict[str, Any]:
    """QC for run.json and the batch report: counts, areas in µm² and shares of the tissue in percent; under
    ``exclude``, the tiles left out and how much of them the model called tumour (at ``tile_threshold``)."""
    qc = store.info.qc
    if qc is None:
        return {}
    tissue = qc.areas_um2.get("tissue", 0.0)
    percent = {  # ink is not tissue (it is cut out of the mask), so it is given as an area only
        name: round(100 * qc.areas_um2.get(name, 0.0) / tissue, 2) if tissue > 0 else 0.0 for name in ("blur", "fold")
    }
    summary: dict[str, Any] = {
        "mode": qc.mode,
        "tiles_flagged": qc.counts,
        "tiles_excluded": qc.excluded_tiles,
        "areas_um2": qc.areas_um2,
        "percent_of_tissue": percent,
        "ink_mm2": round(qc.areas_um2.get("ink", 0.0) / 1e6, 4),
        "median_edge_blur_um": qc.median_edge_blur_um,
        "warning": qc.warning,
    }
    if qc.mode == "exclude" and tile_threshold is not None and store.info.scoring is not None:
        summary["tumour_excluded"] = excluded_tumour(store, tile_threshold)
    return summary


def excluded_tumour(store: TileStore, tile_threshold: float) -> dict[str, Any]:
    """What ``--qc exclude`` took away from the tumour calls: tiles left out that the model called tumour,
    and their tissue area (mm²)."""
    info = store.info
    left_out = ~store.usable_tiles()
    tumour = left_out & (np.nan_to_num(store.positive_scores(), nan=0.0) >= tile_threshold)
    tile_area_mm2 = (min(info.tiling.tile_size_l0, info.tiling.stride_l0) * info.tiling.slide_mpp) ** 2 / 1e6
    return {
        "tumour_tiles": int(tumour.sum()),
        "tissue_mm2": round(float(store.tissue_fraction()[tumour].sum()) * tile_area_mm2, 4),
        "of_tumour_tiles": int((np.nan_to_num(store.positive_scores(), nan=0.0) >= tile_threshold).sum()),
        "threshold": tile_threshold,
    }


def stain_summary(store: TileStore, card: ModelCard, normalised: str) -> dict[str, Any]:
    """The slide's measured stain against the model's reference, for run.json and the batch report."""
    from wsi_dala.tissue.stain import REFERENCE_PROFILE, StainProfile, is_out_of_distribution, stain_distance

    measured = store.info.stain
    reference = card.stain_reference or REFERENCE_PROFILE.to_dict()
    trained_normalised = card.training_data.get("stain_normalise", "none") != "none"
    # Only a reference measured on the training tiles says what the model has seen; the published
    # Macenko reference is a normalisation target, and most real H&E is far from it (CMU-1: 20°).
    measured_reference = card.stain_reference is not None and not trained_normalised
    source = "training tiles (model card)" if measured_reference else "published Macenko H&E reference"
    summary: dict[str, Any] = {
        "slide": measured,
        "reference": reference,
        "reference_source": source,
        "normalised": normalised,
    }
    if measured is None:
        return {**summary, "distance": None, "out_of_distribution": None}
    slide_profile = StainProfile.from_dict(measured, f"{store.path}: stain")
    distance = stain_distance(slide_profile, StainProfile.from_dict(reference, "model card stain reference"))
    return {
        **summary,
        "distance": {k: round(v, 3) for k, v in distance.items()},
        # None: not judged (no measured reference, or the tiles were mapped to the reference before scoring)
        "out_of_distribution": is_out_of_distribution(distance)
        if measured_reference and normalised == "none"
        else None,
        "summary": f"H {distance['h_angle_deg']:.0f}°, E {distance['e_angle_deg']:.0f}° from the reference, "
        f"intensity ×{2 ** distance['h_log2_ratio']:.2f} H, ×{2 ** distance['e_log2_ratio']:.2f} E",
    }


def calibration_summary(card: ModelCard) -> dict[str, Any]:
    """What run.json says about the probabilities: scaled by the card's temperature, or uncalibrated."""
    if card.temperature is None:
        return {
            "status": "uncalibrated",
            "temperature": 1.0,
            "note": "the model card has no temperature: probabilities are the network's softmax as is "
            "(wsi-dala calibrate fits one)",
        }
    return {"status": "calibrated", "temperature": card.temperature, "fit": card.calibration}


@dataclass(frozen=True)
class RunStages:
    """What each stage returned, for the record."""

    tiled: TilingResult
    scored: ScoringResult
    heatmap: Heatmap
    exported: ExportResult
    overlapped_chunks: int  # chunks scored while the tiler was still writing
    mil: MilPlan | None = None
    mil_answer: MilAnswer | None = None


def build_record(
    slide_path: Path,
    checkpoint: Path,
    checkpoint_sha: str,
    card: ModelCard,
    key: str,
    config: PipelineConfig,
    layout: RunLayout,
    stages: RunStages,
    timings: dict[str, float],
) -> RunRecord:
    tiled, cut, total = stages.tiled, stages.tiled.record, timings["total"]
    return RunRecord(
        run_key=key,
        slide_stem=layout.slide_stem,
        slide={"path": str(slide_path.resolve()), **slide_fingerprint(slide_path)},
        model={
            "path": str(checkpoint.resolve()),
            "sha256": checkpoint_sha,
            "architecture": card.architecture,
            "class_names": card.class_names,
            "positive_class": card.positive_class,
            "tile_size_px": card.tile_size_px,
            "mpp": card.mpp,
            "origin": card_origin(card),
            "cam": "DT Grad-CAM"
            if TileStore(tiled.store).info.require_scores(str(tiled.store)).has_cams
            else "none: the model has no feature map; the tumour layer and regions are its probability",
        },
        resolution=RunResolution(
            slide_mpp=cut.slide_mpp,
            slide_mpp_source=cut.mpp_source,
            tile_mpp=cut.effective_mpp,
            level=cut.level,
            resize_factor=cut.resize_factor,
            heatmap_cell_mpp=stages.heatmap.cell_mpp,
        ),
        counts=RunCounts(
            tiles=int(TileStore(tiled.store).usable_tiles().sum()),
            grid_tiles=cut.grid_tiles,
            tumour_tiles=_count_positive(tiled.store, config.export.tile_threshold),
            regions=stages.exported.n_regions,
        ),
        regions=stages.exported.regions,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        tiles_per_s=round(tiled.n_tiles / total, 2) if total > 0 else None,
        scoring={
            "precision": stages.scored.precision,
            "device": stages.scored.device,
            "chunks_resumed": stages.scored.chunks_resumed - stages.overlapped_chunks,
            "chunks_scored_while_tiling": stages.overlapped_chunks,
            "backend": stages.scored.backend,
        },
        settings=config.to_dict(),
        outputs={name: path.name for name, path in run_outputs(layout, config).items()},
        versions=_versions(),
        qc=qc_summary(TileStore(tiled.store), config.export.tile_threshold),
        stain=stain_summary(TileStore(tiled.store), card, config.scoring.stain_normalise),
        calibration=calibration_summary(card),
        heatmap=stages.heatmap.summary(),
        slide_answer=_slide_answer(layout, config, stages, cut.slide_mpp, card).to_dict(),
        mil=stages.mil_answer.summary(stages.mil) if stages.mil and stages.mil_answer else {},
    )


def _slide_answer(
    layout: RunLayout, config: PipelineConfig, stages: RunStages, slide_mpp: float, card: ModelCard
) -> SlideAnswer:
    """The slide answer, at the MIL model's thresholds on its slide probability when the run has one, else at
    the classifier card's; written as the whole-tissue annotation too."""
    store = TileStore(stages.tiled.store)
    qc = store.info.qc
    tissue_um2 = qc.areas_um2.get("tissue") if qc is not None else None
    probabilities = store.positive_scores()[store.usable_tiles()] if store.info.n_tiles else np.zeros(0)
    regions = layout.tumour_geojson(config.export.gzip)
    warnings = quality_notes(
        qc_summary(store, config.export.tile_threshold), stain_summary(store, card, config.scoring.stain_normalise)
    )
    mil_probability = stages.mil_answer.probability if stages.mil_answer else None
    if stages.mil is not None:
        thresholds = SlideThresholds.from_card(stages.mil.card.slide_thresholds, str(stages.mil.model))
    else:
        thresholds = SlideThresholds.from_card(card.slide_thresholds, "model card")
    answer = slide_answer(
        regions,
        min(config.export.region_thresholds),
        slide_mpp,
        tissue_um2,
        probabilities,
        thresholds,
        warnings,
        mil_probability,
    )
    mask = store.tissue_mask()
    if mask is not None:
        min_area_l0 = config.export.min_region_area_um2 / slide_mpp**2
        feature = tissue_feature(mask, store.info.tiling.mask_downsample, answer, min_area_l0)
        if feature is not None:
            write_feature_collection(layout.slide_geojson(config.export.gzip), [feature])
    return answer


def _count_positive(store_path: Path, threshold: float) -> int:
    store = TileStore(store_path)
    if store.info.n_tiles == 0:
        return 0
    return int(((store.positive_scores() >= threshold) & store.usable_tiles()).sum())


def run_outputs(layout: RunLayout, config: PipelineConfig) -> dict[str, Path]:
    measured_sd = config.scoring.tta != "none" or config.scoring.mc_dropout > 0
    return {
        **({"uncertainty": layout.uncertainty_png} if measured_sd else {}),
        **({"attention": layout.attention_png} if config.mil else {}),
        "tiles_store": layout.tiles_store,
        "heatmap": layout.heatmap_store,
        "heatmap_ngff": layout.heatmap_ngff,
        "thumbnail": layout.thumbnail_png,
        "overview": layout.overview_png,
        "overlay": layout.overlay_png,
        "tiles_geojson": layout.tiles_geojson(config.export.gzip),
        "tumour_geojson": layout.tumour_geojson(config.export.gzip),
        "slide_geojson": layout.slide_geojson(config.export.gzip),
        "tissue_mask": layout.tissue_mask_png,
        "qc": layout.qc_png,
        "run_json": layout.run_json,
    }


def _versions() -> dict[str, str]:
    import dask
    import openslide
    import tiffslide
    import torch
    import zarr

    return {
        "wsi_dala": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "openslide": openslide.__library_version__,
        "tiffslide": tiffslide.__version__,
    }
