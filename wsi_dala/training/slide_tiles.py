"""Training tiles from slides annotated in QuPath: tile with the tiler, label by annotation class.

A tile takes the class of the annotation that covers at least ``min_cover`` of its area (the larger
cover wins where two overlap); uncovered tiles are dropped, or given ``unannotated_class``. The group
of every tile is its slide, so a split never puts one slide on both sides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely import STRtree

from qupath_export.annotations import Annotation, AnnotationError, read_annotations
from wsi_dala.config import TilingConfig
from wsi_dala.errors import ConfigError
from wsi_dala.layout import annotations_beside, slide_tiles_dir
from wsi_dala.store import TileStore
from wsi_dala.tiling import tile_slide
from wsi_dala.training.datasets import Sample

log = logging.getLogger(__name__)


def _annotations(path: Path) -> list[Annotation]:
    try:
        return read_annotations(path)
    except AnnotationError as exc:
        raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class AnnotatedSlide:
    slide: Path
    annotations: Path


def parse_slide_argument(text: str) -> AnnotatedSlide:
    """``SLIDE`` (GeoJSON beside it: ``<stem>.geojson``) or ``SLIDE=GEOJSON``."""
    slide, _, geojson = text.partition("=")
    slide_path = Path(slide)
    geojson_path = Path(geojson) if geojson else annotations_beside(slide_path)
    if not geojson_path.exists():
        raise ConfigError(f"{slide_path}: no annotation file {geojson_path} (give SLIDE=GEOJSON)")
    return AnnotatedSlide(slide_path, geojson_path)


def label_tiles(
    coords: np.ndarray,
    tile_size_l0: float,
    annotation_file: Path,
    class_names: list[str],
    min_cover: float,
    unannotated_class: str | None,
) -> np.ndarray:
    """Label index per tile (-1: no label)."""
    annotations = [a for a in _annotations(annotation_file) if a.class_name]
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + tile_size_l0, coords[:, 1] + tile_size_l0)
    cover = np.zeros((len(coords), len(class_names)))
    tree = STRtree(boxes)
    for annotation in annotations:
        if annotation.class_name not in class_names:
            continue
        hits = tree.query(annotation.geometry)
        if len(hits):
            area = shapely.area(shapely.intersection(boxes[hits], annotation.geometry))
            cover[hits, class_names.index(annotation.class_name)] += area / (tile_size_l0**2)
    labels = np.where(cover.max(axis=1) >= min_cover, cover.argmax(axis=1), -1)
    if unannotated_class is not None:
        labels[(labels < 0) & (cover.sum(axis=1) == 0)] = class_names.index(unannotated_class)
    return labels


def annotated_slide_samples(
    slides: list[AnnotatedSlide],
    out_dir: Path,
    tiling: TilingConfig,
    min_cover: float = 0.5,
    unannotated_class: str | None = None,
    progress: bool = True,
) -> tuple[list[Sample], list[str], float]:
    """Tile every slide into ``out_dir/<slide>/tiles.zarr``; return samples, class names, tiles' µm/px.

    ``tiling`` must have its target (µm/px and tile size) set."""
    names = sorted({a.class_name for s in slides for a in _annotations(s.annotations) if a.class_name})
    if unannotated_class and unannotated_class not in names:
        names.append(unannotated_class)
    if len(names) < 2:
        raise ConfigError(
            f"need at least 2 classes in the annotations (found {names}); "
            "add --unannotated-class for tissue outside annotations"
        )
    samples: list[Sample] = []
    mpps = set()
    for item in slides:
        result = tile_slide(item.slide, slide_tiles_dir(out_dir, item.slide), tiling, progress=progress)
        store = TileStore(result.store)
        labels = label_tiles(
            store.coords(), store.info.tile_size_l0, item.annotations, names, min_cover, unannotated_class
        )
        mpps.add(round(result.record.effective_mpp, 6))
        samples += [
            Sample(str(result.store), int(label), item.slide.name, index=int(i))
            for i, label in enumerate(labels)
            if label >= 0
        ]
        log.info("%s: %d labelled tiles of %d", item.slide, int((labels >= 0).sum()), len(labels))
    if len(mpps) > 1:
        log.warning("slides were tiled at different µm/px: %s", sorted(mpps))
    return samples, names, float(min(mpps)) if mpps else tiling.target_mpp
