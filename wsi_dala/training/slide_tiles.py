"""Training tiles from slides annotated in QuPath: tile with the tiler, label by annotation class.

A tile takes the class of the annotation that covers at least ``min_cover`` of its area (the larger
cover wins where two overlap); uncovered tiles are dropped, or given ``unannotated_class``. The group
of every tile is its slide, so a split never puts one slide on both sides.

Annotations are clipped to the slide's level-0 rectangle (QuPath's frame); those entirely outside it,
and points or lines (no area), label nothing. Each slide logs what was repaired, clipped, outside or
skipped, and a class that ends up with no tile at all is a `ConfigError`, not a model trained without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely import STRtree

from qupath_export.annotations import Annotation, AnnotationError, AnnotationRead, read_annotation_file
from wsi_dala.core.config import TilingConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import annotations_beside, slide_tiles_dir
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import tile_slide
from wsi_dala.training.datasets import Sample

log = logging.getLogger(__name__)


def _read(path: Path) -> AnnotationRead:
    try:
        return read_annotation_file(path)
    except AnnotationError as exc:
        raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class AnnotatedSlide:
    slide: Path
    annotations: Path


@dataclass(frozen=True)
class SlideAnnotations:
    """One slide's classified annotations as labelling uses them, and what happened to them on the way.

    ``annotations``: polygonal, valid and inside the slide (clipped to it where they crossed its edge);
    ``outside``: those entirely outside the slide; ``skipped``: points and lines, which cover no area."""

    file: Path
    width: float
    height: float
    annotations: list[Annotation] = field(default_factory=list)
    outside: list[Annotation] = field(default_factory=list)
    skipped: list[Annotation] = field(default_factory=list)
    repaired: int = 0
    clipped: int = 0
    unclassified: int = 0

    def summary(self) -> str:
        return (
            f"{self.file}: annotations: {len(self.annotations)} used, {self.repaired} repaired (invalid geometry), "
            f"{self.clipped} clipped to the slide ({self.width:g} x {self.height:g} px), "
            f"{len(self.outside)} entirely outside it, {len(self.skipped)} skipped (points or lines: no area), "
            f"{self.unclassified} unclassified (ignored)"
        )

    @property
    def changed(self) -> bool:
        return bool(self.repaired or self.clipped or self.outside or self.skipped)


def slide_annotations(read: AnnotationRead, width: float, height: float) -> SlideAnnotations:
    """The classified annotations of ``read`` clipped to the slide's level-0 rectangle ``(0, 0, width, height)``."""
    slide_box = shapely.box(0, 0, width, height)
    inside: list[Annotation] = []
    outside: list[Annotation] = []
    clipped = 0
    classified = [a for a in read.annotations if a.class_name]
    for annotation in classified:
        x0, y0, x1, y1 = annotation.geometry.bounds
        if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
            inside.append(annotation)
            continue
        with np.errstate(all="ignore"):
            part = _polygonal(shapely.intersection(annotation.geometry, slide_box))
        if part is None:
            outside.append(annotation)
        else:
            clipped += 1
            inside.append(Annotation(part, annotation.class_name, annotation.object_type, annotation.name))
    return SlideAnnotations(
        file=read.path,
        width=width,
        height=height,
        annotations=inside,
        outside=outside,
        skipped=[a for a in read.skipped if a.class_name],
        repaired=read.repaired,
        clipped=clipped,
        unclassified=len(read.annotations) - len(classified),
    )


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry | None:
    """The area of an intersection (it may come with lines or points where edges touch); None if it has none."""
    parts = [p for p in shapely.get_parts(geometry) if isinstance(p, (shapely.Polygon, shapely.MultiPolygon))]
    parts = [p for p in parts if p.area > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


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
    annotations: Path | Sequence[Annotation],
    class_names: list[str],
    min_cover: float,
    unannotated_class: str | None,
    slide_size: tuple[float, float] | None = None,
) -> np.ndarray:
    """Label index per tile (-1: no label).

    ``annotations``: a GeoJSON file or annotations already read; with ``slide_size`` (level-0 width,
    height) they are clipped to the slide first."""
    if isinstance(annotations, Path):
        annotations = _read(annotations).annotations
    if slide_size is not None:
        annotations = slide_annotations(AnnotationRead(Path(), list(annotations)), *slide_size).annotations
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + tile_size_l0, coords[:, 1] + tile_size_l0)
    cover = np.zeros((len(coords), len(class_names)))
    tree = STRtree(boxes)
    for annotation in annotations:
        if annotation.class_name not in class_names:
            continue
        hits = tree.query(annotation.geometry)
        if len(hits):
            with np.errstate(all="ignore"):
                area = shapely.area(shapely.intersection(boxes[hits], annotation.geometry))
            cover[hits, class_names.index(annotation.class_name)] += area / (tile_size_l0**2)
    labels = np.where(cover.max(axis=1, initial=0.0) >= min_cover, cover.argmax(axis=1), -1)
    if unannotated_class is not None:
        labels[(labels < 0) & (cover.sum(axis=1) == 0)] = class_names.index(unannotated_class)
    return labels


@dataclass
class _ClassTally:
    """One class across all slides: where it is named, what became of its annotations, its tiles."""

    files: list[Path] = field(default_factory=list)
    annotations: int = 0
    outside: int = 0
    skipped: int = 0
    tiles: int = 0


def _files_text(paths: Sequence[Path]) -> str:
    unique = list(dict.fromkeys(str(p) for p in paths))
    shown = ", ".join(unique[:3])
    return shown + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _no_tiles(name: str, tally: _ClassTally, min_cover: float, unannotated_class: str | None) -> str:
    """Why a class has no tiles, for the one-line error."""
    if not tally.annotations:  # only the --unannotated-class
        return (
            f"class {name!r} (--unannotated-class) has no tiles: every tissue tile overlaps an annotation"
            f" ({_files_text(tally.files)})"
        )
    reasons = []
    if tally.outside:
        reasons.append(f"{tally.outside} entirely outside the slide")
    if tally.skipped:
        reasons.append(f"{tally.skipped} points or lines, which cover no area")
    rest = tally.annotations - tally.outside - tally.skipped
    if rest:
        reasons.append(f"{rest} covering less than --min-cover {min_cover:g} of any tissue tile")
    note = " (--unannotated-class too)" if name == unannotated_class else ""
    return (
        f"{_files_text(tally.files)}: class {name!r}{note} has no tiles: "
        f"of its {_plural(tally.annotations, 'annotation')}, {', '.join(reasons)}"
    )


def _tally_classes(
    reads: list[AnnotationRead], slides: list[AnnotatedSlide], unannotated_class: str | None
) -> tuple[list[str], dict[str, _ClassTally]]:
    """The class names (sorted, then ``unannotated_class``) and a tally per class of its annotations."""
    tallies: dict[str, _ClassTally] = {}
    for read in reads:
        for group, skipped in ((read.annotations, False), (read.skipped, True)):
            for annotation in group:
                if annotation.class_name:
                    tally = tallies.setdefault(annotation.class_name, _ClassTally())
                    tally.files.append(read.path)
                    tally.annotations += 1
                    tally.skipped += skipped
    names = sorted(tallies)
    if unannotated_class and unannotated_class not in names:
        names.append(unannotated_class)
        tallies[unannotated_class] = _ClassTally(files=[item.slide for item in slides])
    if len(names) < 2:
        raise ConfigError(
            f"{_files_text([item.annotations for item in slides])}: need at least 2 classes in the annotations "
            f"(found {names}); add --unannotated-class for tissue outside annotations"
        )
    return names, tallies


def _label_slide(
    item: AnnotatedSlide,
    read: AnnotationRead,
    store: TileStore,
    names: list[str],
    tallies: dict[str, _ClassTally],
    min_cover: float,
    unannotated_class: str | None,
) -> np.ndarray:
    """Label one slide's tiles (-1: none), clipping its annotations to the slide; updates the tallies."""
    slide = store.info.tiling.slide
    used = slide_annotations(read, float(slide.width), float(slide.height))
    for annotation in used.outside:
        tallies[str(annotation.class_name)].outside += 1
    labels = label_tiles(store.coords(), store.info.tile_size_l0, used.annotations, names, min_cover, unannotated_class)
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    for name, count in zip(names, counts, strict=True):
        tallies[name].tiles += int(count)
    per_class = ", ".join(f"{name} {int(count)}" for name, count in zip(names, counts, strict=True))
    level = logging.WARNING if used.changed else logging.INFO
    labelled = int((labels >= 0).sum())
    log.log(level, "%s: %d labelled tiles of %d (%s); %s", item.slide, labelled, len(labels), per_class, used.summary())
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

    ``tiling`` must have its target (µm/px and tile size) set. Raises `ConfigError` when fewer than two
    classes are named, or when any class ends up with no labelled tile."""
    reads = [_read(item.annotations) for item in slides]
    names, tallies = _tally_classes(reads, slides, unannotated_class)
    # Points and lines label nothing: a class drawn only with them fails before any slide is tiled.
    only_points = [n for n in names if tallies[n].annotations and tallies[n].skipped == tallies[n].annotations]
    _raise_for_classes_without_tiles(only_points, tallies, min_cover, unannotated_class)
    samples: list[Sample] = []
    mpps = set()
    n_tiles = 0
    for item, read in zip(slides, reads, strict=True):
        result = tile_slide(item.slide, slide_tiles_dir(out_dir, item.slide), tiling, progress=progress)
        labels = _label_slide(item, read, TileStore(result.store), names, tallies, min_cover, unannotated_class)
        n_tiles += len(labels)
        mpps.add(round(result.record.effective_mpp, 6))
        samples += [
            Sample(str(result.store), int(label), item.slide.name, index=int(i))
            for i, label in enumerate(labels)
            if label >= 0
        ]
    if n_tiles == 0:
        raise ConfigError(
            f"{_files_text([item.slide for item in slides])}: no tissue tiles to label (see --min-tissue)"
        )
    _raise_for_classes_without_tiles([n for n in names if tallies[n].tiles == 0], tallies, min_cover, unannotated_class)
    if len(mpps) > 1:
        log.warning("slides were tiled at different µm/px: %s", sorted(mpps))
    return samples, names, float(min(mpps)) if mpps else tiling.target_mpp


def _raise_for_classes_without_tiles(
    empty: list[str], tallies: dict[str, _ClassTally], min_cover: float, unannotated_class: str | None
) -> None:
    if empty:
        raise ConfigError("; ".join(_no_tiles(name, tallies[name], min_cover, unannotated_class) for name in empty))
