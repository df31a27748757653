"""What a run found against a generated slide's planted truth: region IoU, outline distance, tile AUC and
calibration. Used by the demo, the benchmarks and the tests, for slides of either generator
(:mod:`wsi_dala.slides.synthetic`, :mod:`wsi_dala.slides.synthetic_texture`): both keep the truth as label maps. And the
reference for real marker ink, which comes with no mask (:func:`real_ink_reference`).

Tissue under marker ink (and ``ink_margin_um`` around it) is left out of the region measures: it is cut out
of the tissue mask, so no tool can call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from qupath_export.annotations import read_annotations
from qupath_export.geojson import annotation_feature, write_feature_collection
from qupath_export.polygons import mask_to_polygons
from wsi_dala.model.calibration import ece
from wsi_dala.slides.synthetic import TUMOUR
from wsi_dala.tiling.grid import tissue_fractions
from wsi_dala.tiling.store import TileStore

INK_MARGIN_UM = 150.0  # tiles QC flags for ink reach about a tile (and the ink margin) beyond the ink
POSITIVE_COVER, NEGATIVE_COVER = 0.5, 0.1  # a tile is tumour from half covered, and not tumour under a tenth


class _Spec(Protocol):
    @property
    def mpp(self) -> float: ...


class PlantedSlide(Protocol):
    """A generated slide with its truth maps (either generator)."""

    @property
    def path(self) -> Path: ...
    @property
    def spec(self) -> _Spec: ...
    @property
    def labels(self) -> np.ndarray: ...
    @property
    def ink(self) -> np.ndarray: ...
    @property
    def label_px(self) -> int: ...
    def ink_mask(self, *names: str) -> np.ndarray: ...


def planted_tumour(slide: PlantedSlide) -> BaseGeometry:
    """The planted tumour as level-0 polygons."""
    return mask_to_polygons(slide.labels == TUMOUR, pixel_size=slide.label_px)


def write_truth_annotations(slide: PlantedSlide, path: Path) -> Path:
    """The planted tumour as QuPath annotations (what a pathologist would draw and export)."""
    features = [f for f in (annotation_feature(p, "Tumor", "planted tumour") for p in planted_tumour(slide).geoms) if f]
    write_feature_collection(path, features)
    return path


def _without_ink(slide: PlantedSlide, *geometries: BaseGeometry, margin_um: float) -> list[BaseGeometry]:
    if not slide.ink.any():
        return list(geometries)
    ink = mask_to_polygons(slide.ink_mask(), pixel_size=slide.label_px).buffer(margin_um / slide.spec.mpp)
    return [shapely.difference(g, ink) for g in geometries]


def exported_tumour(regions_geojson: Path, threshold: float | None = None) -> BaseGeometry:
    """The union of the exported tumour annotations (at one threshold, when given: they nest)."""
    annotations = read_annotations(regions_geojson)
    if threshold is not None:
        annotations = [a for a in annotations if f"p >= {threshold:g}" in (a.name or "")] or annotations
    return shapely.union_all([a.geometry for a in annotations])


def tumour_iou(slide: PlantedSlide, regions_geojson: Path, ink_margin_um: float = INK_MARGIN_UM) -> float:
    """IoU of exported tumour annotations with the planted tumour (level-0 polygons), outside marker ink
    and ``ink_margin_um`` around it."""
    truth, found = _without_ink(slide, planted_tumour(slide), exported_tumour(regions_geojson), margin_um=ink_margin_um)
    union = shapely.union(truth, found).area
    return float(shapely.intersection(truth, found).area / union) if union > 0 else 0.0


def outline_distance_um(
    slide: PlantedSlide, regions_geojson: Path, threshold: float = 0.5, ink_margin_um: float = INK_MARGIN_UM
) -> float | None:
    """Mean distance (µm) between the exported outlines and the planted ones, both ways (points every few µm
    along each outline, to the nearest point of the other), outside ink. None when either is empty."""
    truth, found = _without_ink(
        slide, planted_tumour(slide), exported_tumour(regions_geojson, threshold), margin_um=ink_margin_um
    )
    if truth.is_empty or found.is_empty:
        return None
    step = 4.0 / slide.spec.mpp  # a point every 4 µm

    def points(geometry: BaseGeometry) -> np.ndarray:
        boundary = geometry.boundary
        lengths = np.arange(0.0, boundary.length, step)
        return shapely.line_interpolate_point(shapely.line_merge(boundary), lengths) if len(lengths) else np.array([])

    to_truth = shapely.distance(points(found), truth.boundary)
    to_found = shapely.distance(points(truth), found.boundary)
    both = np.concatenate([to_truth, to_found])
    return float(both.mean() * slide.spec.mpp) if both.size else None


@dataclass(frozen=True)
class TileTruth:
    """Tiles of a run against the planted tumour: which are tumour, which are not, which are ambiguous."""

    positive: np.ndarray  # [N] bool: at least POSITIVE_COVER of the tile is planted tumour
    negative: np.ndarray  # [N] bool: under NEGATIVE_COVER
    probability: np.ndarray  # [N] the run's tumour probability (at the card's temperature)
    temperature: float  # the temperature the probabilities were scaled with (1: none)

    @classmethod
    def of_store(cls, slide: PlantedSlide, store_path: Path) -> TileTruth:
        store = TileStore(store_path)
        cover = tissue_fractions(slide.labels == TUMOUR, float(slide.label_px), store.coords(), store.info.tile_size_l0)
        scoring = store.info.require_scores(str(store_path))
        usable = store.usable_tiles()
        return cls(
            positive=(cover >= POSITIVE_COVER) & usable,
            negative=(cover < NEGATIVE_COVER) & usable,
            probability=store.positive_scores().astype(np.float64),
            temperature=scoring.temperature or 1.0,
        )

    def auc(self) -> float | None:
        """ROC AUC of the probability, tumour tiles against tumour-free ones (ambiguous tiles left out)."""
        from sklearn.metrics import roc_auc_score

        chosen = self.positive | self.negative
        if self.positive.sum() == 0 or self.negative.sum() == 0:
            return None
        return float(roc_auc_score(self.positive[chosen], self.probability[chosen]))

    def ece(self, temperature: float | None = None) -> float | None:
        """Top-label ECE over the unambiguous tiles, at the card's temperature (None) or at ``temperature``
        (the logit recovered from the stored probability: T_card · log(p / (1 − p)))."""
        chosen = self.positive | self.negative
        if not chosen.any():
            return None
        p = np.clip(self.probability[chosen], 1e-7, 1 - 1e-7)
        if temperature is not None:
            logit = self.temperature * np.log(p / (1 - p))
            p = 1.0 / (1.0 + np.exp(-logit / temperature))
        return ece(np.stack([1 - p, p], axis=1), self.positive[chosen].astype(np.int64))


def real_ink_reference(
    rgb: np.ndarray, haemorrhage: list[tuple[int, int]] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A reference for marker ink on a real RGB image, by colour, independent of :mod:`wsi_dala.tissue.detect`'s rules
    (written for the real images in ``benchmarks/tissue.py`` and checked by eye): green-to-blue marker, hue
    0.25-0.66 (saturation > 0.07 relative to the glass); red marker, hue >= 0.95 or <= 0.04 (saturation > 0.12,
    red 30 grey levels above green), less ``haemorrhage`` (a polygon of (x, y): red, but tissue);
    purple-black marker, darker than half the glass. Returns the ink masks by name and the stained tissue
    (saturation > 0.06, less the ink and 3 pixels around it)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from wsi_dala.tissue.detect import glass_colour, hsv

    glass = glass_colour(rgb)
    if glass.max() >= 254:  # a view with no glass: the scanner's white
        glass = np.full(3, 245.0, dtype=np.float32)
    hue, saturation, value = hsv(np.clip(rgb / glass, 0, 1))
    signed = rgb.astype(np.int16)
    green = (hue > 0.25) & (hue < 0.66) & (saturation > 0.07)
    red = ((hue >= 0.95) | (hue <= 0.04)) & (saturation > 0.12) & (signed[..., 0] - signed[..., 1] > 30)
    if haemorrhage:
        polygon = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
        ImageDraw.Draw(polygon).polygon(haemorrhage, fill=1)
        red &= ~np.asarray(polygon).astype(bool)
    dark = (value < 0.5) & ~green & ~red
    tissue = (saturation > 0.06) & (value < 0.96) & ~ndimage.binary_dilation(green | red | dark, iterations=3)
    return {"red": red, "green": green, "purple-black": dark}, tissue
