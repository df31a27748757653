"""Checks of a GeoJSON file against what QuPath 0.4-0.6 accepts (``shared/qupath-geojson.md``).

Each rule raises AssertionError with the feature number and the rule it breaks.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from pathlib import Path

import shapely
from shapely.geometry import shape

OBJECT_TYPES = {"annotation", "detection", "tile", "cell"}


def _reject_constant(token: str):
    raise AssertionError(f"§1.4: bare {token} token (QuPath 0.4 aborts, it becomes a string)")


def load(path: Path) -> dict:
    name = path.name.lower()
    assert name.endswith((".geojson", ".json", ".geojson.gz", ".json.gz")), "§1.1: extension QuPath reads"
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    text = raw.decode("utf-8")  # §1.3: UTF-8
    return json.loads(text, parse_constant=_reject_constant)


def _positions(coordinates):
    if coordinates and isinstance(coordinates[0], (int, float)):
        yield coordinates
    else:
        for item in coordinates:
            yield from _positions(item)


def _rings(geometry: dict):
    if geometry["type"] == "Polygon":
        yield from geometry["coordinates"]
    elif geometry["type"] == "MultiPolygon":
        for polygon in geometry["coordinates"]:
            yield from polygon


def check_file(path: Path) -> list[dict]:
    """Assert every applicable rule; returns the features."""
    data = load(path)
    assert data.get("type") == "FeatureCollection", "§2: a FeatureCollection"
    assert isinstance(data.get("features"), list), "§2: features must be an array"
    for n, feature in enumerate(data["features"]):
        where = f"feature {n}"
        assert feature.get("type") == "Feature", f"{where}: §2 type Feature"
        geometry = feature.get("geometry")
        assert isinstance(geometry, dict), f"{where}: §3 geometry required"
        assert geometry["type"] in ("Polygon", "MultiPolygon"), f"{where}: §4.2 use (Multi)Polygon"
        assert "plane" not in geometry, f"{where}: §4.8 no plane for 2-D slides"
        for position in _positions(geometry["coordinates"]):
            assert len(position) >= 2 and all(isinstance(v, (int, float)) for v in position), f"{where}: §4.3"
            assert all(math.isfinite(v) for v in position), f"{where}: §4.3 NaN coordinate"
        for ring in _rings(geometry):
            assert len(ring) >= 4 and ring[0] == ring[-1], f"{where}: §4.4 ring closed, >= 4 positions"
        geom = shape(geometry)
        assert geom.is_valid and not geom.is_empty, f"{where}: §4.6 OGC-valid, non-empty"
        snapped = shapely.set_precision(geom, 0.01, mode="pointwise")
        assert snapped.is_valid, f"{where}: §4.6 stays valid on QuPath 0.6's 0.01-px grid"
        if "id" in feature:
            uuid.UUID(str(feature["id"]))  # §3: a UUID or nothing
        properties = feature.get("properties")
        assert isinstance(properties, dict), f"{where}: §3 properties must be an object"
        assert properties.get("objectType") in OBJECT_TYPES, f"{where}: §5.1 objectType"
        assert "type" not in properties, f"{where}: §5.1 properties.type is read as the object type"
        if "isLocked" in properties:
            assert isinstance(properties["isLocked"], bool), f"{where}: §5.5 isLocked boolean"
        if "name" in properties:
            assert isinstance(properties["name"], str), f"{where}: §5.2 name is text"
        cls = properties.get("classification")
        if cls is not None:
            assert isinstance(cls, dict) and cls.get("name", "").strip(), f"{where}: §5.4 classification name"
            assert "\n" not in cls["name"], f"{where}: §5.4 no line breaks"
            color = cls.get("color")
            assert isinstance(color, list) and len(color) == 3, f"{where}: §5.4 a colour is mandatory"
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in color), f"{where}: §5.4 colour values"
        measurements = properties.get("measurements", {})
        assert isinstance(measurements, dict), f"{where}: §5.6 measurements as an object"
        for key, value in measurements.items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: §5.6 {key}"
            assert math.isfinite(value), f"{where}: §5.6 {key} must be finite"
        if properties["objectType"] == "tile":
            corners = list(_positions(geometry["coordinates"]))
            assert all(isinstance(v, int) for p in corners for v in p), f"{where}: §8 integer tile corners"
    return data["features"]


GROOVY_SCRIPT = Path(__file__).parent.parent / "qupath_export" / "import_wsi_dala.groovy"


def check_groovy_script_fits(run_json: Path) -> None:
    """The QuPath script reads what a run writes: the run.json keys it looks up, the files they name, the
    measurement it maps (present on every tile), and the colour map of overlay.png."""
    import inspect
    import re

    from wsi_dala.outputs.overlay import render_overlay

    script = GROOVY_SCRIPT.read_text()
    record = json.loads(run_json.read_text())
    keys = re.search(r"\[('[a-z_]+'(?:, '[a-z_]+')*)\]\.findAll", script)
    assert keys, "the script's list of run.json outputs"
    for key in re.findall(r"'([a-z_]+)'", keys.group(1)):
        assert (run_json.parent / Path(record["outputs"][key]).name).is_file(), key
    assert record["status"] == re.search(r"run\.status != '(\w+)'", script).group(1)
    measurement = re.search(r"def measurement = '([^']+)'", script).group(1)
    tiles = run_json.parent / Path(record["outputs"]["tiles_geojson"]).name
    features = check_file(tiles)
    assert all(measurement in feature["properties"]["measurements"] for feature in features)
    colour_map = re.search(r"def colorMapName = '([^']+)'", script).group(1)
    assert colour_map.lower() == inspect.signature(render_overlay).parameters["colour_map"].default
