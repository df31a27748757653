"""Lesion masks per training tile, from QuPath annotation polygons (``train --mask-guided``).

Each tile of an annotated slide gets the part of it that lies inside the lesion class's polygons, as a
boolean image at the tile's pixel size: a pixel is lesion when its centre lies inside (shapely's
vectorised ``contains_xy`` on a prepared geometry), so holes in a polygon are holes in the mask and the
mask is exact to the pixel whatever the polygon's shape. Masks are written to a Zarr beside the slide's
``tiles.zarr`` (``lesion_masks.zarr``: one [N, S, S] boolean array, row i the mask of tile i) and reused
when the annotation file, the class and the tiles are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import shapely
import zarr
from shapely.geometry.base import BaseGeometry

from qupath_export.annotations import read_annotation_file
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import LESION_MASKS_ARRAY, building_path, lesion_masks_store
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.datasets import Sample
from wsi_dala.training.slide_tiles import AnnotatedSlide, slide_annotations

log = logging.getLogger(__name__)
MASKS = LESION_MASKS_ARRAY
CHUNK_ROWS = 8  # masks per chunk: a training batch reads tiles in random order
_KEY = "key"


def tile_mask(lesion: BaseGeometry, x0: float, y0: float, size_l0: float, size_px: int) -> np.ndarray:
    """[size_px, size_px] bool: which pixels of the tile at level-0 (x0, y0) have their centre in ``lesion``."""
    step = size_l0 / size_px
    centres = (np.arange(size_px) + 0.5) * step
    xs, ys = np.meshgrid(x0 + centres, y0 + centres)
    return shapely.contains_xy(lesion, xs.ravel(), ys.ravel()).reshape(size_px, size_px)


def lesion_geometry(polygons: list[BaseGeometry]) -> BaseGeometry:
    """The union of the lesion polygons, prepared for many point tests."""
    union = shapely.union_all(polygons) if polygons else shapely.Polygon()
    shapely.prepare(union)
    return union


def write_lesion_masks(store: TileStore, lesion: BaseGeometry, key_text: str, rows: np.ndarray | None = None) -> Path:
    """Masks of every tile of ``store`` (or of ``rows`` only, the rest left empty), beside the store."""
    path = lesion_masks_store(store.path)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    if path.exists():
        try:
            if zarr.open_group(path, mode="r", zarr_format=3).attrs.get(_KEY) == key:
                return path
        except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError):
            pass
    info = store.info
    size_px, size_l0 = info.tile_size_px, info.tile_size_l0
    coords = store.coords()
    building = building_path(path)
    if building.exists():
        shutil.rmtree(building)
    group = zarr.open_group(building, mode="w", zarr_format=3)
    masks = group.create_array(
        MASKS, shape=(len(coords), size_px, size_px), chunks=(CHUNK_ROWS, size_px, size_px), dtype="bool"
    )
    wanted = np.zeros(len(coords), dtype=bool)
    wanted[np.arange(len(coords)) if rows is None else np.asarray(rows, dtype=np.int64)] = True
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size_l0, coords[:, 1] + size_l0)
    touching = wanted & shapely.intersects(boxes, lesion)
    for start in range(0, len(coords), CHUNK_ROWS):  # one write per chunk
        block = np.zeros((min(CHUNK_ROWS, len(coords) - start), size_px, size_px), dtype=bool)
        for offset in np.flatnonzero(touching[start : start + CHUNK_ROWS]):
            x, y = coords[start + offset]
            block[offset] = tile_mask(lesion, float(x), float(y), size_l0, size_px)
        masks[start : start + len(block)] = block
    group.update_attributes({_KEY: key})
    if path.exists():
        shutil.rmtree(path)
    building.rename(path)
    log.info("%s: lesion masks of %d tiles touching the lesion polygons", path, int(touching.sum()))
    return path


def read_mask(path: Path, row: int) -> np.ndarray:
    array = zarr.open_group(path, mode="r", zarr_format=3)[MASKS]
    assert isinstance(array, zarr.Array)
    return np.asarray(array[row], dtype=bool)


def attach_lesion_masks(samples: list[Sample], slides: list[AnnotatedSlide], lesion_class: str) -> list[Sample]:
    """``samples`` with the lesion mask of each tile (written beside its slide's tile store), from the
    polygons of ``lesion_class`` in each slide's annotations. A ConfigError when no slide has any."""
    by_slide = {item.slide.resolve(): item for item in slides}
    stores: dict[str, Path] = {}
    found = 0
    for source in dict.fromkeys(s.source for s in samples):
        store = TileStore(source)
        slide = store.info.tiling.slide
        item = by_slide.get(Path(slide.path).resolve())
        if item is None:
            continue
        read = read_annotation_file(item.annotations)
        used = slide_annotations(read, float(slide.width), float(slide.height))
        polygons = [a.geometry for a in used.annotations if a.class_name == lesion_class]
        found += len(polygons)
        rows = np.array([s.index for s in samples if s.source == source], dtype=np.int64)
        key = f"{hashlib.sha256(item.annotations.read_bytes()).hexdigest()}:{lesion_class}:{store.info.n_tiles}"
        stores[source] = write_lesion_masks(store, lesion_geometry(polygons), key, rows)
    if not found:
        files = ", ".join(str(item.annotations) for item in slides[:3])
        raise ConfigError(
            f"--mask-guided: {files}: no polygon of the lesion class {lesion_class!r}; draw the lesions as "
            "polygons of that class in QuPath (or name it with --positive-class)"
        )
    return [replace(s, mask=str(stores[s.source])) if s.source in stores else s for s in samples]
