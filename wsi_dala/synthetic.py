"""Synthetic H&E-like slides written as real pyramidal TIFF files (Aperio SVS or generic TIFF).

Used by the test suite, the benchmarks and ``wsi-dala demo``: the files are written with tifffile in
the layouts scanners use (JPEG tiles, pyramid levels, an Aperio ImageDescription with AppMag and MPP,
or TIFF resolution tags), so openslide and tiffslide both open them. The truth (tissue, tumour, pen
marks) is kept as a label map so tests can measure what the pipeline finds.

Tiles are painted on demand from the label map, so a 40,000 x 30,000 slide never exists in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from wsi_dala.errors import ConfigError
from wsi_dala.layout import building_path

MIN_SIDE_PX, MAX_SIDE_PX = 256, 200_000  # a slide smaller than one tile is not a slide

# Label values of the truth map.
BACKGROUND, TISSUE, TUMOUR, GREEN_PEN, BLUE_PEN, BLACK_INK, DEBRIS = range(7)
LABEL_NAMES = ("background", "tissue", "tumour", "green-pen", "blue-pen", "black-ink", "debris")

# Base colour and nucleus colour per label, and the fraction of area covered by nuclei.
_BASE_RGB = np.array(
    [[243, 242, 240], [232, 168, 204], [205, 140, 190], [60, 160, 90], [60, 90, 190], [35, 35, 40], [150, 150, 150]],
    dtype=np.float32,
)
_NUCLEUS_RGB = np.array(
    [[243, 242, 240], [120, 70, 150], [70, 35, 110], [60, 160, 90], [60, 90, 190], [35, 35, 40], [150, 150, 150]],
    dtype=np.float32,
)
_NUCLEUS_DENSITY = np.array([0.0, 0.10, 0.45, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
_NOISE_AMPLITUDE = np.array([2.0, 8.0, 8.0, 6.0, 6.0, 4.0, 4.0], dtype=np.float32)
_PATTERN_PX = 512


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to write. Sizes are level-0 pixels; the truth map has one pixel per ``label_px``."""

    width: int = 8192
    height: int = 6144
    mpp: float = 0.25
    layout: str = "svs"  # "svs" | "tiff" (generic pyramidal, resolution tags) | "single" (one level)
    write_mpp: bool = True  # False: no µm/px at all (and no AppMag)
    app_mag: float | None = 40.0  # Aperio AppMag; None leaves it out
    tile_px: int = 256
    level_step: int = 4
    min_level_px: int = 512
    jpeg_quality: int = 90
    label_px: int = 16
    seed: int = 0
    tissue_fraction: float = 0.45
    tumour_regions: int = 3
    pen_marks: bool = True
    debris: bool = True

    def __post_init__(self) -> None:
        if not (MIN_SIDE_PX <= self.width <= MAX_SIDE_PX and MIN_SIDE_PX <= self.height <= MAX_SIDE_PX):
            raise ConfigError(
                f"slide size {self.width}x{self.height}: each side must be {MIN_SIDE_PX} to {MAX_SIDE_PX} pixels"
            )
        if not (math.isfinite(self.mpp) and 0.05 <= self.mpp <= 50):
            raise ConfigError(f"slide µm/px {self.mpp}: must be a number from 0.05 to 50")
        if self.seed < 0:
            raise ConfigError(f"seed {self.seed}: must be 0 or more")
        if self.layout not in ("svs", "tiff", "single"):
            raise ConfigError(f"layout {self.layout!r}: svs, tiff or single")


@dataclass
class SyntheticSlide:
    """The written file and its truth."""

    path: Path
    spec: SyntheticSlideSpec
    labels: np.ndarray = field(repr=False)  # uint8 [ceil(H/label_px), ceil(W/label_px)]

    @property
    def label_px(self) -> int:
        return self.spec.label_px

    def truth_mask(self, *label_values: int) -> np.ndarray:
        return np.isin(self.labels, label_values)


def make_labels(spec: SyntheticSlideSpec) -> np.ndarray:
    """A truth map: organic tissue blobs, tumour regions inside them, pen marks and debris on the glass."""
    rng = np.random.default_rng(spec.seed)
    h = math.ceil(spec.height / spec.label_px)
    w = math.ceil(spec.width / spec.label_px)
    # Tissue: smoothed noise thresholded at the quantile that gives the wanted area, kept off the edges.
    field_ = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / 14)
    yy, xx = np.mgrid[0:h, 0:w]
    edge = np.minimum.reduce([yy, xx, h - 1 - yy, w - 1 - xx]) / max(1, min(h, w))
    field_ = field_ - np.where(edge < 0.08, 10.0, 0.0)
    tissue = field_ > np.quantile(field_, 1 - spec.tissue_fraction)
    labels = np.where(tissue, TISSUE, BACKGROUND).astype(np.uint8)
    # Tumour: ellipses centred on tissue, clipped to tissue.
    tissue_points = np.argwhere(ndimage.binary_erosion(tissue, iterations=max(1, min(h, w) // 25)))
    if len(tissue_points) == 0:
        tissue_points = np.argwhere(tissue)
    for _ in range(spec.tumour_regions if len(tissue_points) else 0):
        cy, cx = tissue_points[rng.integers(len(tissue_points))]
        ry, rx = rng.uniform(0.06, 0.12, size=2) * min(h, w)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        labels[(u**2 + v**2 <= 1) & tissue] = TUMOUR
    if spec.pen_marks:
        _draw_pen(labels, rng)
    if spec.debris:
        for _ in range(12):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            if labels[cy, cx] == BACKGROUND:
                labels[cy : cy + 1, cx : cx + 1] = DEBRIS
    return labels


def _draw_pen(labels: np.ndarray, rng: np.random.Generator) -> None:
    """A green stroke and a blue circle (pathologists' ink), and a black dot, partly over tissue."""
    h, w = labels.shape
    thickness = max(1, min(h, w) // 80)
    yy, xx = np.mgrid[0:h, 0:w]
    y0 = rng.uniform(0.1, 0.3) * h
    stroke = np.abs(yy - (y0 + 0.15 * (xx - w * 0.2))) <= thickness
    labels[stroke & (xx > w * 0.2) & (xx < w * 0.55)] = GREEN_PEN
    cy, cx, r = 0.75 * h, 0.8 * w, 0.08 * min(h, w)
    ring = np.abs(np.hypot(yy - cy, xx - cx) - r) <= thickness
    labels[ring] = BLUE_PEN
    dot = np.hypot(yy - 0.85 * h, xx - 0.15 * w) <= thickness * 2
    labels[dot] = BLACK_INK


def _texture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tileable nucleus field (blob-like, uniform rank in [0, 1)) and pixel noise."""
    rng = np.random.default_rng(seed + 1)
    blobs = ndimage.gaussian_filter(rng.standard_normal((_PATTERN_PX, _PATTERN_PX)), sigma=2.5, mode="wrap")
    ranks = np.empty(blobs.size, dtype=np.float32)
    ranks[np.argsort(blobs, axis=None)] = np.linspace(0, 1, blobs.size, endpoint=False, dtype=np.float32)
    noise = rng.standard_normal((_PATTERN_PX, _PATTERN_PX, 3)).astype(np.float32)
    return 1.0 - ranks.reshape(blobs.shape), noise


class _Painter:
    """Paints any level-0 region at any downsample from the label map."""

    def __init__(self, labels: np.ndarray, label_px: int, seed: int):
        self.labels = labels
        self.label_px = label_px
        self.nuclei, self.noise = _texture(seed)

    def paint(self, x0: int, y0: int, width: int, height: int, downsample: float) -> np.ndarray:
        xs = (x0 + (np.arange(width) + 0.5) * downsample).astype(np.int64)
        ys = (y0 + (np.arange(height) + 0.5) * downsample).astype(np.int64)
        lab = self.labels[
            np.clip(ys // self.label_px, 0, self.labels.shape[0] - 1)[:, None],
            np.clip(xs // self.label_px, 0, self.labels.shape[1] - 1)[None, :],
        ]
        px, py = xs % _PATTERN_PX, ys % _PATTERN_PX
        density = _NUCLEUS_DENSITY[lab]
        if downsample <= 1.5:
            nucleus = (self.nuclei[py[:, None], px[None, :]] < density)[..., None]
            rgb = np.where(nucleus, _NUCLEUS_RGB[lab], _BASE_RGB[lab])
            amplitude = _NOISE_AMPLITUDE[lab]
        else:  # far out, nuclei blur into the mean colour
            d = density[..., None]
            rgb = _BASE_RGB[lab] * (1 - d) + _NUCLEUS_RGB[lab] * d
            amplitude = _NOISE_AMPLITUDE[lab] / math.sqrt(downsample)
        rgb = rgb + self.noise[py[:, None], px[None, :]] * amplitude[..., None]
        # Outside the image: nothing (a scanner would not write it); caller crops.
        return np.clip(rgb, 0, 255).astype(np.uint8)


def _level_sizes(spec: SyntheticSlideSpec) -> list[tuple[int, int, int]]:
    """(width, height, downsample) per level."""
    sizes = [(spec.width, spec.height, 1)]
    if spec.layout == "single":
        return sizes
    ds = spec.level_step
    while max(spec.width // ds, spec.height // ds) >= spec.min_level_px:
        sizes.append((spec.width // ds, spec.height // ds, ds))
        ds *= spec.level_step
    return sizes


def _tiles(painter: _Painter, width: int, height: int, downsample: int, tile_px: int) -> Iterator[np.ndarray]:
    for ty in range(0, height, tile_px):
        for tx in range(0, width, tile_px):
            tile = painter.paint(tx * downsample, ty * downsample, tile_px, tile_px, downsample)
            tile[max(0, height - ty) :, :] = 0  # beyond the image edge: padding, as scanners write it
            tile[:, max(0, width - tx) :] = 0
            yield tile


def _aperio_description(spec: SyntheticSlideSpec, width: int, height: int, level_w: int, level_h: int) -> str:
    head = f"Aperio Image Library v12.0.15 \r\n{spec.width}x{spec.height} [0,0 {spec.width}x{spec.height}] "
    head += f"({spec.tile_px}x{spec.tile_px}) JPEG/RGB Q={spec.jpeg_quality}"
    if (level_w, level_h) != (width, height):
        head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {level_w}x{level_h} - "
    fields = ["ScanScope ID = SYNTHETIC", "Filename = synthetic"]
    if spec.write_mpp:
        fields.append(f"MPP = {spec.mpp:.4f}")
    if spec.write_mpp and spec.app_mag:
        fields.append(f"AppMag = {spec.app_mag:g}")
    return head + "|" + "|".join(fields)


def write_synthetic_slide(path: str | Path, spec: SyntheticSlideSpec | None = None) -> SyntheticSlide:
    """Write a synthetic slide to ``path`` and return it with its truth map."""
    spec = spec or SyntheticSlideSpec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = make_labels(spec)
    painter = _Painter(labels, spec.label_px, spec.seed)
    levels = _level_sizes(spec)
    common = dict(
        dtype=np.uint8,
        tile=(spec.tile_px, spec.tile_px),
        compression="jpeg",
        compressionargs={"level": spec.jpeg_quality},
        photometric="rgb",
        metadata=None,
    )
    tmp = building_path(path)
    with tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height > 2**31 // 3) as tif:
        for index, (w, h, ds) in enumerate(levels):
            # Aperio marks every level as a full image (subfiletype 0); tifffile relies on that.
            reduced = index > 0 and spec.layout != "svs"
            kwargs = dict(common, shape=(h, w, 3), subfiletype=1 if reduced else 0)
            if spec.layout == "svs":
                kwargs["description"] = _aperio_description(spec, spec.width, spec.height, w, h)
            elif spec.write_mpp:
                pixels_per_cm = 1e4 / (spec.mpp * ds)
                kwargs["resolution"] = (pixels_per_cm, pixels_per_cm)
                kwargs["resolutionunit"] = "CENTIMETER"
            tif.write(_tiles(painter, w, h, ds, spec.tile_px), **kwargs)
            if spec.layout == "svs" and index == 0:
                # Aperio puts a stripped thumbnail second; both readers expect it there.
                scale = max(spec.width, spec.height) / 768
                thumb = painter.paint(0, 0, int(spec.width / scale), int(spec.height / scale), scale)
                tif.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    metadata=None,
                    description=f"Aperio Image Library v12.0.15 \r\n{spec.width}x{spec.height} -> "
                    f"{thumb.shape[1]}x{thumb.shape[0]} - |thumbnail",
                )
    tmp.replace(path)
    return SyntheticSlide(path=path, spec=spec, labels=labels)
