"""What the synthetic slides carry besides tissue: marker strokes, folds and out-of-focus patches, drawn on
the truth maps (one pixel per ``label_px`` level-0 pixels) with sizes in mm, so they scale with the slide.

Strokes are polylines densified to half a pixel and thickened by a distance transform, with a jittered
width, so their edges are not the straight lines a detector could learn from.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from wsi_dala.slides.synthetic import SyntheticSlideSpec


# Values of the ink map: an index into MARKER_NAMES, 0 where there is no ink.
MARKER_NAMES = ("", "green", "blue", "black", "dark-grey", "red")
INK_NONE, INK_GREEN, INK_BLUE, INK_BLACK, INK_DARK_GREY, INK_RED = range(6)

MARKER_SHAPES = ("curve", "circle", "dot", "line")


def label_px_of_mm(spec: SyntheticSlideSpec, mm: float) -> float:
    return mm * 1000.0 / (spec.mpp * spec.label_px)


def _size(spec: SyntheticSlideSpec, shape: tuple[int, ...], mm: float, cap: float, floor: float) -> float:
    """A physical size in label pixels, capped to ``cap`` of the shorter side and at least ``floor``."""
    return max(floor, min(label_px_of_mm(spec, mm), cap * min(shape)))


def _densify(vertices_yx: np.ndarray, step_px: float = 0.5) -> np.ndarray:
    """Points along a polyline every ``step_px``, so a distance transform sees a continuous line."""
    if len(vertices_yx) == 1:
        return vertices_yx
    along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(vertices_yx, axis=0).T))])
    t = np.arange(0.0, along[-1] + step_px, step_px)
    return np.stack([np.interp(t, along, vertices_yx[:, 0]), np.interp(t, along, vertices_yx[:, 1])], axis=1)


def stroke_mask(
    shape: tuple[int, ...], vertices_yx: np.ndarray, half_width: float, rng: np.random.Generator
) -> np.ndarray:
    """Label pixels within ``half_width`` of a polyline, with a slightly ragged edge like a felt tip."""
    points = _densify(np.asarray(vertices_yx, dtype=np.float64))
    pad = math.ceil(half_width * 1.3) + 2
    y_lo, x_lo = np.floor(points.min(axis=0)).astype(int) - pad
    y_hi, x_hi = np.ceil(points.max(axis=0)).astype(int) + pad + 1
    out = np.zeros(shape, dtype=bool)
    # The window may reach past the map (a stroke running off the slide); only its overlap is kept.
    window = np.ones((y_hi - y_lo, x_hi - x_lo), dtype=bool)
    rows, cols = np.round(points - (y_lo, x_lo)).astype(int).T
    window[rows, cols] = False
    distance = ndimage.distance_transform_edt(window)
    ragged = ndimage.gaussian_filter(rng.standard_normal(window.shape), sigma=max(1.0, half_width / 2))
    ragged /= max(float(ragged.std()), 1e-9)
    inside = distance <= half_width * (1 + 0.08 * ragged)
    top, left = max(0, y_lo), max(0, x_lo)
    bottom, right = min(shape[0], y_hi), min(shape[1], x_hi)
    if bottom > top and right > left:
        out[top:bottom, left:right] = inside[top - y_lo : bottom - y_lo, left - x_lo : right - x_lo]
    return out


def _spread_points(candidates: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` points from ``candidates``, each far from those already chosen (randomised farthest-point)."""
    chosen: list[np.ndarray] = []
    nearest = np.full(len(candidates), np.inf)
    for _ in range(n):
        if not chosen:
            index = int(rng.integers(len(candidates)))
        else:
            far = np.flatnonzero(nearest >= 0.7 * nearest.max())
            index = int(far[rng.integers(len(far))])
        chosen.append(candidates[index].astype(np.float64))
        nearest = np.minimum(nearest, np.hypot(*(candidates - candidates[index]).T))
    return chosen


def _interior(shape: tuple[int, ...], margin: float) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    m = int(margin)
    return (yy >= m) & (yy < h - m) & (xx >= m) & (xx < w - m)


def _marker_vertices(
    kind: str, centre: np.ndarray, length: float, width: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """The polyline and half width of one marker shape centred on ``centre`` (label pixels, y, x); a circle
    is ``length`` across."""
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    if kind == "dot":
        return centre[None, :], max(width * rng.uniform(0.8, 1.4), 3.0)
    if kind == "circle":  # hand-drawn: a little elliptical, not quite closed or overlapping its start
        radius = max(length / 2, 2.5 * width)
        start = rng.uniform(0, 2 * np.pi)
        theta = start + np.linspace(0, rng.uniform(1.85, 2.1) * np.pi, 128)
        r = radius * (1 + 0.06 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi)))
        squash = rng.uniform(0.7, 1.0)
        u, v = r * np.cos(theta), squash * r * np.sin(theta)
        return centre + np.outer(u, direction) + np.outer(v, normal), width / 2
    t = np.linspace(-0.5, 0.5, 96)
    bend = 0.0 if kind == "line" else rng.uniform(0.06, 0.15) * length
    wave = bend * np.sin(2 * np.pi * rng.uniform(0.5, 1.2) * t + rng.uniform(0, 2 * np.pi))
    return centre + np.outer(t * length, direction) + np.outer(wave, normal), width / 2


def draw_markers(
    spec: SyntheticSlideSpec, tissue: np.ndarray, markers: tuple[str, ...], rng: np.random.Generator
) -> np.ndarray:
    """One stroke per marker (curve, circle, dot or line), each centred on a different stretch of the
    tissue edge so it crosses from glass onto tissue."""
    shape = tissue.shape
    ink = np.zeros(shape, dtype=np.uint8)
    if not markers:
        return ink
    inside = _interior(shape, 0.1 * min(shape))
    edge = tissue & ~ndimage.binary_erosion(tissue) & inside
    if edge.any():
        candidates = np.argwhere(edge)
    else:  # no tissue (or no tissue edge away from the border): anywhere off the border, or anywhere at all
        candidates = np.argwhere(inside) if inside.any() else np.argwhere(np.ones(shape, dtype=bool))
    first_shape = int(rng.integers(len(MARKER_SHAPES)))
    for i, (name, centre) in enumerate(zip(markers, _spread_points(candidates, len(markers), rng), strict=True)):
        kind = MARKER_SHAPES[(first_shape + i) % len(MARKER_SHAPES)]
        width = _size(spec, shape, rng.uniform(0.4, 1.0), cap=1 / 20, floor=2)
        length = max(_size(spec, shape, rng.uniform(2.0, 6.0), cap=0.4, floor=4), 4 * width)
        for _attempt in range(6):  # another orientation when it would mostly cover another marker
            vertices, half_width = _marker_vertices(kind, centre, length, width, rng)
            stroke = stroke_mask(shape, vertices, half_width, rng)
            if (stroke & (ink != INK_NONE)).sum() <= 0.05 * stroke.sum():
                break
        ink[stroke] = MARKER_NAMES.index(name)
    return ink


def draw_folds(spec: SyntheticSlideSpec, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Elongated, slightly bent bands (0.3–1 mm wide, a few mm long) inside tissue."""
    folds = np.zeros(tissue.shape, dtype=bool)
    centres = np.argwhere(ndimage.binary_erosion(tissue, iterations=2))
    for _ in range(spec.folds if len(centres) else 0):
        centre = centres[rng.integers(len(centres))].astype(np.float64)
        width = _size(spec, tissue.shape, rng.uniform(0.3, 1.0), cap=1 / 15, floor=2)
        length = max(_size(spec, tissue.shape, rng.uniform(2.0, 5.0), cap=0.35, floor=6), 5 * width)
        vertices, half_width = _marker_vertices("curve", centre, length, width, rng)
        folds |= stroke_mask(tissue.shape, vertices, half_width, rng)
    return folds & tissue


def draw_blur(spec: SyntheticSlideSpec, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Irregular blobs 1–3 mm across inside tissue, where the scanner lost focus."""
    blur = np.zeros(tissue.shape, dtype=bool)
    centres = np.argwhere(ndimage.binary_erosion(tissue, iterations=2))
    for _ in range(spec.blur_patches if len(centres) else 0):
        centre = centres[rng.integers(len(centres))].astype(np.float64)
        across = _size(spec, tissue.shape, rng.uniform(1.0, 3.0), cap=0.3, floor=6)
        angle = rng.uniform(0, np.pi)
        reach = rng.uniform(0.0, 0.25) * across * np.array([np.sin(angle), np.cos(angle)])
        blur |= stroke_mask(tissue.shape, np.stack([centre - reach, centre + reach]), across / 2, rng)
    return blur & tissue
