"""Read QuPath annotations back (GeoJSON exported by QuPath or by this package) as labelled polygons.

Coordinates are level-0 pixels in QuPath's frame, as QuPath writes them.

What a hand-edited or foreign file gets:

- refused with `AnnotationError` (one line: the file, the feature's index, the problem): a coordinate that is
  not a finite number (``NaN``, ``Infinity``), a geometry GeoJSON does not allow, ``properties`` that is not
  an object, a ``classification`` that is neither a name nor a QuPath classification object, an
  ``objectType`` or ``name`` that is not a string;
- repaired with ``make_valid`` and counted: invalid polygons (self-intersecting rings, bow ties);
- skipped and counted: geometries with no area (points, lines, empty polygons), which cannot label a region.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.errors import ShapelyError
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import make_valid


class AnnotationError(ValueError):
    """The file is not GeoJSON that QuPath would have written."""


@dataclass(frozen=True)
class Annotation:
    geometry: BaseGeometry
    class_name: str | None
    object_type: str
    name: str | None = None


@dataclass(frozen=True)
class AnnotationRead:
    """What `read_annotation_file` found in one file.

    ``annotations`` are polygonal and valid; ``skipped`` are the features that cover no area (points,
    lines, empty geometries), kept with their geometry as read; ``repaired`` counts the annotations whose
    geometry was invalid and was repaired with ``make_valid``."""

    path: Path
    annotations: list[Annotation] = field(default_factory=list)
    skipped: list[Annotation] = field(default_factory=list)
    repaired: int = 0


def class_name_of(classification: Any) -> str | None:
    """QuPath's classification forms: ``"Tumor"``, ``{"name": ...}``, ``{"names": [...]}`` (derived class)."""
    if classification is None:
        return None
    if isinstance(classification, str):
        return classification.strip() or None
    if isinstance(classification, dict):
        if classification.get("names"):
            return ": ".join(str(n) for n in classification["names"])
        name = classification.get("name")
        return str(name).strip() or None if name is not None else None
    return None


def read_annotations(path: str | Path, object_types: tuple[str, ...] = ("annotation",)) -> list[Annotation]:
    """Polygons of the given QuPath object types (default: annotations; detections and tiles are skipped).

    Invalid polygons come back repaired; points and lines are left out (see `read_annotation_file`)."""
    return read_annotation_file(path, object_types).annotations


def read_annotation_file(path: str | Path, object_types: tuple[str, ...] = ("annotation",)) -> AnnotationRead:
    """The polygons of the given QuPath object types, and what was repaired or skipped on the way."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    annotations: list[Annotation] = []
    skipped: list[Annotation] = []
    repaired = 0
    for number, feature in enumerate(_features(data, path)):
        where = f"{path}: feature {number}"
        properties = _properties(feature, where)
        object_type = _object_type(properties, where)
        if object_type not in object_types:
            continue
        class_name = _class_name(properties.get("classification"), where)
        name = properties.get("name")
        if name is not None and not isinstance(name, str):
            raise AnnotationError(f"{where}: name is {_kind(name)}, not a string")
        geometry, was_repaired = _geometry(feature, where)
        annotation = Annotation(geometry, class_name, object_type, name)
        if geometry.is_empty or shapely.get_type_id(geometry) not in _POLYGONAL:
            skipped.append(annotation)
            continue
        repaired += was_repaired
        annotations.append(annotation)
    return AnnotationRead(path, annotations, skipped, repaired)


_POLYGON, _MULTIPOLYGON = 3, 6  # shapely.GeometryType
_POLYGONAL = (_POLYGON, _MULTIPOLYGON)


def _kind(value: Any) -> str:
    """How a JSON value reads in a message: ``a string``, ``a number``, ``a list``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _properties(feature: dict[str, Any], where: str) -> dict[str, Any]:
    properties = feature.get("properties")
    if properties is None:
        return {}
    if not isinstance(properties, dict):
        raise AnnotationError(f"{where}: properties is {_kind(properties)}, not an object")
    return properties


def _object_type(properties: dict[str, Any], where: str) -> str:
    for key in ("objectType", "object_type"):
        value = properties.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise AnnotationError(f"{where}: {key} is {_kind(value)}, not a string")
        if value:
            return value
    return "annotation"


def _class_name(classification: Any, where: str) -> str | None:
    """`class_name_of`, refusing the forms QuPath never writes."""
    if classification is None or isinstance(classification, str):
        return class_name_of(classification)
    if not isinstance(classification, dict):
        raise AnnotationError(
            f"{where}: classification is {_kind(classification)}, not a class name or an object with a name"
        )
    names = classification.get("names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise AnnotationError(f"{where}: classification names is {_kind(names)}, not a list of strings")
    name = classification.get("name")
    if name is not None and not isinstance(name, str):
        raise AnnotationError(f"{where}: classification name is {_kind(name)}, not a string")
    return class_name_of(classification)


def _geometry(feature: dict[str, Any], where: str) -> tuple[BaseGeometry, bool]:
    """The feature's geometry, repaired if invalid, and whether it was."""
    raw = feature.get("geometry")
    if not isinstance(raw, dict):
        raise AnnotationError(f"{where}: geometry is {_kind(raw)}, not a GeoJSON geometry object")
    if not _all_finite(raw):
        raise AnnotationError(f"{where}: coordinate is not a finite number")
    try:
        geometry = shape(raw)
        if geometry.is_valid:
            return _polygonal_part(geometry), False
        return _polygonal_part(make_valid(geometry)), True
    except (KeyError, TypeError, ValueError, AttributeError, ShapelyError) as exc:
        raise AnnotationError(f"{where}: no usable geometry ({exc})") from exc


def _all_finite(geometry: dict[str, Any]) -> bool:
    """Every number in the geometry's coordinates (and its members', for a collection) is finite."""
    members = geometry.get("geometries")
    if isinstance(members, list) and not all(_all_finite(m) for m in members if isinstance(m, dict)):
        return False
    stack = [geometry.get("coordinates")]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            return False
    return True


def _polygonal_part(geometry: BaseGeometry) -> BaseGeometry:
    """The polygons of a repaired geometry (``make_valid`` turns slivers into lines beside them)."""
    if shapely.get_type_id(geometry) in _POLYGONAL:
        return geometry
    parts = [p for p in shapely.get_parts(geometry) if shapely.get_type_id(p) in _POLYGONAL]
    return shapely.union_all(parts) if parts else geometry


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    """Every feature in the file, in order: the index of a feature in this list names it in messages."""
    if isinstance(data, list):
        return [f for item in data for f in _features(item, path)]
    if not isinstance(data, dict):
        return []
    if data.get("type") == "FeatureCollection":
        features = data.get("features")
        if features is None:
            return []
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: features is {_kind(features)}, not a list")
        for number, feature in enumerate(features):
            if not isinstance(feature, dict):
                raise AnnotationError(f"{path}: feature {number} is {_kind(feature)}, not a GeoJSON Feature")
        return features
    if data.get("type") == "Feature":
        return [data]
    if "coordinates" in data or "geometries" in data:  # a bare geometry: an unclassified annotation in QuPath
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    return []
