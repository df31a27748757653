"""qupath_export writes GeoJSON that meets QuPath's import rules, and reads it back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from qupath_export.annotations import read_annotations
from qupath_export.geojson import (
    annotation_feature,
    classification,
    finite_measurements,
    tile_features,
    write_feature_collection,
)
from qupath_export.polygons import mask_to_polygons
from tests.qupath_rules import GROOVY_SCRIPT, check_file


def test_tiles_follow_every_rule(tmp_path):
    coords = np.array([[20480, 10240], [20928, 10240]])
    measurements = {"Tumor probability": np.array([0.97312, np.nan]), "Tissue fraction": np.array([1.0, 0.5])}
    path = tmp_path / "slide.tiles.geojson"
    count = write_feature_collection(path, tile_features(coords, 448, measurements, ["Tumor", "Non-tumor"]))
    assert count == 2
    features = check_file(path)
    first, second = (f["properties"] for f in features)
    assert first["objectType"] == "tile" and first["isLocked"] is True
    assert first["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert first["measurements"] == {"Tumor probability": 0.9731, "Tissue fraction": 1.0}
    assert "Tumor probability" not in second["measurements"]  # NaN is omitted, never written
    assert features[0]["geometry"]["coordinates"][0][2] == [20928, 10688]
    text = path.read_text()
    assert "NaN" not in text and "\n" not in text.strip() and ": " not in text  # compact


def test_gzip_and_streaming_generator(tmp_path):
    path = tmp_path / "big.tiles.geojson.gz"

    def many():
        for i in range(5000):
            yield from tile_features(np.array([[i * 10, 0]]), 10, {"p": np.array([i / 5000])}, ["Tumor"])

    assert write_feature_collection(path, many()) == 5000
    assert len(check_file(path)) == 5000


def test_regions_are_valid_with_holes(tmp_path):
    mask = np.zeros((60, 60), dtype=bool)
    mask[5:50, 5:50] = True
    mask[20:30, 20:30] = False  # a hole
    mask[55:57, 55:57] = True  # too small
    regions = mask_to_polygons(mask, pixel_size=32.0, origin=(100.0, 0.0), min_area=32 * 32 * 10)
    assert len(regions.geoms) == 1
    polygon = regions.geoms[0]
    assert polygon.is_valid and len(polygon.interiors) == 1
    assert polygon.area == pytest.approx((45 * 45 - 100) * 32 * 32)
    assert polygon.bounds == (100 + 5 * 32, 5 * 32, 100 + 50 * 32, 50 * 32)
    feature = annotation_feature(polygon, "Tumor", "region 1", {"Area µm^2": 1.5, "Mean": float("inf")})
    path = tmp_path / "slide.tumour.geojson"
    write_feature_collection(path, [feature])
    (read,) = check_file(path)
    assert read["properties"]["objectType"] == "annotation"
    assert read["properties"]["measurements"] == {"Area µm^2": 1.5}
    assert len(read["geometry"]["coordinates"]) == 2  # shell and hole kept
    back = read_annotations(path)
    assert back[0].class_name == "Tumor" and back[0].geometry.area == pytest.approx(polygon.area)


def test_invalid_polygons_are_repaired_not_written():
    bow_tie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)])
    assert not bow_tie.is_valid
    feature = annotation_feature(bow_tie, "Tumor")
    from shapely.geometry import shape

    assert shape(feature["geometry"]).is_valid
    assert annotation_feature(Polygon(), "Tumor") is None


def test_classification_and_measurement_forms():
    assert classification("Stroma")["color"] == classification("Stroma")["color"]  # stable across runs
    with pytest.raises(ValueError):
        classification("  ")
    assert finite_measurements({"a": np.float32(0.5), "b": float("nan"), "c": float("-inf")}) == {"a": 0.5}


def test_reading_qupath_forms(tmp_path):
    path = tmp_path / "qupath.geojson"
    features = [
        {
            "type": "Feature",
            "geometry": box(0, 0, 10, 10).__geo_interface__,
            "properties": {
                "objectType": "annotation",
                "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
            },
        },
        {
            "type": "Feature",
            "geometry": json.loads(json.dumps(box(0, 0, 5, 5).__geo_interface__)),
            "properties": {"objectType": "tile", "classification": "Tumor"},
        },
        {"type": "Feature", "geometry": box(0, 0, 3, 3).__geo_interface__, "properties": {"classification": "Stroma"}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    annotations = read_annotations(path)
    assert [a.class_name for a in annotations] == ["Tumor: Positive", "Stroma"]


def _groovy() -> tuple[str, dict[str, str]] | None:
    """The ``groovy`` command (Debian's package) and an environment with a JAVA_HOME it accepts; None
    where it is not installed (CI installs Python packages only: the check then runs where it is)."""
    groovy, java = shutil.which("groovy"), shutil.which("java")
    if groovy is None or java is None:
        return None
    return groovy, {**os.environ, "JAVA_HOME": str(Path(java).resolve().parent.parent)}


PARSE = """
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.Phases
def unit = new CompilationUnit()
unit.addSource(new File(args[0]))
unit.compile(Phases.CONVERSION)
"""


@pytest.mark.skipif(_groovy() is None, reason="needs groovy (apt-get install groovy)")
def test_the_qupath_script_parses_as_groovy(tmp_path):
    """QuPath cannot run here: Groovy's own parser checks the script's syntax (its QuPath classes are
    resolved only inside QuPath)."""
    groovy, env = _groovy()  # type: ignore[misc]
    parser = tmp_path / "parse.groovy"
    parser.write_text(PARSE)
    good = subprocess.run([groovy, str(parser), str(GROOVY_SCRIPT)], capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "broken.groovy"
    broken.write_text(GROOVY_SCRIPT.read_text().replace("return\n}", "return\n", 1))
    bad = subprocess.run([groovy, str(parser), str(broken)], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "error" in bad.stderr
