"""GeoJSON that QuPath 0.4-0.6 imports as is (rules: ``shared/qupath-geojson.md``).

What we write, and why:
- a FeatureCollection (a bare array is not GeoJSON); compact JSON, streamed feature by feature, so a
  million tiles never sit in memory as one document; atomic (temp file, then rename); optional gzip
  (``.geojson.gz``, read by QuPath directly);
- tiles as ``objectType: "tile"`` (a detection: it shows in measurement maps), locked, with a
  classification object that always carries a colour (``{"name": ...}`` alone aborts the import);
- measurements as an object of finite numbers only: a NaN/∞ aborts QuPath 0.4, so such a value is
  omitted, never written;
- tile corners as integers (exact in QuPath's float32 ROIs); polygons made OGC-valid and snapped to
  QuPath 0.6's 0.01-px grid here, so its precision reducer finds nothing to refuse;
- no ``plane`` (2-D brightfield), no ``id`` (optional; re-importing would ask about clashes).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry.base import BaseGeometry

from qupath_export.polygons import clean_polygons

QUPATH_GRID_PX = 0.01  # QuPath 0.6 snaps every geometry to this grid on import
DEFAULT_CLASS_COLOURS = {"Tumor": (200, 0, 0), "Non-tumor": (120, 170, 120), "Other": (255, 200, 0)}


def classification(name: str, colour: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """QuPath's classification object; the colour is mandatory there (without it the import aborts)."""
    name = name.strip()
    if not name or "\n" in name:
        raise ValueError(f"class name {name!r} is not allowed in QuPath")
    rgb = colour or DEFAULT_CLASS_COLOURS.get(name) or _colour_from_name(name)
    return {"name": name, "color": [int(c) & 255 for c in rgb]}


def _colour_from_name(name: str) -> tuple[int, int, int]:
    """A stable colour for a class QuPath does not know yet (Python's hash() changes per process)."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(name))
    return (digest * 37 % 200 + 30, digest * 91 % 200 + 30, digest * 53 % 200 + 30)


def finite_measurements(values: Mapping[str, float], decimals: int = 4) -> dict[str, float]:
    """Measurements QuPath accepts in every version: finite numbers, rounded; others are left out."""
    out = {}
    for key, value in values.items():
        number = float(value)
        if math.isfinite(number):
            out[str(key)] = round(number, decimals)
    return out


def qupath_valid(geometry: BaseGeometry) -> MultiPolygon:
    """Valid polygons on QuPath 0.6's 0.01-px grid (snapping can itself break validity, so snap with GEOS)."""
    snapped = shapely.set_precision(clean_polygons(geometry), QUPATH_GRID_PX)
    return clean_polygons(snapped)


@contextlib.contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with contextlib.ExitStack() as stack:
            raw: io.BufferedIOBase  # a GzipFile or a plain BufferedWriter
            if path.name.endswith(".gz"):
                raw = stack.enter_context(gzip.open(tmp, "wb", compresslevel=6))
            else:
                raw = stack.enter_context(open(tmp, "wb"))
            yield stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8", newline="\n"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_feature_collection(path: str | os.PathLike, features: Iterable[dict[str, Any]]) -> int:
    """Stream features into a compact FeatureCollection; returns how many were written."""
    return write_feature_texts(path, (_compact(feature) for feature in features))


def write_feature_texts(path: str | os.PathLike, texts: Iterable[str]) -> int:
    """Stream features already serialised as compact JSON (e.g. by :func:`tile_feature_texts`) into a
    FeatureCollection, atomically; returns how many were written."""
    count = 0
    with _atomic_text(Path(path)) as out:
        out.write('{"type":"FeatureCollection","features":[')
        for text in texts:
            if count:
                out.write(",")
            out.write(text)
            count += 1
        out.write("]}\n")
    return count


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def tile_features(
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray],
    class_names: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """One locked ``tile`` feature per tile: an integer-cornered rectangle in level-0 pixels."""
    names = list(measurements)
    columns = [np.asarray(measurements[n], dtype=np.float64) for n in names]
    classes = list(class_names) if class_names is not None else None
    side = round(tile_size_l0)
    cache: dict[str, dict] = {}
    for i, (x, y) in enumerate(np.asarray(coords, dtype=np.int64)):
        x0, y0, x1, y1 = int(x), int(y), int(x) + side, int(y) + side
        properties: dict[str, Any] = {"objectType": "tile", "isLocked": True}
        if classes is not None:
            name = classes[i]
            properties["classification"] = cache.setdefault(name, classification(name))
        properties["measurements"] = finite_measurements({n: c[i] for n, c in zip(names, columns, strict=True)})
        yield {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": properties,
        }


def tile_feature_texts(
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray],
    class_names: Iterable[str] | None = None,
) -> Iterator[str]:
    """:func:`tile_features`, each already written as the compact JSON ``write_feature_collection`` would
    write it (byte for byte), a column at a time: a million tiles take seconds, not minutes."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = len(coords)
    classes = list(class_names) if class_names is not None else None
    if classes is not None and len(classes) != n:
        raise ValueError(f"{len(classes)} class names for {n} tiles")
    side = round(tile_size_l0)
    x0, y0 = coords[:, 0].tolist(), coords[:, 1].tolist()
    x1, y1 = (coords[:, 0] + side).tolist(), (coords[:, 1] + side).tolist()
    columns = []  # per measurement: '"name":value' per tile, '' where the value is not finite
    for name, values in measurements.items():
        column = np.asarray(values, dtype=np.float64).reshape(n)
        key = _compact(str(name)) + ":"
        finite = np.isfinite(column).tolist()
        columns.append([key + repr(round(v, 4)) if ok else "" for v, ok in zip(column.tolist(), finite, strict=True)])
    if classes is not None:
        texts = {name: f',"classification":{_compact(classification(name))}' for name in dict.fromkeys(classes)}
        labels = [texts[name] for name in classes]
    else:
        labels = [""] * n
    rows = zip(*columns, strict=True) if columns else ((),) * n
    for x, y, right, bottom, label, row in zip(x0, y0, x1, y1, labels, rows, strict=True):
        yield (
            f'{{"type":"Feature","geometry":{{"type":"Polygon","coordinates":[[[{x},{y}],[{right},{y}],'
            f'[{right},{bottom}],[{x},{bottom}],[{x},{y}]]]}},"properties":{{"objectType":"tile","isLocked":true'
            f'{label},"measurements":{{{",".join(part for part in row if part)}}}}}}}'
        )


def annotation_feature(
    polygon: Polygon | MultiPolygon,
    class_name: str,
    name: str | None = None,
    measurements: Mapping[str, float] | None = None,
) -> dict[str, Any] | None:
    """An ``annotation`` feature for a region (holes kept); None if nothing valid is left."""
    geometry = qupath_valid(polygon)
    if geometry.is_empty:
        return None
    shape = geometry.geoms[0] if len(geometry.geoms) == 1 else geometry
    properties: dict[str, Any] = {"objectType": "annotation", "classification": classification(class_name)}
    if name:
        properties["name"] = name
    if measurements:
        properties["measurements"] = finite_measurements(measurements)
    return {"type": "Feature", "geometry": _rounded(mapping(shape)), "properties": properties}


def _rounded(geometry: Mapping[str, Any]) -> dict[str, Any]:
    """Plain lists with coordinates rounded to the 0.01-px grid (they already lie on it)."""

    def walk(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            if value and isinstance(value[0], (int, float)):
                return [round(float(v), 2) for v in value[:2]]
            return [walk(v) for v in value]
        return value

    return {"type": geometry["type"], "coordinates": walk(geometry["coordinates"])}
