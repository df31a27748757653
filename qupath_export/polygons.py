"""Binary masks to valid polygons, with holes, in level-0 pixel coordinates.

Each row's runs of true pixels become boxes and GEOS unions them: the result is OGC-valid by
construction (QuPath 0.6 aborts a whole import on one invalid polygon), holes included, with exact
pixel edges. ``simplify`` (topology-preserving) then removes the staircase.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.validation import make_valid


def mask_to_polygons(
    mask: np.ndarray,
    pixel_size: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    simplify_tolerance: float = 0.0,
    min_area: float = 0.0,
) -> MultiPolygon:
    """Polygons of the true pixels of ``mask``; pixel (r, c) covers x in origin_x + [c, c+1)·pixel_size.

    ``simplify_tolerance`` and ``min_area`` are in output units (e.g. level-0 pixels and pixels²).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return MultiPolygon()
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_start, cols_start = np.nonzero(edges == 1)
    rows_end, cols_end = np.nonzero(edges == -1)  # same row order as starts
    x0 = origin[0] + cols_start * pixel_size
    x1 = origin[0] + cols_end * pixel_size
    y0 = origin[1] + rows_start * pixel_size
    y1 = origin[1] + (rows_end + 1) * pixel_size
    merged = shapely.union_all(shapely.box(x0, y0, x1, y1))
    if simplify_tolerance > 0:
        merged = merged.simplify(simplify_tolerance, preserve_topology=True)
    return clean_polygons(merged, min_area)


def clean_polygons(geometry: BaseGeometry, min_area: float = 0.0) -> MultiPolygon:
    """Valid, non-empty polygon parts of at least ``min_area``, as one MultiPolygon."""
    if not geometry.is_valid:
        geometry = make_valid(geometry)
    parts: list[Polygon] = []
    for part in getattr(geometry, "geoms", [geometry]):
        if isinstance(part, Polygon) and not part.is_empty and part.area >= max(min_area, 1e-12):
            parts.append(part)
        elif isinstance(part, (MultiPolygon, shapely.GeometryCollection)):
            parts.extend(clean_polygons(part, min_area).geoms)
    result = MultiPolygon(parts)
    if not result.is_valid:  # parts touching along an edge after simplification: merge them
        result = clean_polygons(shapely.union_all(parts), min_area) if len(parts) > 1 else result
    return result


def contour_polygons(
    values: np.ndarray,
    threshold: float,
    cell_size: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    simplify_tolerance: float = 0.0,
    min_area: float = 0.0,
    *,
    excluded: np.ndarray | None = None,
) -> MultiPolygon:
    """Polygons where a map of cell values is at least ``threshold``, traced between cell centres.

    Marching squares (``skimage.measure.find_contours``) puts each boundary where the values,
    interpolated linearly between neighbouring cell centres, cross the threshold: no cell staircase, and
    a boundary between a cell above and one below runs between them, so it moves by at most half a cell
    from the cells' own edges. Cell (r, c) is centred on origin + (c + 0.5, r + 0.5)·cell_size; NaN (no
    value: glass) reads as 0, or as the map's minimum if that is lower, so a region at the tissue's edge
    ends close to the edge of its last cell. The map is padded so every contour closes; a contour is a ring, and rings
    nest (the level sets of one map never cross), so their even-odd combination (symmetric difference)
    is the region with its holes: :func:`even_odd` builds it from the rings' nesting in one pass.
    ``excluded`` (bool, the map's shape): cells traced as if they had no value.

    The map is traced a band of rows at a time (:func:`contour_rings`): memory is the rings, not copies
    of the map.
    """
    rings = []
    for ring in contour_rings(values, threshold, excluded):
        x = origin[0] + (ring[:, 1] - 0.5) * cell_size  # padded column c is cell c - 1, centred at c - 0.5
        y = origin[1] + (ring[:, 0] - 0.5) * cell_size
        rings.append(shapely.Polygon(np.column_stack([x, y])))
    valid = shapely.is_valid(np.array(rings, dtype=object)) if rings else np.zeros(0, dtype=bool)
    rings = [ring if ok else make_valid(ring) for ring, ok in zip(rings, valid, strict=True)]
    region = even_odd(sorted(rings, key=lambda r: -r.area))  # large first: parents before their children
    if simplify_tolerance > 0:
        region = simplify_apart(region, simplify_tolerance)
    return clean_polygons(region, min_area)


CONTOUR_BAND_ROWS = 512  # rows of the map traced at once


def contour_rings(
    values: np.ndarray, threshold: float, excluded: np.ndarray | None = None, band_rows: int = CONTOUR_BAND_ROWS
) -> list[np.ndarray]:
    """The closed contours [n, 2] (row, column of the padded map: cell (r, c) is at (r + 1, c + 1)) of
    ``values`` at ``threshold``, as ``skimage.measure.find_contours`` traces them on the whole padded map
    (see :func:`contour_polygons`), each starting at its first vertex in row-major order, in that order.

    Traced a band of ``band_rows`` rows at a time; the pieces of a contour that crosses bands are joined
    where they meet (marching squares computes the point where a contour crosses a row from that row's
    two cells alone, so both bands find the very same point). Rings of at least 4 points.
    """
    from skimage.measure import find_contours

    source = np.asarray(values)
    if source.dtype not in (np.float32, np.float64):
        source = source.astype(np.float64)
    mask = None if excluded is None else np.asarray(excluded, dtype=bool)
    levels = _levels(source, threshold, mask, band_rows)
    if levels is None:
        return []
    floor, dtype, on_level = levels
    height = source.shape[0] + 2  # padded
    closed: list[np.ndarray] = []
    pieces: list[np.ndarray] = []
    top = 0
    while top < height - 1:
        bottom = min(height - 1, top + max(1, band_rows))  # this band's last row is the next band's first
        # A cell exactly at the threshold puts a contour point on its centre, where contours may meet and
        # how they are joined depends on the order of tracing: bands are never cut on such a row.
        while bottom < height - 1 and on_level[bottom]:
            bottom += 1
        band = _padded_rows(source, mask, top, bottom + 1, floor, dtype).astype(np.float64, copy=False)
        for contour in find_contours(band, level=threshold):
            _shift_rows(contour, band, top, threshold)
            ends_meet = contour[0, 0] == contour[-1, 0] and contour[0, 1] == contour[-1, 1]
            (closed if ends_meet else pieces).append(contour)
        del band
        top = bottom
    joined = _join(pieces)
    if joined is None:  # pieces that do not meet one to one (values exactly at the threshold): the whole map
        whole = _padded_rows(source, mask, 0, height, floor, dtype)
        closed, joined = find_contours(whole, level=threshold), []
        del whole
    rings = [_from_first_vertex(ring) for ring in [*closed, *joined] if len(ring) >= 4]
    starts = np.array([ring[0] for ring in rings]).reshape(-1, 2)
    return [rings[i] for i in np.lexsort((starts[:, 1], starts[:, 0]))]


def _levels(
    source: np.ndarray, threshold: float, excluded: np.ndarray | None, band_rows: int
) -> tuple[float, type, np.ndarray] | None:
    """The floor value of the padded map, the float type that holds it exactly and, per row of the padded
    map, whether a cell is exactly at the threshold; None: no cell reaches the threshold. The floor is 0,
    or the lowest value if lower, and always below the threshold (±inf read as the largest finite
    numbers). Read a band of rows at a time."""
    level = np.float64(threshold)  # compared in float64, whatever the map's type
    reached, lowest, infinite = False, np.inf, False
    on_level = np.zeros(source.shape[0] + 2, dtype=bool)
    for top in range(0, source.shape[0], max(1, band_rows)):
        rows = slice(top, top + max(1, band_rows))
        block, usable = source[rows], ~np.isnan(source[rows])
        if excluded is not None:
            usable &= ~excluded[rows]
        if np.isinf(block).any():
            infinite = True
            block = np.nan_to_num(block.astype(np.float64), nan=np.nan)
        reached = reached or bool(np.any(block >= level, where=usable))
        on_level[rows.start + 1 : rows.start + 1 + len(block)] = np.any((block == level) & usable, axis=1)
        lowest = min(lowest, float(np.min(block, where=usable, initial=np.inf)))
    if not reached:
        return None
    floor = min(0.0, lowest if np.isfinite(lowest) else 0.0, float(threshold) - 1e-6)
    exact32 = source.dtype == np.float32 and not infinite and float(np.float32(floor)) == floor
    return floor, np.float32 if exact32 else np.float64, on_level  # skimage traces in float64 either way


def _padded_rows(
    source: np.ndarray, excluded: np.ndarray | None, start: int, stop: int, floor: float, dtype: type
) -> np.ndarray:
    """Rows [start, stop) of the padded map: a border of one cell and the cells without a value (NaN,
    excluded) at ``floor``, ±inf as the largest finite numbers."""
    band = np.full((stop - start, source.shape[1] + 2), floor, dtype=dtype)
    first, last = max(start, 1), min(stop, source.shape[0] + 1)  # padded rows that hold cells
    if first < last:
        block = source[first - 1 : last - 1]
        if np.isinf(block).any():
            block = np.nan_to_num(block.astype(np.float64), nan=np.nan)
        inner = band[first - start : last - start, 1:-1]
        inner[...] = block
        no_value = np.isnan(block)
        if excluded is not None:
            no_value |= excluded[first - 1 : last - 1]
        np.copyto(inner, floor, where=no_value)
    return band


def _shift_rows(contour: np.ndarray, band: np.ndarray, top: int, threshold: float) -> None:
    """Move a contour traced on rows [top, ...) of the map to the map's rows, in place, exactly as
    tracing the whole map puts it: a point between two cells of a column lies at row + fraction, and
    skimage rounds that sum once; so the fraction is computed again (as skimage does) and added to the
    map's row, not to the band's."""
    rows = contour[:, 0]
    between = rows != np.floor(rows)
    upper = np.floor(rows[between]).astype(np.int64)
    column = contour[between, 1].astype(np.int64)
    above, below = band[upper, column], band[upper + 1, column]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(below == above, 0.0, (threshold - above) / (below - above))
    rows += top
    rows[between] = (upper + top).astype(np.float64) + fraction


def _join(pieces: list[np.ndarray]) -> list[np.ndarray] | None:
    """Closed rings from open pieces that meet end to start; None if they do not, one to one."""
    heads: dict[tuple[float, float], int] = {}
    for index, piece in enumerate(pieces):
        key = (float(piece[0, 0]), float(piece[0, 1]))
        if key in heads or key[1] == int(key[1]):  # two pieces from one point, or a point on a cell centre
            return None
        heads[key] = index
    used = np.zeros(len(pieces), dtype=bool)
    rings = []
    for first in range(len(pieces)):
        if used[first]:
            continue
        used[first] = True
        chain, current = [pieces[first]], first
        while True:
            tail = pieces[current][-1]
            following = heads.get((float(tail[0]), float(tail[1])))
            if following is None:
                return None
            if following == first:
                break
            if used[following]:
                return None
            used[following] = True
            chain.append(pieces[following][1:])
            current = following
        rings.append(np.concatenate(chain))
    return rings


def _from_first_vertex(ring: np.ndarray) -> np.ndarray:
    """The closed ring started at its first vertex in row-major order (top row, then leftmost)."""
    points = ring[:-1]
    first = int(np.lexsort((points[:, 1], points[:, 0]))[0])
    rolled = np.roll(points, -first, axis=0)
    return np.concatenate([rolled, rolled[:1]])


def simplify_apart(region: BaseGeometry, tolerance: float) -> BaseGeometry:
    """``region.simplify(tolerance, preserve_topology=True)``, a cluster of nearby polygons at a time.

    Topology-preserving simplification keeps each simplified section clear of every other ring and
    from jumping over any other part, and GEOS checks that against all parts of the geometry: quadratic
    in the number of parts (a minute for a slide's 20,000 specks, holes and islands). A section is
    replaced by a chord only when it lies within ``tolerance`` of the chord, so the chord and whatever
    lies between it and the section are within 2 x ``tolerance`` of the section: polygons further apart
    than that never constrain one another, and simplifying each cluster of closer ones on its own gives
    the same polygons, in the same order.
    """
    parts = list(getattr(region, "geoms", []))
    if not isinstance(region, MultiPolygon) or len(parts) < 2:
        return region.simplify(tolerance, preserve_topology=True)
    shapes = np.array(parts, dtype=object)
    reach = 3.0 * tolerance  # 2 x tolerance, and a margin
    x0, y0, x1, y1 = shapely.bounds(shapes).T
    near, other = shapely.STRtree(shapes).query(shapely.box(x0 - reach, y0 - reach, x1 + reach, y1 + reach))
    pairs = near < other
    near, other = near[pairs], other[pairs]
    larger = shapely.get_num_coordinates(shapes[near]) >= shapely.get_num_coordinates(shapes[other])
    first, second = np.where(larger, near, other), np.where(larger, other, near)
    shapely.prepare(shapes)  # the larger polygon of each pair prepared: its segments are indexed once
    close = shapely.dwithin(shapes[first], shapes[second], reach)
    shapely.destroy_prepared(shapes)
    cluster = _components(len(parts), first[close], second[close])
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    simplified: list[BaseGeometry] = [Polygon()] * len(parts)
    for members in np.split(order, bounds):
        if len(members) == 1:
            simplified[members[0]] = parts[members[0]].simplify(tolerance, preserve_topology=True)
            continue
        result = MultiPolygon([parts[m] for m in members]).simplify(tolerance, preserve_topology=True)
        for member, part in zip(members, getattr(result, "geoms", [result]), strict=True):
            simplified[member] = part
    return MultiPolygon(simplified)


def even_odd(rings: list[BaseGeometry]) -> BaseGeometry:
    """The symmetric difference of these rings (polygons, largest first), without a pass per ring.

    Rings that touch nothing else, or nest properly inside one another (the contours of one map at one
    level), give it directly: a ring inside an even number of others is a shell, its holes are the rings
    directly inside it. A group of rings that touch or cross, or that ``make_valid`` turned into something
    other than a plain ring, is combined ring by ring with GEOS as before (groups never touch each other).
    Polygons come out in the order of their shells (largest first), shells clockwise and holes
    anticlockwise (as shapely's ``is_ccw`` reads them); a group combined with GEOS keeps GEOS's order and
    orientation. Each ring starts at its contour's first vertex, so simplified outlines can differ from the
    former ring-by-ring fold's by up to twice the tolerance (same unsimplified region).
    """
    n = len(rings)
    if n == 0:
        return Polygon()
    shapes = np.array(rings, dtype=object)
    shapely.prepare(shapes)  # predicates below test a prepared larger ring against a smaller one
    outer, inner = shapely.STRtree(shapes).query(shapes)  # envelopes that overlap
    outer, inner = outer[outer < inner], inner[outer < inner]  # each pair once, the larger ring first
    touching = shapely.intersects(shapes[outer], shapes[inner])
    nested = shapely.contains_properly(shapes[outer], shapes[inner])
    inside = np.stack([outer[nested], inner[nested]])  # [container, contained]
    plain = np.array([shapely.get_type_id(r) == 3 and shapely.get_num_interior_rings(r) == 0 for r in rings])
    # Groups: rings linked by touching (nesting included); a group is simple when every link is a nesting.
    group = _components(n, outer[touching], inner[touching])
    tangled = np.zeros(n, dtype=bool)
    tangled[group[outer[touching & ~nested]]] = True
    tangled[group[~plain]] = True
    tangled = tangled[group]
    depth = np.bincount(inside[1], minlength=n)  # rings properly around each ring
    parent = np.full(n, -1, dtype=np.int64)
    np.maximum.at(parent, inside[1], inside[0])  # the smallest ring around it comes last
    holes: dict[int, list[int]] = {}
    for child in np.flatnonzero((depth % 2 == 1) & ~tangled):
        holes.setdefault(int(parent[child]), []).append(int(child))
    pieces: list[tuple[int, list[Polygon]]] = []
    for index in np.flatnonzero((depth % 2 == 0) & ~tangled):
        shell = np.asarray(rings[index].exterior.coords)
        hole_rings = [np.asarray(rings[h].exterior.coords) for h in holes.get(int(index), [])]
        pieces.append((int(index), [_oriented(shell, hole_rings)]))
    for first in np.unique(group[tangled]):
        members = np.flatnonzero(group == first)
        region: BaseGeometry = Polygon()
        for member in members:
            region = shapely.symmetric_difference(region, rings[member])
        parts = [p for p in getattr(region, "geoms", [region]) if isinstance(p, Polygon) and not p.is_empty]
        pieces.append((int(members.min()), parts))
    polygons = [polygon for _, parts in sorted(pieces, key=lambda piece: piece[0]) for polygon in parts]
    return MultiPolygon(polygons)


def _oriented(shell: np.ndarray, holes: list[np.ndarray]) -> Polygon:
    """A polygon with a clockwise shell and anticlockwise holes (GEOS's overlay's orientation)."""

    def signed_area(ring: np.ndarray) -> float:
        x, y = ring[:, 0], ring[:, 1]
        return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))

    return Polygon(
        shell if signed_area(shell) < 0 else shell[::-1],
        [hole if signed_area(hole) > 0 else hole[::-1] for hole in holes],
    )


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per node, the smallest node of its connected component (edges a[i] - b[i])."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]
