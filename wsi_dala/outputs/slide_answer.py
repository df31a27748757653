"""A run's answer at slide level (issue 31, first part): how much tumour, how large its largest focus, how
sure the most suspicious tiles are, and a slide call.

From what the run already wrote: the tumour regions of the QuPath GeoJSON at the lowest region threshold
(the outermost, as the annotations nest), the tissue area of the tile store's QC record and the tiles'
probabilities. The greatest diameter of a region is its Feret diameter: the largest distance between two
vertices of its convex hull. The call is ``tumour``, ``no tumour`` or ``indeterminate``; it needs
slide-level thresholds chosen from slide labels in the model card, which no card holds yet, so today
every call is ``indeterminate`` and says why (a slide with QC or stain warnings would be at most
``indeterminate`` whatever the thresholds). Nothing here removes or changes a region or a probability.
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape

TOP_K_TILES = 10  # the mean probability of the k most suspicious tiles
CALL_TUMOUR, CALL_NONE, CALL_INDETERMINATE = "tumour", "no tumour", "indeterminate"
NO_THRESHOLDS = "no slide-level thresholds in the model card: they are chosen from slide labels, not yet available"


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
        return (
            f"tumour {self.tumour_area_mm2:.2f} mm²{share} in {self.regions} region(s){largest}; "
            f"top-{self.top_k} mean probability {top}; call: {self.call} ({self.call_reason})"
        )


def region_polygons(regions_geojson: Path, threshold: float) -> list[Any]:
    """The tumour annotations outlined at ``threshold`` (level-0 pixels), as shapely geometries."""
    if regions_geojson.suffix == ".gz":
        with gzip.open(regions_geojson, "rt", encoding="utf-8") as handle:
            collection = json.load(handle)
    else:
        collection = json.loads(regions_geojson.read_text(encoding="utf-8"))
    found = []
    for feature in collection.get("features", []):
        measurements = feature.get("properties", {}).get("measurements", {})
        level = measurements.get("Threshold") if isinstance(measurements, dict) else None
        if level is None or abs(float(level) - threshold) < 1e-9:
            found.append(shape(feature["geometry"]))
    return found


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
) -> SlideAnswer:
    polygons = region_polygons(regions_geojson, region_threshold)
    areas_mm2 = [p.area * slide_mpp**2 / 1e6 for p in polygons]
    tumour_mm2 = float(sum(areas_mm2))
    largest = int(np.argmax(areas_mm2)) if areas_mm2 else -1
    tissue_mm2 = tissue_area_um2 / 1e6 if tissue_area_um2 else None
    finite = np.sort(probabilities[np.isfinite(probabilities)])[::-1]
    k = min(TOP_K_TILES, len(finite))
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
        top_k_mean_probability=round(float(finite[:k].mean()), 4) if k else None,
        call=CALL_INDETERMINATE,
        call_reason=NO_THRESHOLDS,
    )
