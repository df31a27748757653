"""Synthetic H&E-like slides written as real pyramidal TIFF files (Aperio SVS or generic TIFF).

Used by the test suite, the benchmarks and ``wsi-dala demo``: the files are written with tifffile in
the layouts scanners use (JPEG tiles, pyramid levels, an Aperio ImageDescription with AppMag and MPP,
or TIFF resolution tags), so openslide and tiffslide both open them.

The truth is kept as maps at one pixel per ``label_px`` level-0 pixels, so tests can measure what the
quality control and the pipeline find:

- ``labels``: what the glass carries (background, tissue, tumour, debris);
- ``ink``: marker ink on the slide (an index into ``MARKER_NAMES``), painted over glass or tissue by
  Beer–Lambert (the underlying colour times the ink's transmittance), so tissue shows through faintly;
- ``folds``: tissue folded onto itself (twice the optical density: darker and more saturated);
- ``blur``: tissue scanned out of focus (a Gaussian blur at full resolution).

Tiles are painted on demand from these maps, so a 40,000 x 30,000 slide never exists in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile
from scipy import ndimage

from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import building_path
from wsi_dala.slides.synthetic_artefacts import (
    INK_NONE,
    MARKER_NAMES,
    draw_blur,
    draw_folds,
    draw_markers,
)

MIN_SIDE_PX, MAX_SIDE_PX = 256, 200_000  # a slide smaller than one tile is not a slide
MAX_REGIONS = 50  # folds or blurred patches per slide

# Label values of the truth map. GREEN_PEN, BLUE_PEN and BLACK_INK are no longer written (ink is its own
# layer, see MARKER_NAMES); they stay importable so older callers still load.
BACKGROUND, TISSUE, TUMOUR, GREEN_PEN, BLUE_PEN, BLACK_INK, DEBRIS = range(7)
LABEL_NAMES = ("background", "tissue", "tumour", "green-pen", "blue-pen", "black-ink", "debris")


STAIN_NAMES = ("default", "pale", "dark")

_GLASS_RGB = np.array([243, 242, 240], dtype=np.float32)
# Each marker's colour over clean glass; its transmittance is this divided by the glass colour.
_MARKER_RGB = np.array(
    [_GLASS_RGB, [60, 160, 90], [60, 90, 190], [40, 40, 45], [85, 85, 90], [200, 40, 50]], dtype=np.float32
)

# Base colour and nucleus colour per label, and the fraction of area covered by nuclei. The pen rows
# are only used by label maps written before ink became a layer.
_BASE_RGB = np.array(
    [[243, 242, 240], [232, 168, 204], [205, 140, 190], [60, 160, 90], [60, 90, 190], [35, 35, 40], [150, 150, 150]],
    dtype=np.float32,
)
_NUCLEUS_RGB = np.array(
    [[243, 242, 240], [120, 70, 150], [70, 35, 110], [60, 160, 90], [60, 90, 190], [35, 35, 40], [150, 150, 150]],
    dtype=np.float32,
)
# Per stain: tissue base, tissue nucleus, tumour base, tumour nucleus. "pale": weak eosin, light overall;
# "dark": strong haematoxylin, bluer. Tumour stays the darker, denser purple in each.
_STAIN_RGB = {
    "default": ((232, 168, 204), (120, 70, 150), (205, 140, 190), (70, 35, 110)),
    "pale": ((238, 204, 224), (155, 115, 185), (222, 178, 212), (105, 70, 150)),
    "dark": ((214, 150, 205), (80, 62, 150), (178, 120, 190), (42, 32, 112)),
}
_NUCLEUS_DENSITY = np.array([0.0, 0.10, 0.45, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
_NOISE_AMPLITUDE = np.array([2.0, 8.0, 8.0, 6.0, 6.0, 4.0, 4.0], dtype=np.float32)
_PATTERN_PX = 512
_N_LABELS, _N_INKS = len(LABEL_NAMES), len(MARKER_NAMES)


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to write. Sizes are level-0 pixels; the truth maps have one pixel per ``label_px``.

    Physical sizes (marker strokes 0.4–1 mm wide, folds 0.3–1 mm wide, blurred patches 1–3 mm across)
    are capped to a fraction of the slide so that small test slides still have glass, tissue and ink apart.
    """

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
    pen_marks: bool = True  # False: no markers at all, whatever ``markers`` says
    debris: bool = True
    markers: tuple[str, ...] = ("green", "blue", "black")  # names from MARKER_NAMES, one stroke each
    folds: int = 0  # tissue folds
    blur_patches: int = 0  # out-of-focus patches of tissue
    stain: str = "default"  # one of STAIN_NAMES

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
        if isinstance(self.markers, str):
            raise ConfigError(f"markers {self.markers!r}: a tuple of names, e.g. ('green', 'blue')")
        object.__setattr__(self, "markers", tuple(self.markers))  # a list from a caller: keep the spec hashable
        for name in self.markers:
            if name not in MARKER_NAMES[1:]:
                raise ConfigError(f"marker {name!r}: one of {', '.join(MARKER_NAMES[1:])}")
        for what, count in (("folds", self.folds), ("blur patches", self.blur_patches)):
            if not (isinstance(count, (int, np.integer)) and 0 <= count <= MAX_REGIONS):
                raise ConfigError(f"{what} {count!r}: must be a whole number from 0 to {MAX_REGIONS}")
        if self.stain not in STAIN_NAMES:
            raise ConfigError(f"stain {self.stain!r}: one of {', '.join(STAIN_NAMES)}")


class Truth(NamedTuple):
    """The truth maps of one slide, all [ceil(H/label_px), ceil(W/label_px)]."""

    labels: np.ndarray  # uint8 label values (BACKGROUND, TISSUE, TUMOUR, DEBRIS)
    ink: np.ndarray  # uint8 index into MARKER_NAMES, 0 = no ink
    folds: np.ndarray  # bool: tissue folded onto itself
    blur: np.ndarray  # bool: tissue out of focus


@dataclass
class SyntheticSlide:
    """The written file and its truth."""

    path: Path
    spec: SyntheticSlideSpec
    labels: np.ndarray = field(repr=False)  # uint8 [ceil(H/label_px), ceil(W/label_px)]
    ink: np.ndarray = field(repr=False)  # uint8, same shape: index into MARKER_NAMES, 0 = no ink
    folds: np.ndarray = field(repr=False)  # bool, same shape
    blur: np.ndarray = field(repr=False)  # bool, same shape

    @property
    def label_px(self) -> int:
        return self.spec.label_px

    def truth_mask(self, *label_values: int) -> np.ndarray:
        return np.isin(self.labels, label_values)

    def ink_mask(self, *names: str) -> np.ndarray:
        """Where the named markers' ink is (any ink when no names are given)."""
        if not names:
            return self.ink != INK_NONE
        for name in names:
            if name not in MARKER_NAMES[1:]:
                raise ConfigError(f"marker {name!r}: one of {', '.join(MARKER_NAMES[1:])}")
        return np.isin(self.ink, [MARKER_NAMES.index(name) for name in names])


def make_labels(spec: SyntheticSlideSpec) -> np.ndarray:
    """The label map alone (tissue, tumour, debris); see ``make_truth`` for ink, folds and blur."""
    return make_truth(spec).labels


def make_truth(spec: SyntheticSlideSpec) -> Truth:
    """Organic tissue blobs, tumour regions inside them, debris on the glass; then ink, folds and blur.

    Ink, folds and blur each draw from their own random stream, so adding folds does not move the ink.
    """
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
    if spec.debris:
        for _ in range(12):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            if labels[cy, cx] == BACKGROUND:
                labels[cy : cy + 1, cx : cx + 1] = DEBRIS
    markers = spec.markers if spec.pen_marks else ()
    ink = draw_markers(spec, tissue, markers, np.random.default_rng([spec.seed, 1]))
    folds = draw_folds(spec, tissue, np.random.default_rng([spec.seed, 2]))
    blur = draw_blur(spec, tissue, np.random.default_rng([spec.seed, 3]))
    return Truth(labels=labels, ink=ink, folds=folds, blur=blur)


def _texture(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tileable fields: nuclei (blob-like, uniform rank in [0, 1)), pixel noise, a smooth displacement
    (2, y x, standard deviation 1) that roughens the edges of the truth maps, and a smooth field (standard
    deviation 1) that makes marker ink a little uneven, as a felt tip lays it down."""
    rng = np.random.default_rng(seed + 1)
    blobs = ndimage.gaussian_filter(rng.standard_normal((_PATTERN_PX, _PATTERN_PX)), sigma=2.5, mode="wrap")
    ranks = np.empty(blobs.size, dtype=np.float32)
    ranks[np.argsort(blobs, axis=None)] = np.linspace(0, 1, blobs.size, endpoint=False, dtype=np.float32)
    noise = rng.standard_normal((_PATTERN_PX, _PATTERN_PX, 3)).astype(np.float32)
    smooth = rng.standard_normal((3, _PATTERN_PX, _PATTERN_PX))
    smooth[:2] = ndimage.gaussian_filter(smooth[:2], sigma=(0, 5, 5), mode="wrap")
    smooth[2] = ndimage.gaussian_filter(smooth[2], sigma=(4, 14), mode="wrap")
    smooth /= smooth.std(axis=(1, 2), keepdims=True)
    return 1.0 - ranks.reshape(blobs.shape), noise, smooth[:2], smooth[2].astype(np.float32)


def _marker_transmittance(seed: int) -> np.ndarray:
    """Per marker, the fraction of light its ink lets through per channel, jittered a little per seed
    so that tests do not fit one RGB."""
    rng = np.random.default_rng([seed, 4])
    rgb = np.clip(_MARKER_RGB + rng.normal(0, 5, _MARKER_RGB.shape), 15, _GLASS_RGB)
    density = -np.log(rgb / _GLASS_RGB) * rng.uniform(0.9, 1.1, (len(rgb), 1))  # optical density
    density[INK_NONE] = 0.0
    return np.exp(-density).astype(np.float32)


class _Tables(NamedTuple):
    """Per key = label + N_LABELS * (ink + N_INKS * fold). Folds and ink are folded into the colours, so
    painting costs one lookup per pixel whatever the slide carries."""

    colours: np.ndarray  # [2 * key + is_nucleus, rgb]
    density: np.ndarray  # [key]: fraction of area covered by nuclei
    amplitude: np.ndarray  # [key]: pixel noise
    mean: np.ndarray  # [key, rgb]: the colour far out, where nuclei blur into it
    log_transmittance: np.ndarray  # [key, rgb]: the ink's, 0 without ink (to make ink uneven)


def _colour_tables(stain: str, seed: int) -> _Tables:
    base, nucleus = _BASE_RGB.copy(), _NUCLEUS_RGB.copy()
    tissue_base, tissue_nucleus, tumour_base, tumour_nucleus = _STAIN_RGB[stain]
    base[TISSUE], nucleus[TISSUE] = tissue_base, tissue_nucleus
    base[TUMOUR], nucleus[TUMOUR] = tumour_base, tumour_nucleus
    pair = np.stack([base, nucleus], axis=1)  # [label, base|nucleus, rgb]
    transmittance = _marker_transmittance(seed)
    colours, amplitude, log_t = [], [], []
    for fold in (False, True):
        # A fold is the section lying on itself: twice the optical density, so T becomes T squared.
        under = 255.0 * (pair / 255.0) ** 2 if fold else pair
        for ink in range(_N_INKS):
            colours.append(under * transmittance[ink])  # Beer–Lambert: ink absorbs on top of what is under it
            # Ink hides the texture under it in proportion; the sensor's own noise stays.
            amplitude.append(_NOISE_AMPLITUDE * transmittance[ink].mean() + (2.0 if ink else 0.0))
            log_t.append(np.broadcast_to(np.log(transmittance[ink]), (_N_LABELS, 3)))
    table = np.concatenate(colours).astype(np.float32)  # [key, base|nucleus, rgb]
    density = np.tile(_NUCLEUS_DENSITY, 2 * _N_INKS)
    mean = table[:, 0] * (1 - density[:, None]) + table[:, 1] * density[:, None]
    return _Tables(
        colours=table.reshape(-1, 3),
        density=density,
        amplitude=np.concatenate(amplitude).astype(np.float32),
        mean=mean,
        log_transmittance=np.concatenate(log_t).astype(np.float32),
    )


def _blur_box_px(sigma_px: float) -> int:
    """Width of a box filter that, applied three times, blurs like a Gaussian of ``sigma_px`` (odd)."""
    return max(1, 2 * round((math.sqrt(4 * sigma_px**2 + 1) - 1) / 2) + 1)


class _Painter:
    """Paints any level-0 region at any downsample from the truth maps.

    At full resolution (downsample <= 1.5) the truth maps are looked up through a smooth displacement of
    at most one label pixel, so region edges are ragged like real ones instead of ``label_px`` stairs;
    coarser levels follow the truth maps exactly.
    """

    def __init__(self, truth: Truth, spec: SyntheticSlideSpec):
        self.label_px = spec.label_px
        self.mpp = spec.mpp
        key = truth.labels.astype(np.int16) + _N_LABELS * (truth.ink + _N_INKS * truth.folds.astype(np.int16))
        self.keys = key.astype(np.int16)  # np.take reads it flat
        self.tables = _colour_tables(spec.stain, spec.seed)
        self.ink_any = bool(truth.ink.any())
        self.blur = truth.blur.ravel()
        self.blur_any = bool(truth.blur.any())
        self.blur_sigma_um = float(np.random.default_rng([spec.seed, 5]).uniform(2.0, 4.0))
        # Texture fields, flattened for np.take.
        nuclei, noise, displacement, uneven = _texture(spec.seed)
        self.nuclei, self.noise, self.uneven = nuclei.ravel(), noise.reshape(-1, 3), uneven.ravel()
        reach = max(0, spec.label_px - 1)
        moved = np.clip(np.round(displacement * 0.3 * spec.label_px), -reach, reach)
        self.displacement = moved.reshape(2, -1).astype(np.intp)

    def _grid(self, x0: float, y0: float, width: int, height: int, downsample: float) -> tuple[np.ndarray, ...]:
        """Flat indices of each painted pixel into the truth maps and into the texture pattern.
        (``np.take`` on flat indices gathers several times faster than fancy indexing.)"""
        xs = np.floor(x0 + (np.arange(width) + 0.5) * downsample).astype(np.intp)
        ys = np.floor(y0 + (np.arange(height) + 0.5) * downsample).astype(np.intp)
        pattern = (ys % _PATTERN_PX)[:, None] * _PATTERN_PX + (xs % _PATTERN_PX)[None, :]
        ys_, xs_ = ys[:, None], xs[None, :]
        if downsample <= 1.5:
            ys_ = ys_ + np.take(self.displacement[0], pattern)
            xs_ = xs_ + np.take(self.displacement[1], pattern)
        rows = np.clip(ys_ // self.label_px, 0, self.keys.shape[0] - 1)
        cols = np.clip(xs_ // self.label_px, 0, self.keys.shape[1] - 1)
        return rows * self.keys.shape[1] + cols, pattern

    def _paint_float(self, x0: float, y0: float, width: int, height: int, downsample: float) -> np.ndarray:
        cell, pattern = self._grid(x0, y0, width, height, downsample)
        key = np.take(self.keys, cell)
        t = self.tables
        if downsample <= 1.5:
            nucleus = np.take(self.nuclei, pattern) < np.take(t.density, key)
            rgb = np.take(t.colours, 2 * key + nucleus, axis=0)
            if self.ink_any and (key >= _N_LABELS).any():  # marker ink: its density varies by some 10 %
                uneven = 0.1 * np.take(self.uneven, pattern)
                rgb *= np.exp(np.take(t.log_transmittance, key, axis=0) * uneven[..., None])
            amplitude = np.take(t.amplitude, key)
        else:  # far out, nuclei blur into the mean colour
            rgb = np.take(t.mean, key, axis=0)
            amplitude = np.take(t.amplitude, key) / math.sqrt(downsample)
        rgb += np.take(self.noise, pattern, axis=0) * amplitude[..., None]
        return rgb

    def paint(self, x0: float, y0: float, width: int, height: int, downsample: float) -> np.ndarray:
        """The region's RGB; out-of-focus patches are blurred at full resolution only (further out the
        nuclei are averaged away anyway)."""
        rgb = self._paint_float(x0, y0, width, height, downsample)
        sigma_px = self.blur_sigma_um / (self.mpp * downsample)
        if self.blur_any and downsample <= 1.5 and sigma_px >= 0.5:
            where = np.take(self.blur, self._grid(x0, y0, width, height, downsample)[0])
            if where.any():
                # Paint a margin wide enough for the blur to reach, so neighbouring tiles agree at seams.
                box = _blur_box_px(sigma_px)
                margin = 3 * (box // 2) + 1
                big = self._paint_float(
                    x0 - margin * downsample,
                    y0 - margin * downsample,
                    width + 2 * margin,
                    height + 2 * margin,
                    downsample,
                )
                for _ in range(3):  # three box passes: a Gaussian to within a few per cent, at any sigma's cost
                    big = ndimage.uniform_filter(big, size=(box, box, 1), mode="nearest")
                rgb = np.where(where[..., None], big[margin : margin + height, margin : margin + width], rgb)
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
    """Write a synthetic slide to ``path`` and return it with its truth maps."""
    spec = spec or SyntheticSlideSpec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = make_truth(spec)
    painter = _Painter(truth, spec)
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
    return SyntheticSlide(path=path, spec=spec, labels=truth.labels, ink=truth.ink, folds=truth.folds, blur=truth.blur)
