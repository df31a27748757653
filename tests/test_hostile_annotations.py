"""Hostile annotation files for ``train --slide``: refused in one line, repaired and counted, or clipped.

One small synthetic slide (2048 x 1536 px at 0.5 µm/px, tissue nearly everywhere) is written and tiled
once for the module; every annotation file is written by the test that uses it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely

from qupath_export.annotations import Annotation, AnnotationError, read_annotation_file, read_annotations
from wsi_dala.core.config import TilingConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.slide_tiles import (
    AnnotatedSlide,
    annotated_slide_samples,
    label_tiles,
    slide_annotations,
)

WIDTH, HEIGHT = 2048, 1536
# 48 px at 2 µm/px: 192 level-0 px tiles, so the last column (x = 1920) overhangs the slide's right edge by 64 px.
TILING = TilingConfig(mpp=2.0, tile_size_px=48, min_tissue=0.5)
# Any RuntimeWarning (shapely's "invalid value encountered in ...") fails the test that raised it.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

SQUARE = [[[200, 200], [900, 200], [900, 900], [200, 900], [200, 200]]]  # inside the slide, on tissue


def _feature(geometry: dict, properties: object = None) -> dict:
    if properties is None:
        properties = {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _polygon(coordinates: list) -> dict:
    return {"type": "Polygon", "coordinates": coordinates}


def _write(path: Path, *features: dict) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))  # NaN stays NaN
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    spec = SyntheticSlideSpec(width=WIDTH, height=HEIGHT, mpp=0.5, seed=7, tissue_fraction=0.95)
    return write_synthetic_slide(folder / "S.svs", spec).path


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    """Shared by the tests so that the slide is tiled once (the tiler reuses a finished store)."""
    return tmp_path_factory.mktemp("tiles")


def _samples(
    slide: Path, geojson: Path, tiles_dir: Path, min_cover: float = 0.5, unannotated: str | None = "Non-tumor"
):
    return annotated_slide_samples(
        [AnnotatedSlide(slide, geojson)], tiles_dir, TILING, min_cover, unannotated, progress=False
    )


# Refused: one line naming the file and the feature.


@pytest.mark.parametrize(
    "geometry",
    [
        _polygon([[[0, 0], [float("nan"), 0], [10, 10], [0, 0]]]),
        _polygon([[[0, 0], [100, 0], [100, 100], [0, 0]], [[10, 10], [20, float("inf")], [20, 20], [10, 10]]]),
        {"type": "MultiPolygon", "coordinates": [SQUARE, [[[0, 0], [1, 0], [1, float("-inf")], [0, 0]]]]},
        {"type": "GeometryCollection", "geometries": [_polygon(SQUARE), {"type": "Point", "coordinates": [1, 1e400]}]},
    ],
    ids=["nan-shell", "inf-hole", "-inf-multipolygon", "overflow-in-collection"],
)
def test_non_finite_coordinate_is_refused_naming_the_feature(tmp_path, geometry):
    path = _write(tmp_path / "A.geojson", *[_feature(_polygon(SQUARE))] * 3, _feature(geometry))
    assert "NaN" in path.read_text() or "Infinity" in path.read_text()
    with pytest.raises(AnnotationError) as error:
        read_annotations(path)
    assert str(error.value) == f"{path}: feature 3: coordinate is not a finite number"


@pytest.mark.parametrize(
    ("properties", "problem"),
    [
        ("Tumor", "properties is a string, not an object"),
        ([1, 2], "properties is a list, not an object"),
        ({"classification": 5}, "classification is a number, not a class name or an object with a name"),
        ({"classification": ["Tumor"]}, "classification is a list, not a class name or an object with a name"),
        ({"classification": {"name": 3}}, "classification name is a number, not a string"),
        ({"classification": {"names": "Tumor"}}, "classification names is a string, not a list of strings"),
        ({"objectType": ["annotation"]}, "objectType is a list, not a string"),
        ({"classification": "Tumor", "name": {"x": 1}}, "name is an object, not a string"),
    ],
)
def test_wrong_property_types_are_refused_naming_the_feature(tmp_path, properties, problem):
    path = _write(tmp_path / "A.geojson", _feature(_polygon(SQUARE)), _feature(_polygon(SQUARE), properties))
    with pytest.raises(AnnotationError) as error:
        read_annotations(path)
    assert str(error.value) == f"{path}: feature 1: {problem}"


def test_hostile_file_is_a_config_error_before_tiling(tmp_path, slide):
    path = _write(tmp_path / "A.geojson", _feature(_polygon(SQUARE), "Tumor"))
    with pytest.raises(ConfigError, match=r"A\.geojson: feature 0: properties is a string"):
        _samples(slide, path, tmp_path / "tiles")
    assert not (tmp_path / "tiles").exists()


# Repaired or skipped, and counted.


def test_self_intersecting_polygon_is_repaired_and_counted(tmp_path):
    bow_tie = _polygon([[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]])
    path = _write(tmp_path / "A.geojson", _feature(bow_tie), _feature(_polygon(SQUARE)))
    read = read_annotation_file(path)
    assert read.repaired == 1 and not read.skipped
    assert [a.geometry.is_valid for a in read.annotations] == [True, True]
    assert read.annotations[0].geometry.geom_type == "MultiPolygon"
    assert read.annotations[0].geometry.area == pytest.approx(2 * 2500)  # the two triangles of the bow tie
    assert [a.geometry.area for a in read_annotations(path)] == [pytest.approx(5000), 490000]
    used = slide_annotations(read, WIDTH, HEIGHT)
    assert (used.repaired, used.clipped, len(used.outside), len(used.skipped)) == (1, 0, 0, 0)
    assert "1 repaired (invalid geometry)" in used.summary()


def test_points_and_lines_are_skipped_and_counted(tmp_path):
    path = _write(
        tmp_path / "A.geojson",
        _feature({"type": "Point", "coordinates": [500, 500]}),
        _feature(_polygon(SQUARE)),
        _feature({"type": "LineString", "coordinates": [[0, 0], [500, 500]]}),
        _feature({"type": "MultiPoint", "coordinates": [[1, 1], [2, 2]]}, {"classification": "Stroma"}),
        _feature(_polygon([[[0, 0], [10, 0], [20, 0], [0, 0]]])),  # no area: repaired into lines, then skipped
    )
    read = read_annotation_file(path)
    assert [a.geometry.geom_type for a in read.annotations] == ["Polygon"]
    assert [a.geometry.geom_type for a in read.skipped] == ["Point", "LineString", "MultiPoint", "MultiLineString"]
    assert [a.class_name for a in read.skipped] == ["Tumor", "Tumor", "Stroma", "Tumor"]
    assert read.repaired == 0
    used = slide_annotations(read, WIDTH, HEIGHT)
    assert len(used.annotations) == 1 and len(used.skipped) == 4
    assert "4 skipped (points or lines: no area)" in used.summary()


# Clipped to the slide.


def test_polygon_partly_outside_is_clipped_to_the_slide(tmp_path, slide, tiles_dir, caplog):
    crossing = shapely.box(1500, -300, 2400, 1300)  # over the right and top edges
    clipped = shapely.box(1500, 0, WIDTH, 1300)
    path = _write(tmp_path / "A.geojson", _feature(crossing.__geo_interface__))
    with caplog.at_level(logging.INFO, logger="wsi_dala.training.slide_tiles"):
        samples, names, _ = _samples(slide, path, tiles_dir, min_cover=0.8)
    assert names == ["Tumor", "Non-tumor"]
    store = TileStore(next(tiles_dir.rglob("tiles.zarr")))
    coords, size = store.coords(), store.info.tile_size_l0
    expected = label_tiles(coords, size, [Annotation(clipped, "Tumor", "annotation")], names, 0.8, "Non-tumor")
    unclipped = label_tiles(coords, size, [Annotation(crossing, "Tumor", "annotation")], names, 0.8, "Non-tumor")
    # The overhanging edge tiles are 2/3 inside the slide: covered enough by the polygon, not by its clipped part.
    assert (expected != unclipped).sum() >= 1
    got = np.full(len(coords), -1)
    got[[s.index for s in samples]] = [s.label for s in samples]
    np.testing.assert_array_equal(got, expected)
    assert (got == 0).sum() >= 5 and (got == 1).sum() >= 5
    (record,) = [r for r in caplog.records if r.name == "wsi_dala.training.slide_tiles"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"{path}: annotations: 1 used, 0 repaired" in message
    assert f"1 clipped to the slide ({WIDTH} x {HEIGHT} px), 0 entirely outside it" in message
    assert f"Tumor {(got == 0).sum()}, Non-tumor {(got == 1).sum()}" in message


def test_label_tiles_clips_to_slide_size(slide, tiles_dir, tmp_path):
    path = _write(tmp_path / "A.geojson", _feature(shapely.box(1500, -300, 2400, 1300).__geo_interface__))
    _samples(slide, path, tiles_dir, min_cover=0.8)
    store = TileStore(next(tiles_dir.rglob("tiles.zarr")))
    args = (store.coords(), store.info.tile_size_l0, path, ["Tumor", "Non-tumor"], 0.8, "Non-tumor")
    clipped = label_tiles(*args, slide_size=(WIDTH, HEIGHT))
    inside = [Annotation(shapely.box(1500, 0, WIDTH, 1300), "Tumor", "annotation")]
    np.testing.assert_array_equal(clipped, label_tiles(*args[:2], inside, *args[3:]))
    assert (clipped != label_tiles(*args)).any()


# No tile for a class: a ConfigError naming the file, not a model trained without it.


@pytest.mark.parametrize(
    ("features", "reason"),
    [
        ([_feature(shapely.box(3000, 2000, 4000, 3000).__geo_interface__)], "1 entirely outside the slide"),
        (
            [_feature(_polygon([[[-900, -900], [-100, -900], [-100, -100], [-900, -100], [-900, -900]]]))] * 2,
            "2 entirely outside the slide",
        ),
        (
            [
                _feature({"type": "Point", "coordinates": [500, 500]}),
                _feature({"type": "Point", "coordinates": [9, 9]}),
            ],
            "2 points or lines, which cover no area",
        ),
        (
            [
                _feature(_polygon([[[300, 300], [340, 300], [340, 340], [300, 340], [300, 300]]])),
                _feature({"type": "Point", "coordinates": [500, 500]}),
                _feature(shapely.box(-50, 0, 0, 50).__geo_interface__),  # touches the slide's edge, no area inside
            ],
            "1 entirely outside the slide, 1 points or lines, which cover no area, "
            "1 covering less than --min-cover 0.5 of any tissue tile",
        ),
    ],
    ids=["outside", "negative", "points-only", "too-small"],
)
def test_class_without_tiles_is_a_config_error(tmp_path, slide, tiles_dir, features, reason):
    path = _write(tmp_path / "A.geojson", *features)
    with pytest.raises(ConfigError) as error:
        _samples(slide, path, tiles_dir)
    annotations = "1 annotation" if len(features) == 1 else f"{len(features)} annotations"
    assert str(error.value) == f"{path}: class 'Tumor' has no tiles: of its {annotations}, {reason}"


def test_unannotated_class_without_tiles_is_a_config_error(tmp_path, slide, tiles_dir):
    path = _write(tmp_path / "A.geojson", _feature(shapely.box(-10, -10, WIDTH + 10, HEIGHT + 10).__geo_interface__))
    with pytest.raises(ConfigError) as error:
        _samples(slide, path, tiles_dir)
    assert str(error.value) == (
        f"class 'Non-tumor' (--unannotated-class) has no tiles: every tissue tile overlaps an annotation ({slide})"
    )


def test_one_class_is_a_config_error_naming_the_file(tmp_path, slide, tiles_dir):
    path = _write(tmp_path / "A.geojson", _feature(_polygon(SQUARE)))
    with pytest.raises(
        ConfigError, match=r"A\.geojson: need at least 2 classes in the annotations \(found \['Tumor'\]\)"
    ):
        _samples(slide, path, tiles_dir, unannotated=None)


def test_train_cli_refuses_annotations_outside_the_slide(tmp_path, slide):
    path = _write(tmp_path / "A.geojson", _feature(shapely.box(5000, 5000, 6000, 6000).__geo_interface__))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "wsi_dala", "train", "--slide", f"{slide}={path}"]
    command += ["--unannotated-class", "Non-tumor", "--out", str(out), "--pretrained", "none"]
    command += ["--epochs", "1", "--input-size", "32", "--mpp", "2.0", "-q"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("wsi-dala: error:")]
    message = f"{path}: class 'Tumor' has no tiles: of its 1 annotation, 1 entirely outside the slide"
    assert errors == [f"wsi-dala: error: {message}"]
    assert "Traceback" not in done.stderr and "RuntimeWarning" not in done.stderr
    assert not list(out.rglob("best.safetensors"))
