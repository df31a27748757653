"""Read QuPath annotations back (GeoJSON exported by QuPath or by this package) as labelled polygons.

Coordinates are level-0 pixels in QuPath's frame, as QuPath writes them.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Polygons of the given QuPath object types (default: annotations; detections and tiles are skipped)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    features = _features(data)
    annotations = []
    for number, feature in enumerate(features):
        properties = feature.get("properties") or {}
        object_type = properties.get("objectType") or properties.get("object_type") or "annotation"
        if object_type not in object_types:
            continue
        try:
            geometry = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AnnotationError(f"{path}: feature {number} has no usable geometry ({exc})") from exc
        if not geometry.is_valid:
            geometry = make_valid(geometry)
        annotations.append(
            Annotation(geometry, class_name_of(properties.get("classification")), object_type, properties.get("name"))
        )
    return annotations


def _features(data: Any) -> list[dict]:
    if isinstance(data, list):
        return [f for item in data for f in _features(item)]
    if not isinstance(data, dict):
        return []
    if data.get("type") == "FeatureCollection":
        return [f for f in data.get("features") or [] if isinstance(f, dict)]
    if data.get("type") == "Feature":
        return [data]
    if "coordinates" in data:  # a bare geometry: an unclassified annotation in QuPath
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    return []
