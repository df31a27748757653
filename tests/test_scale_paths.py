"""The fast paths for 10^6-tile slides give what the plain paths give.

- ``tile_feature_texts`` + ``write_feature_texts`` write the very bytes ``tile_features`` +
  ``write_feature_collection`` write;
- contours traced a band of rows at a time are the contours of the whole map (same rings, same region),
  and the region is the one the old whole-map trace and step-by-step symmetric difference gave;
- ``even_odd`` is the symmetric-difference fold of its rings; ``simplify_apart`` is ``simplify``.
"""

from __future__ import annotations

import functools
import gzip
import json
import math

import numpy as np
import pytest
import shapely
import skimage.measure
from scipy.ndimage import gaussian_filter
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.validation import make_valid

from qupath_export import polygons
from qupath_export.geojson import tile_feature_texts, tile_features, write_feature_collection, write_feature_texts
from qupath_export.polygons import contour_polygons, contour_rings, even_odd, simplify_apart

# ---------------------------------------------------------------------------------------------------------------
# Tile GeoJSON: the column-at-a-time text is byte-identical to the feature-by-feature JSON


def _tile_inputs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    coords = rng.integers(0, 200_000, size=(n, 2))
    first = rng.uniform(-1.0, 1.0, n)  # rounded to 4 decimals, some to -0.0
    first[rng.random(n) < 0.2] = np.nan
    first[rng.random(n) < 0.1] = np.inf
    first[rng.random(n) < 0.1] = -np.inf
    tiny = rng.random(n) < 0.1
    first[tiny] = rng.uniform(-1e-5, 1e-5, int(tiny.sum()))  # rounds to ±0.0
    second = rng.normal(0.0, 1.0, n) * 10.0 ** rng.integers(-8, 20, n)  # tiny to huge, both signs
    second[rng.random(n) < 0.15] = np.nan
    second[: min(n, 6)] = [1e300, -1e300, 123456789.123456789, -0.00005, 0.00005, 2.5e-324][: min(n, 6)]
    second[rng.random(n) < 0.1] = -np.inf
    measurements = {'Tumor "probability"': first, "Area µm^2": second}
    classes = [("Tumor", "Non-tumor")[int(i)] for i in rng.integers(0, 2, n)]
    return coords, measurements, classes


@pytest.mark.parametrize("with_classes", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 257])
@pytest.mark.parametrize("tile_size", [447.9, 448.0, 446.5, 256.2])
def test_tile_texts_are_byte_identical(tmp_path, n, tile_size, with_classes):
    rng = np.random.default_rng(n * 1000 + int(tile_size * 10) + with_classes)
    coords, measurements, classes = _tile_inputs(rng, n)
    class_names = classes if with_classes else None
    plain, fast = tmp_path / "plain.geojson", tmp_path / "fast.geojson"
    count_plain = write_feature_collection(plain, tile_features(coords, tile_size, measurements, class_names))
    count_fast = write_feature_texts(fast, tile_feature_texts(coords, tile_size, measurements, class_names))
    assert count_plain == count_fast == n
    assert fast.read_bytes() == plain.read_bytes()
    with open(fast, encoding="utf-8") as f:
        document = json.load(f)
    assert document["type"] == "FeatureCollection" and len(document["features"]) == n
    side = round(tile_size)
    for i, feature in enumerate(document["features"]):
        ring = feature["geometry"]["coordinates"][0]
        x, y = int(coords[i, 0]), int(coords[i, 1])
        assert ring == [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        expected = {k: round(float(v[i]), 4) for k, v in measurements.items() if math.isfinite(v[i])}
        assert feature["properties"]["measurements"] == expected
        if with_classes:
            assert feature["properties"]["classification"]["name"] == classes[i]
        else:
            assert "classification" not in feature["properties"]


def test_tile_texts_without_measurements_and_gzip(tmp_path):
    coords = np.array([[0, 0], [448, 0], [896, 448]])
    for measurements in ({}, {"only": np.array([np.nan, np.inf, -np.inf])}):
        plain, fast = tmp_path / "plain.geojson.gz", tmp_path / "fast.geojson.gz"
        write_feature_collection(plain, tile_features(coords, 447.9, measurements, ["A", "B", "A"]))
        write_feature_texts(fast, tile_feature_texts(coords, 447.9, measurements, ["A", "B", "A"]))
        assert gzip.decompress(fast.read_bytes()) == gzip.decompress(plain.read_bytes())
        assert '"measurements":{}' in gzip.decompress(fast.read_bytes()).decode()


# ---------------------------------------------------------------------------------------------------------------
# Contours: banded tracing = whole-map tracing = the old whole-map trace + step-by-step symmetric difference

WHOLE = 10**9  # a band larger than any map: the whole map at once


def _old_contour_polygons(
    values: np.ndarray,
    threshold: float,
    cell_size: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    simplify_tolerance: float = 0.0,
    min_area: float = 0.0,
) -> MultiPolygon:
    """contour_polygons before banded tracing (commit f1f40c1^): the whole map, rings folded one by one."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    if not (values >= threshold).any():
        return MultiPolygon()
    finite = values[np.isfinite(values)]
    floor = min(0.0, float(finite.min()) if finite.size else 0.0, float(threshold) - 1e-6)
    padded = np.pad(np.where(np.isfinite(values), values, floor), 1, constant_values=floor)
    rings = []
    for contour in skimage.measure.find_contours(padded, level=threshold):
        if len(contour) < 4:
            continue
        x = origin[0] + (contour[:, 1] - 0.5) * cell_size
        y = origin[1] + (contour[:, 0] - 0.5) * cell_size
        ring = shapely.Polygon(np.column_stack([x, y]))
        rings.append(ring if ring.is_valid else make_valid(ring))
    region: BaseGeometry = Polygon()
    for ring in sorted(rings, key=lambda r: -r.area):
        region = shapely.symmetric_difference(region, ring)
    if simplify_tolerance > 0:
        region = region.simplify(simplify_tolerance, preserve_topology=True)
    return polygons.clean_polygons(region, min_area)


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 2.5) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=shape), sigma, mode="nearest")
    return (field - field.mean()) / (field.std() + 1e-12)


def _maps() -> dict[str, tuple[np.ndarray, float, np.ndarray | None]]:
    """name: (values, threshold, excluded)."""
    rng = np.random.default_rng(20240611)
    maps: dict[str, tuple[np.ndarray, float, np.ndarray | None]] = {}
    maps["smooth"] = (_smooth(rng, (61, 53)), 0.3, None)
    holes = _smooth(rng, (57, 49))
    holes[_smooth(rng, (57, 49), 3.0) > 1.0] = np.nan  # blobs of glass
    holes[20] = np.nan  # a whole row of glass
    holes[:, 7] = np.nan
    maps["nan_holes"] = (holes, 0.0, None)
    on_level = np.round(_smooth(rng, (48, 45)) * 4) / 4  # many cells exactly at the threshold
    maps["on_level"] = (on_level, 0.25, None)
    few_on_level = _smooth(rng, (50, 40))
    few_on_level[[5, 23, 24, 41], [10, 3, 30, 17]] = 0.5  # a few cells exactly at the threshold
    maps["few_on_level"] = (few_on_level, 0.5, None)
    maps["one_row"] = (np.sin(np.arange(64) / 3.0)[None], 0.2, None)
    maps["two_rows"] = (np.vstack([np.sin(np.arange(40) / 2.5), np.cos(np.arange(40) / 3.5)]), 0.1, None)
    maps["tall"] = (_smooth(rng, (230, 31), 2.0), -0.2, None)
    float32 = _smooth(rng, (45, 52)).astype(np.float32)
    float32[rng.random(float32.shape) < 0.03] = np.nan
    maps["float32"] = (float32, 0.4, None)
    excluded_values = _smooth(rng, (52, 47))
    maps["excluded"] = (excluded_values, -0.1, _smooth(rng, (52, 47), 4.0) > 0.8)
    probability = 1 / (1 + np.exp(-3 * _smooth(rng, (64, 58), 3.0)))  # a probability map, edges at 1
    probability[:3] = 1.0
    probability[:, -2:] = 1.0
    probability[30:34, 10:20] = np.nan
    maps["probability"] = (probability, 0.5, None)
    with_inf = _smooth(rng, (40, 37))
    with_inf[[3, 17, 30], [5, 20, 33]] = np.inf
    maps["plus_inf"] = (with_inf, 0.6, None)
    return maps


MAPS = _maps()


def _with_glass(values: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).copy()
    if excluded is not None:
        values[excluded] = np.nan
    return values


def _assert_same_region(a: BaseGeometry, b: BaseGeometry, relative: float = 1e-9) -> None:
    assert a.is_valid and b.is_valid
    assert len(getattr(a, "geoms", [a])) == len(getattr(b, "geoms", [b]))
    if a.is_empty or b.is_empty:
        assert a.is_empty and b.is_empty
        return
    if a.equals(b):
        return
    difference = shapely.symmetric_difference(a, b).area
    assert difference < relative * max(a.area, b.area), (difference, a.area, b.area)


@pytest.fixture
def banded(monkeypatch):
    """Make contour_polygons trace in bands of ``rows`` rows; records the shapes find_contours traces.

    (Patching ``CONTOUR_BAND_ROWS`` alone would not do: it is the default of ``contour_rings``'s
    ``band_rows``, bound when the function was defined.)
    """
    original_rings = polygons.contour_rings
    original_find = skimage.measure.find_contours
    traced: list[tuple[int, int]] = []

    def find_contours(image, *args, **kwargs):
        traced.append(image.shape)
        return original_find(image, *args, **kwargs)

    monkeypatch.setattr(skimage.measure, "find_contours", find_contours)

    def use(rows: int) -> list[tuple[int, int]]:
        monkeypatch.setattr(polygons, "CONTOUR_BAND_ROWS", rows)
        monkeypatch.setattr(polygons, "contour_rings", functools.partial(original_rings, band_rows=rows))
        traced.clear()
        return traced

    return use


@pytest.mark.parametrize("name", sorted(MAPS))
def test_banded_rings_are_the_whole_map_rings(name, banded):
    values, threshold, excluded = MAPS[name]
    whole = contour_rings(values, threshold, excluded, band_rows=WHOLE)
    assert whole, "the map has no contour at this threshold: the test would prove nothing"
    # the whole map traced at once is what find_contours gives on the padded map
    glass = _with_glass(values, excluded)
    floor = min(0.0, float(np.nanmin(np.where(np.isinf(glass), 0.0, glass))), threshold - 1e-6)
    padded = np.pad(np.where(np.isnan(glass), floor, np.nan_to_num(glass, nan=np.nan)), 1, constant_values=floor)
    direct = [ring for ring in skimage.measure.find_contours(padded, level=threshold) if len(ring) >= 4]
    assert len(direct) == len(whole)
    assert {polygons._from_first_vertex(r).tobytes() for r in direct} == {r.tobytes() for r in whole}
    for rows in (1, 2, 3, 7, 16):
        traced = banded(rows)
        pieces = contour_rings(values, threshold, excluded, band_rows=rows)
        height = np.asarray(values).shape[0] + 2
        if height - 1 > rows and name != "on_level":  # on_level: every row has a cell at the threshold
            assert len(traced) > 1, "several bands were meant to be traced"
        assert len(pieces) == len(whole), rows
        for a, b in zip(pieces, whole, strict=True):
            assert a.shape == b.shape and np.array_equal(a, b), (name, rows)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("tolerance", [0.0, 0.35, 1.2])
def test_banded_contours_are_the_whole_map_contours(name, tolerance, banded):
    values, threshold, excluded = MAPS[name]
    kwargs = dict(cell_size=448.0, origin=(1000.0, -250.0), simplify_tolerance=tolerance * 448.0)
    banded(WHOLE)
    whole = contour_polygons(values, threshold, excluded=excluded, **kwargs)
    assert not whole.is_empty
    traced = banded(7)
    seven = contour_polygons(values, threshold, excluded=excluded, **kwargs)
    if name not in ("on_level",) and np.asarray(values).shape[0] + 1 > 7:
        assert len(traced) > 2 and max(shape[0] for shape in traced) < np.asarray(values).shape[0] + 2
    _assert_same_region(seven, whole)
    assert seven.area == pytest.approx(whole.area, rel=1e-6)
    if tolerance == 0:  # exactly the whole map's region, and the old code's region
        assert seven.equals(whole)
        old = _old_contour_polygons(_with_glass(values, excluded), threshold, **kwargs)
        _assert_same_region(seven, old)
        assert seven.area == pytest.approx(old.area, rel=1e-9)


def test_simplified_contours_stay_near_the_old_codes():
    """Both simplify the same region by at most the tolerance: they lie within twice it of each other."""
    for name in ("smooth", "nan_holes", "tall", "probability"):
        values, threshold, excluded = MAPS[name]
        tolerance = 0.35 * 448.0
        new = contour_polygons(values, threshold, 448.0, simplify_tolerance=tolerance, excluded=excluded)
        old = _old_contour_polygons(_with_glass(values, excluded), threshold, 448.0, simplify_tolerance=tolerance)
        assert len(new.geoms) == len(old.geoms)
        assert new.hausdorff_distance(old) <= 2 * tolerance + 1e-6


def test_band_one_row_on_a_one_row_map(banded):
    values = np.array([[0.0, 1.0, 1.0, 0.2, 0.9, np.nan, 0.8, 0.0]])
    banded(1)
    one = contour_polygons(values, 0.5)
    banded(WHOLE)
    whole = contour_polygons(values, 0.5)
    assert len(one.geoms) == len(whole.geoms) == 3
    assert one.equals(whole) and one.equals(_old_contour_polygons(values, 0.5))


# ---------------------------------------------------------------------------------------------------------------
# even_odd and simplify_apart


def _fold(rings: list[BaseGeometry]) -> BaseGeometry:
    region: BaseGeometry = Polygon()
    for ring in rings:
        region = shapely.symmetric_difference(region, ring)
    return region


def test_even_odd_nested_rings_and_a_separate_one():
    rings = [box(0, 0, 100, 100), box(20, 20, 80, 80), box(40, 40, 60, 60), box(200, 0, 230, 30)]
    rings = sorted(rings, key=lambda r: -r.area)
    region = even_odd(rings)
    folded = _fold(rings)
    assert region.is_valid and region.equals(folded)
    assert len(region.geoms) == 3 and region.area == pytest.approx(100**2 - 60**2 + 20**2 + 30**2)
    shell = next(p for p in region.geoms if p.area > 5000)
    assert len(shell.interiors) == 1
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):  # the fold does not depend on order
        assert _fold([rings[i] for i in order]).equals(region)


def test_even_odd_deeper_nesting_touching_and_rotated_rings():
    rng = np.random.default_rng(7)
    rings = []
    for k, (cx, cy) in enumerate([(0, 0), (500, 0), (0, 500)]):
        for radius in (200, 150, 100, 60, 30):  # five nested noisy rings
            angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
            r = radius * (1 + 0.08 * rng.uniform(-1, 1, 40))
            rings.append(Polygon(np.column_stack([cx + r * np.cos(angles), cy + r * np.sin(angles)])))
        if k == 1:  # two rings touching along an edge, and one crossing: a tangled group
            rings += [box(700, 300, 760, 360), box(760, 300, 800, 360), box(780, 340, 820, 400)]
    rings = sorted(rings, key=lambda r: -r.area)
    assert all(r.is_valid for r in rings)
    region, folded = even_odd(rings), _fold(rings)
    assert region.is_valid
    assert region.equals(folded) or shapely.symmetric_difference(region, folded).area < 1e-9 * folded.area
    assert len(region.geoms) == len(getattr(folded, "geoms", [folded]))


def _noisy_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, points: int = 200) -> Polygon:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    r = radius * (1 + 0.05 * rng.standard_normal(points))
    polygon = Polygon(np.column_stack([cx + r * np.cos(angles), cy + r * np.sin(angles)]))
    return polygon if polygon.is_valid else make_valid(polygon)


def _assert_simplify_apart_is_simplify(region: MultiPolygon, tolerance: float) -> None:
    expected = region.simplify(tolerance, preserve_topology=True)
    result = simplify_apart(region, tolerance)
    assert result.geom_type == expected.geom_type
    assert len(result.geoms) == len(expected.geoms)
    assert result.equals_exact(expected, 0.0) or result.equals(expected), tolerance


@pytest.mark.parametrize("tolerance", [0.5, 2.0, 6.0])
def test_simplify_apart_far_apart_polygons(tolerance):
    rng = np.random.default_rng(11)
    parts = [_noisy_polygon(rng, 300.0 * i, 200.0 * (i % 3), 60.0) for i in range(8)]
    hole = Polygon(parts[0].exterior.coords, [_noisy_polygon(rng, 0.0, 0.0, 25.0).exterior.coords])
    region = MultiPolygon([hole, *parts[1:]])
    assert region.is_valid
    _assert_simplify_apart_is_simplify(region, tolerance)


def _noisy_box(rng: np.random.Generator, x0: float, x1: float, noise: float, side_noise: float) -> Polygon:
    """A 100-px-tall box with noisy edges (calm near the corners); its left and right edges move by at most
    ``side_noise``."""
    t = np.linspace(0, 1, 60, endpoint=False)
    calm = np.sin(np.pi * t)

    def jitter(amplitude: float) -> np.ndarray:
        return amplitude * calm * rng.uniform(-1, 1, 60)

    bottom = np.column_stack([x0 + t * (x1 - x0), jitter(noise)])
    right = np.column_stack([x1 + jitter(side_noise), t * 100])
    top = np.column_stack([x1 - t * (x1 - x0), 100 + jitter(noise)])
    left = np.column_stack([x0 + jitter(side_noise), 100 - t * 100])
    polygon = Polygon(np.concatenate([bottom, right, top, left]))
    assert polygon.is_valid
    return polygon


@pytest.mark.parametrize("tolerance", [1.0, 3.0, 5.0])
def test_simplify_apart_near_polygons(tolerance):
    rng = np.random.default_rng(12)
    gap = 1.5 * tolerance  # edges 1.5 x tolerance apart, give or take noise: closer than 2 x tolerance
    side = 0.2 * tolerance
    left = _noisy_box(rng, 0.0, 100.0, 2.0 * tolerance, side)
    right = _noisy_box(rng, 100.0 + gap, 200.0 + gap, 2.0 * tolerance, side)
    far = _noisy_polygon(rng, 2000.0, 0.0, 40.0)
    assert 0 < left.distance(right) < 2 * tolerance
    region = MultiPolygon([left, right, far])
    assert region.is_valid
    _assert_simplify_apart_is_simplify(region, tolerance)
    _assert_simplify_apart_is_simplify(MultiPolygon([right, far, left]), tolerance)


@pytest.mark.parametrize("tolerance", [1.0, 4.0])
def test_simplify_apart_keeps_a_neighbour_in_a_notch(tolerance):
    """A shallow notch that simplification alone would fill holds a small polygon: simplified together,
    the notch stays (the two are one cluster); simplified one by one, it would not."""
    h, w = 0.9 * tolerance, 10 * tolerance
    a = Polygon([(0, 0), (100, 0), (100, 100), (50 + w, 100), (50, 100 - h), (50 - w, 100), (0, 100)])
    b = box(49.5, 100 - 0.6 * h, 50.5, 100 - 0.2 * h)
    rng = np.random.default_rng(5)
    far = [_noisy_polygon(rng, 400.0 + 150 * i, 50.0, 40.0) for i in range(3)]
    region = MultiPolygon([*far[:1], a, b, *far[1:]])
    assert region.is_valid and not a.intersects(b)
    alone = a.simplify(tolerance, preserve_topology=True)
    assert alone.intersects(b) and not alone.touches(b), "the notch should fill when simplified alone"
    _assert_simplify_apart_is_simplify(region, tolerance)
    assert not simplify_apart(region, tolerance).geoms[1].intersects(b)


def test_simplify_apart_many_specks_around_a_region():
    """Contours of a real map: a big region and many small specks, some within reach of each other."""
    rng = np.random.default_rng(3)
    values = _smooth(rng, (90, 90), 1.2)
    region = polygons.even_odd(
        sorted(
            [shapely.Polygon(r[:, ::-1]) for r in contour_rings(values, 0.8, band_rows=WHOLE)], key=lambda r: -r.area
        )
    )
    assert isinstance(region, MultiPolygon) and len(region.geoms) > 10
    for tolerance in (0.2, 0.6, 1.5):
        _assert_simplify_apart_is_simplify(region, tolerance)
