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
