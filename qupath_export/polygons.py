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
) -> MultiPolygon:
    """Polygons where a map of cell values is at least ``threshold``, traced between cell centres.

    Marching squares (``skimage.measure.find_contours``) puts each boundary where the values,
    interpolated linearly between neighbouring cell centres, cross the threshold: no cell staircase, and
    a boundary between a cell above and one below runs between them, so it moves by at most half a cell
    from the cells' own edges. Cell (r, c) is centred on origin + (c + 0.5, r + 0.5)·cell_size; NaN (no
    value: glass) reads as 0, or as the map's minimum if that is lower, so a region at the tissue's edge
    ends close to the edge of its last cell. The map is padded so every contour closes; a contour is a ring, and rings
    nest (the level sets of one map never cross), so their even-odd combination (symmetric difference)
    is the region with its holes.
    """
    from skimage.measure import find_contours

    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    if not (values >= threshold).any():
        return MultiPolygon()
    finite = values[np.isfinite(values)]
    floor = min(0.0, float(finite.min()) if finite.size else 0.0, float(threshold) - 1e-6)
    padded = np.pad(np.where(np.isfinite(values), values, floor), 1, constant_values=floor)
    rings = []
    for contour in find_contours(padded, level=threshold):
        if len(contour) < 4:
            continue
        x = origin[0] + (contour[:, 1] - 0.5) * cell_size  # padded column c is cell c - 1, centred at c - 0.5
        y = origin[1] + (contour[:, 0] - 0.5) * cell_size
        ring = shapely.Polygon(np.column_stack([x, y]))
        rings.append(ring if ring.is_valid else make_valid(ring))
    region: BaseGeometry = Polygon()
    for ring in sorted(rings, key=lambda r: -r.area):  # large first: fewer vertices in the running result
        region = shapely.symmetric_difference(region, ring)
    if simplify_tolerance > 0:
        region = region.simplify(simplify_tolerance, preserve_topology=True)
    return clean_polygons(region, min_area)
