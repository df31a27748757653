"""A run's answer at slide level (issue 31, first part): how much tumour, how large its largest focus, how
sure the most suspicious tiles are, and a slide call.

From what the run already wrote: the tumour regions of the QuPath GeoJSON at the lowest region threshold
(the outermost, as the annotations nest), the tissue area of the tile store's QC record and the tiles'
probabilities. The greatest diameter of a region is its Feret diameter: the largest distance between two
vertices of its convex hull. The call is ``tumour``, ``no tumour`` or ``indeterminate``, at the
slide-level thresholds of the model card (``wsi_dala.model.slide_thresholds``); without them it is
``indeterminate`` and says why, and a slide with QC or stain warnings is at most ``indeterminate``. Nothing
here removes or changes a region or a probability.
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import shape

from qupath_export.geojson import annotation_feature, classification
from qupath_export.polygons import contour_polygons
from wsi_dala.model.slide_thresholds import SlideThresholds, slide_call

TISSUE_CLASS, TISSUE_COLOUR = "Tissue", (90, 110, 190)  # the whole-tissue annotation of the slide answer
TISSUE_SMOOTHING_PX = 1.0  # Gaussian sigma, in tissue-mask pixels, before the tissue outline is traced
TOP_K_TILES = 10  # the mean probability of the k most suspicious tiles
NOTE_PERCENT = 1.0  # QC findings below this share of the tissue are not worth a warning


def quality_notes(qc: dict[str, Any], stain: dict[str, Any]) -> list[str]:
    """One short line per QC or stain finding a person should look at ("12 % of tissue out of focus"): the
    batch report lists them, and any of them keeps a slide from being called "no tumour"."""
    notes = []
    percent = qc.get("percent_of_tissue", {}) if isinstance(qc, dict) else {}
    for name, words in (("blur", "out of focus"), ("fold", "folded")):
        value = percent.get(name, 0.0)
        if isinstance(value, (int, float)) and value >= NOTE_PERCENT:
            notes.append(f"{value:.0f} % of tissue {words}")
    ink_mm2 = qc.get("ink_mm2", 0.0) if isinstance(qc, dict) else 0.0
    if isinstance(ink_mm2, (int, float)) and ink_mm2 > 0:
        notes.append(f"marker ink on {ink_mm2:.2f} mm² (removed from the tissue)")
    if isinstance(stain, dict) and stain.get("out_of_distribution"):
        notes.append(f"out of distribution: stain ({stain.get('summary', 'far from the model reference')})")
    warning = qc.get("warning") if isinstance(qc, dict) else None
    if isinstance(warning, str) and warning:
        notes.append(warning.split(";")[0])  # "QC flagged 97 of 100 tiles (97 %: 97 out of focus)"
    return notes


@dataclass(frozen=True)
class SlideAnswer:
    tumour_area_mm2: float
    tissue_area_mm2: float | None
    tumour_share_of_tissue: float | None
    regions: int
    largest_region_mm2: float
    largest_region_diameter_mm: float
    top_k: int
    top_k_mean_probability: float | None
    call: str
    call_reason: str
    warnings: list[str] = field(default_factory=list)  # QC and stain findings (quality_notes)
    slide_probability: float | None = None  # an attention-MIL model's, when the run had one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def words(self) -> str:
        """One line for the command line."""
        share = (
            f" ({100 * self.tumour_share_of_tissue:.1f} % of tissue)" if self.tumour_share_of_tissue is not None else ""
        )
        top = f"{self.top_k_mean_probability:.2f}" if self.top_k_mean_probability is not None else "–"
        largest = (
            f"; largest region {self.largest_region_mm2:.2f} mm², {self.largest_region_diameter_mm:.2f} mm across"
            if self.regions
            else ""
        )
        mil = f"; MIL slide probability {self.slide_probability:.2f}" if self.slide_probability is not None else ""
        return (
            f"tumour {self.tumour_area_mm2:.2f} mm²{share} in {self.regions} region(s){largest}; "
            f"top-{self.top_k} mean probability {top}{mil}; call: {self.call} ({self.call_reason})"
        )


def read_collection(path: Path) -> dict[str, Any]:
    """A GeoJSON FeatureCollection this project wrote (``.geojson`` or ``.geojson.gz``)."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return dict(json.load(handle))
    return dict(json.loads(path.read_text(encoding="utf-8")))


def lowest_threshold_regions(regions_geojson: Path) -> list[dict[str, Any]]:
    """The tumour regions' features at the lowest region threshold (the outermost outlines: they nest)."""
    features = read_collection(regions_geojson).get("features", [])
    levels = [f.get("properties", {}).get("measurements", {}).get("Threshold") for f in features]
    lowest = min((level for level in levels if isinstance(level, (int, float))), default=None)
    return [f for f, level in zip(features, levels, strict=True) if lowest is not None and level == lowest]


def region_polygons(regions_geojson: Path, threshold: float) -> list[Any]:
    """The tumour annotations outlined at ``threshold`` (level-0 pixels), as shapely geometries: measured
    on the file as written, so the answer is what QuPath shows."""
    found = []
    for feature in read_collection(regions_geojson).get("features", []):
        measurements = feature.get("properties", {}).get("measurements", {})
        level = measurements.get("Threshold") if isinstance(measurements, dict) else None
        if level is None or abs(float(level) - threshold) < 1e-9:
            found.append(shape(feature["geometry"]))
    return found


def tissue_feature(
    tissue_mask: np.ndarray, mask_downsample: float, answer: SlideAnswer, min_area_l0: float
) -> dict[str, Any] | None:
    """A QuPath annotation over the whole tissue carrying the slide answer as measurements (the call and its
    reason, which are words, as metadata): one object per slide a pathologist can sort and filter on. The
    outline is traced between mask pixel centres (marching squares), so it has no pixel staircase."""
    # Smoothed by one mask pixel first: a binary mask's contour still steps at 45° edges.
    smooth = ndimage.gaussian_filter(np.asarray(tissue_mask, dtype=np.float32), TISSUE_SMOOTHING_PX, mode="constant")
    outline = contour_polygons(
        smooth,
        0.5,
        mask_downsample,
        simplify_tolerance=0.5 * mask_downsample,
        min_area=min_area_l0,
    )
    measurements = {
        "Tumour area mm^2": answer.tumour_area_mm2,
        "Tissue area mm^2": answer.tissue_area_mm2 if answer.tissue_area_mm2 is not None else float("nan"),
        "Tumour share of tissue": answer.tumour_share_of_tissue
        if answer.tumour_share_of_tissue is not None
        else float("nan"),
        "Tumour regions": float(answer.regions),
        "Largest region mm^2": answer.largest_region_mm2,
        "Largest region diameter mm": answer.largest_region_diameter_mm,
        f"Top-{answer.top_k} mean tumour probability": answer.top_k_mean_probability
        if answer.top_k_mean_probability is not None
        else float("nan"),
    }
    if answer.slide_probability is not None:
        measurements["Slide tumour probability"] = answer.slide_probability
    feature = annotation_feature(outline, TISSUE_CLASS, f"Tissue: slide call {answer.call}", measurements)
    if feature is None:
        return None
    feature["properties"]["classification"] = classification(TISSUE_CLASS, TISSUE_COLOUR)
    feature["properties"]["metadata"] = {
        "Slide call": answer.call,
        "Call reason": answer.call_reason[:300],
        "Warnings": "; ".join(answer.warnings)[:300],
    }
    return feature


def feret_diameter(geometry: Any) -> float:
    """The largest distance between two points of ``geometry`` (between vertices of its convex hull)."""
    hull = shapely.convex_hull(geometry)
    points = np.asarray(shapely.get_coordinates(hull))
    if len(points) < 2:
        return 0.0
    if len(points) > 400:  # a hull this large is rare; its extreme points are enough
        points = points[np.linspace(0, len(points) - 1, 400).astype(int)]
    return float(max(np.hypot(*(a - b)) for a, b in itertools.combinations(points, 2)))


def slide_answer(
    regions_geojson: Path,
    region_threshold: float,
    slide_mpp: float,
    tissue_area_um2: float | None,
    probabilities: np.ndarray,
    thresholds: SlideThresholds | None = None,
    warnings: list[str] | None = None,
    slide_probability: float | None = None,
) -> SlideAnswer:
    polygons = region_polygons(regions_geojson, region_threshold)
    areas_mm2 = [p.area * slide_mpp**2 / 1e6 for p in polygons]
    tumour_mm2 = float(sum(areas_mm2))
    largest = int(np.argmax(areas_mm2)) if areas_mm2 else -1
    tissue_mm2 = tissue_area_um2 / 1e6 if tissue_area_um2 else None
    finite = np.sort(probabilities[np.isfinite(probabilities)])[::-1]
    k = min(TOP_K_TILES, len(finite))
    measures: dict[str, float | None] = {
        "tumour_area_mm2": round(tumour_mm2, 4),
        "top_k_mean_probability": round(float(finite[:k].mean()), 4) if k else None,
        "slide_probability": slide_probability,
    }
    call, reason = slide_call(measures[thresholds.measure] if thresholds else None, thresholds, warnings or [])
    return SlideAnswer(
        tumour_area_mm2=round(tumour_mm2, 4),
        tissue_area_mm2=round(tissue_mm2, 4) if tissue_mm2 else None,
        tumour_share_of_tissue=round(min(1.0, tumour_mm2 / tissue_mm2), 4) if tissue_mm2 else None,
        regions=len(polygons),
        largest_region_mm2=round(areas_mm2[largest], 4) if largest >= 0 else 0.0,
        largest_region_diameter_mm=round(feret_diameter(polygons[largest]) * slide_mpp / 1000, 4)
        if largest >= 0
        else 0.0,
        top_k=k,
        top_k_mean_probability=measures["top_k_mean_probability"],
        call=call,
        call_reason=reason,
        warnings=list(warnings or []),
        slide_probability=slide_probability,
    )
