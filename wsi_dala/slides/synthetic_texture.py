"""A second slide generator, painted from real H&E texture, so nothing is tuned to one look.

:mod:`wsi_dala.slides.synthetic` paints flat colours with round nuclei; a stage tuned on it alone can fail on
real tissue (the blur QC once called 37 % of sharp tumour out of focus on another generator). This one
shares none of its appearance and none of its shapes:

- **Texture** is a mosaic of real H&E: the plane is cut into jittered Voronoi cells (about ``cell_px``
  across, edges wavy through a smooth displacement), and each cell shows a patch of a real image —
  the *normal* sources outside tumour, the *tumour* sources inside — turned and mirrored at random.
  Patches are copied pixel for pixel at the slide's µm/px, so nuclei, fibres, fat and lumens keep their
  real sharpness and texture. Tumour sources are shifted towards the normal sources' stain (in optical
  density) by ``stain_match``, so the difference a model learns is mostly texture, not colour.
- **Shapes** are sections of irregular outline (a radius with random harmonics), tumour the upper
  level set of a smooth random field inside the tissue (branching, not elliptical), marker strokes
  thin or wide, dull or bright, faint or dense, in colours of their own (:data:`TEXTURE_MARKERS`).
- **Defocus** patches are the painted texture blurred by a Gaussian of ``blur_sigma_um``.

The file is an Aperio SVS with 240-px JPEG tiles (a common scanner tile size, not the 256 of the
first generator). Truth maps use :mod:`wsi_dala.slides.synthetic`'s label values, so the same checks apply.
The texture images are arguments: the package ships none (the test data and benchmarks pass real
crops, see ``tests/data/README.md``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import building_path
from wsi_dala.slides.synthetic import BACKGROUND, TISSUE, TUMOUR

# Marker inks of this generator: colour over clean glass. Not the first generator's colours.
TEXTURE_MARKERS: dict[str, tuple[float, float, float]] = {
    "dull-red": (176, 84, 96),
    "bright-red": (214, 52, 70),
    "dark-green": (46, 112, 84),
    "navy": (52, 62, 140),
    "black": (48, 46, 52),
}
GLASS_NOISE = 1.5  # grey levels of sensor noise on glass
BAND_ROWS = 480  # level-0 rows painted at once (a multiple of the tile size and of every level step)


@dataclass(frozen=True)
class Texture:
    """A real H&E image at the slide's µm/px and where it holds tissue (patches are taken from there)."""

    name: str
    rgb: np.ndarray = field(repr=False)  # uint8 [h, w, 3]
    tissue: np.ndarray = field(repr=False)  # bool [h, w]


def texture_from_image(name: str, rgb: np.ndarray, image_mpp: float, slide_mpp: float) -> Texture:
    """``rgb`` (uint8, ``image_mpp`` µm/px) resampled to ``slide_mpp`` by area averaging, with its tissue
    (pixels clearly darker or more coloured than its own glass)."""
    from PIL import Image

    rgb = np.ascontiguousarray(np.asarray(rgb)[..., :3], dtype=np.uint8)
    factor = image_mpp / slide_mpp
    if not 0.9 <= factor <= 1.1:
        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        rgb = np.asarray(
            Image.fromarray(rgb).resize(size, Image.Resampling.BOX if factor < 1 else Image.Resampling.LANCZOS)
        )
    level = rgb.astype(np.float32)
    glass = np.percentile(level.reshape(-1, 3), 99.5, axis=0)
    darker = (glass - level).max(axis=-1)
    tissue = ndimage.binary_opening(darker > 25, iterations=2)
    return Texture(name, rgb, tissue)


@dataclass(frozen=True)
class TextureSlideSpec:
    """What to write. Sizes are level-0 pixels; the truth maps have one pixel per ``label_px``."""

    width: int = 6000
    height: int = 4800
    mpp: float = 0.5  # the textures' own µm/px: patches are copied, never rescaled
    seed: int = 0
    pieces: int = 2  # tissue sections on the slide
    tissue_fraction: float = 0.45  # of the slide's area
    tumour_fraction: float = 0.3  # of the tissue
    cell_px: int = 150  # Voronoi cells of the texture mosaic, level-0 pixels across
    stain_match: float = 0.8  # 0: tumour sources keep their own stain; 1: matched to the normal sources
    stain_scale: float = 1.0  # optical density x this (0.7 pale, 1.3 dark): another lab's staining
    markers: tuple[str, ...] = ()  # names from TEXTURE_MARKERS, one stroke each
    faint_markers: bool = False  # strokes at half their ink density (a marker running dry)
    thin_markers: bool = False  # strokes 60-150 µm wide instead of 0.3-0.8 mm
    blur_patches: int = 0
    blur_sigma_um: float = 1.5
    label_px: int = 8
    tile_px: int = 240
    jpeg_quality: int = 85

    def __post_init__(self) -> None:
        if not (480 <= self.width <= 100_000 and 480 <= self.height <= 100_000):
            raise ConfigError(f"slide size {self.width}x{self.height}: each side must be 480 to 100000 pixels")
        unknown = [m for m in self.markers if m not in TEXTURE_MARKERS]
        if unknown:
            raise ConfigError(f"markers {unknown}: choose from {', '.join(TEXTURE_MARKERS)}")
        if BAND_ROWS % self.tile_px or BAND_ROWS % 16 or BAND_ROWS % self.label_px:
            raise ConfigError(f"tile_px {self.tile_px} and label_px {self.label_px} must divide {BAND_ROWS}")


@dataclass
class TextureSlide:
    """The written file and its truth (label values of :mod:`wsi_dala.slides.synthetic`)."""

    path: Path
    spec: TextureSlideSpec
    labels: np.ndarray = field(repr=False)  # uint8 BACKGROUND | TISSUE | TUMOUR per label pixel
    ink: np.ndarray = field(repr=False)  # uint8: 0 none, else 1 + index into spec.markers
    blur: np.ndarray = field(repr=False)  # bool

    @property
    def label_px(self) -> int:
        return self.spec.label_px

    def truth_mask(self, *label_values: int) -> np.ndarray:
        return np.isin(self.labels, label_values)

    def ink_mask(self, *names: str) -> np.ndarray:
        """Where the named markers' ink is (any ink when no names are given)."""
        if not names:
            return self.ink > 0
        return np.isin(self.ink, [1 + self.spec.markers.index(n) for n in names if n in self.spec.markers])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return noise / max(float(noise.std()), 1e-12)


def make_texture_truth(spec: TextureSlideSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, ink and blur maps: sections of irregular outline, branching tumour, strokes, blur patches."""
    rng = np.random.default_rng([spec.seed, 101])
    h, w = math.ceil(spec.height / spec.label_px), math.ceil(spec.width / spec.label_px)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    tissue = np.zeros((h, w), dtype=bool)
    area_each = spec.tissue_fraction * h * w / max(1, spec.pieces)
    for piece in range(spec.pieces):
        # Sections side by side along the long axis, each an irregular blob inside its own box.
        box_h, box_w = (h / spec.pieces, w) if h > w else (h, w / spec.pieces)
        along = (piece + 0.5) / spec.pieces
        cy, cx = (h * along, w * 0.5) if h > w else (h * 0.5, w * along)
        cy += rng.uniform(-0.05, 0.05) * box_h
        cx += rng.uniform(-0.05, 0.05) * box_w
        stretch = rng.uniform(0.8, 1.25)
        fits = 0.36 * min(box_h * stretch, box_w / stretch)  # the wobble below reaches 1.3x the radius
        radius = min(math.sqrt(area_each / math.pi), fits)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = np.ones_like(angle)
        for k in range(2, 7):
            wobble += rng.uniform(0.02, 0.12) / (k / 2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
        distance = np.hypot((yy - cy) * stretch, (xx - cx) / stretch)
        tissue |= distance <= radius * wobble
    margin = max(2, int(0.04 * min(h, w)))
    tissue[:margin], tissue[-margin:], tissue[:, :margin], tissue[:, -margin:] = False, False, False, False
    labels = np.where(tissue, TISSUE, BACKGROUND).astype(np.uint8)
    if spec.tumour_fraction > 0 and tissue.any():
        inner = ndimage.binary_erosion(tissue, iterations=max(1, margin // 2))
        field_ = _smooth_field(rng, (h, w), sigma=max(h, w) / 18)
        candidates = field_[inner]
        if candidates.size:
            level = np.quantile(candidates, 1 - spec.tumour_fraction * tissue.sum() / max(1, inner.sum()))
            tumour = ndimage.binary_opening(inner & (field_ >= level), iterations=2)
            labels[tumour] = TUMOUR
    ink = _draw_strokes(spec, tissue, np.random.default_rng([spec.seed, 102]))
    blur = np.zeros((h, w), dtype=bool)
    brng = np.random.default_rng([spec.seed, 103])
    centres = np.argwhere(ndimage.binary_erosion(tissue, iterations=3))
    for _ in range(spec.blur_patches if len(centres) else 0):
        cy, cx = centres[brng.integers(len(centres))]
        r = brng.uniform(0.5, 1.2) * 1000 / (spec.mpp * spec.label_px)  # 1-2.4 mm across
        r = min(r, 0.2 * min(h, w))
        blur |= np.hypot(yy - cy, xx - cx) <= r * (1 + 0.15 * _smooth_field(brng, (h, w), sigma=r / 3))
    return labels, ink, blur & tissue


def _draw_strokes(spec: TextureSlideSpec, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One smooth stroke per marker, crossing the tissue edge (where pathologists circle or tick)."""
    h, w = tissue.shape
    ink = np.zeros((h, w), dtype=np.uint8)
    edge = np.argwhere(tissue & ~ndimage.binary_erosion(tissue))
    if not len(edge):
        return ink
    per_mm = 1000 / (spec.mpp * spec.label_px)
    for number, _name in enumerate(spec.markers, start=1):
        centre = edge[rng.integers(len(edge))].astype(np.float64)
        length = min(rng.uniform(2.0, 5.0) * per_mm, 0.6 * min(h, w))
        width_mm = rng.uniform(0.06, 0.15) if spec.thin_markers else rng.uniform(0.3, 0.8)
        half = max(0.75, min(width_mm * per_mm / 2, 0.012 * min(h, w)))  # a small slide keeps tissue in view
        angle = rng.uniform(0, np.pi)
        t = np.linspace(-0.5, 0.5, 200)
        bend = rng.uniform(0.05, 0.2) * length * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 6.3))
        ys = centre[0] + t * length * np.sin(angle) + bend * np.cos(angle)
        xs = centre[1] + t * length * np.cos(angle) - bend * np.sin(angle)
        line = np.ones((h, w), dtype=bool)
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        line[ys[inside].astype(int), xs[inside].astype(int)] = False
        if line.all():
            continue
        ink[ndimage.distance_transform_edt(line) <= half] = number
    return ink


@dataclass(frozen=True)
class _Cells:
    """The Voronoi mosaic: per jittered-grid cell, its seed and, per class, a source patch."""

    seeds: np.ndarray  # [gh, gw, 2] (y, x) level-0
    source: np.ndarray  # [2, gh, gw] texture index (0: normal, 1: tumour class)
    centre: np.ndarray  # [2, gh, gw, 2] (y, x) in the source image
    turn: np.ndarray  # [2, gh, gw] 0-7: dihedral transform


def _choose_cells(spec: TextureSlideSpec, classes: Sequence[Sequence[Texture]], rng: np.random.Generator) -> _Cells:
    size = spec.cell_px
    gh, gw = spec.height // size + 2, spec.width // size + 2
    jitter = rng.uniform(0.1, 0.9, (gh, gw, 2))
    seeds = (np.moveaxis(np.mgrid[0:gh, 0:gw], 0, -1) - 1 + jitter) * size
    source = np.zeros((2, gh, gw), dtype=np.int64)
    centre = np.zeros((2, gh, gw, 2), dtype=np.float64)
    reach = int(1.6 * size)  # a pixel is at most this far from its cell's seed
    for k, textures in enumerate(classes):
        valid = []
        for texture in textures:  # patch centres whose neighbourhood is mostly tissue, and inside the image
            share = ndimage.uniform_filter(texture.tissue.astype(np.float32), size=size)
            ok = share >= 0.85
            ok[:reach], ok[-reach:], ok[:, :reach], ok[:, -reach:] = False, False, False, False
            points = np.argwhere(ok)
            if not len(points):  # a small image: its middle, whatever it holds
                points = np.array([[texture.rgb.shape[0] // 2, texture.rgb.shape[1] // 2]])
            valid.append(points)
        source[k] = rng.integers(len(textures), size=(gh, gw))
        for index, points in enumerate(valid):
            chosen = source[k] == index
            centre[k][chosen] = points[rng.integers(len(points), size=int(chosen.sum()))]
    turn = rng.integers(8, size=(2, gh, gw))
    return _Cells(seeds, source, centre, turn)


def _stain_matched(tumour: Sequence[Texture], normal: Sequence[Texture], strength: float) -> list[Texture]:
    """Tumour textures with their tissue's mean optical density moved ``strength`` of the way to the normal
    textures' (per channel, a scale: nuclei stay darker than their surroundings)."""
    if strength <= 0:
        return list(tumour)

    def mean_od(textures: Sequence[Texture]) -> np.ndarray:
        ods = [-np.log(np.maximum(t.rgb[t.tissue].astype(np.float64), 1) / 255) for t in textures if t.tissue.any()]
        return np.concatenate(ods).mean(axis=0) if ods else np.ones(3)

    target = mean_od(normal)
    out = []
    for texture in tumour:
        own = mean_od([texture])
        factor = (target / np.maximum(own, 1e-6)) ** strength
        od = -np.log(np.maximum(texture.rgb.astype(np.float64), 1) / 255) * factor
        rgb = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)
        out.append(Texture(texture.name, rgb, texture.tissue))
    return out


class _TexturePainter:
    def __init__(self, spec: TextureSlideSpec, normal: Sequence[Texture], tumour: Sequence[Texture]):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 104])
        self.classes = [list(normal), _stain_matched(tumour, normal, spec.stain_match)]
        self.cells = _choose_cells(spec, self.classes, rng)
        self.labels, self.ink, self.blur = make_texture_truth(spec)
        self.tissue_field = ndimage.gaussian_filter((self.labels != BACKGROUND).astype(np.float32), 1.0)
        self.tumour_field = ndimage.gaussian_filter((self.labels == TUMOUR).astype(np.float32), 1.0)
        glass = np.percentile(np.concatenate([t.rgb.reshape(-1, 3) for t in normal]), 99.5, axis=0)
        self.glass = np.minimum(glass.astype(np.float32), 250.0)
        self.noise = np.random.default_rng([spec.seed, 105])
        period = 512
        self.warp = np.stack([_smooth_field(rng, (period, period), sigma=12) for _ in range(2)]) * 0.18 * spec.cell_px
        self.edge = np.stack([_smooth_field(rng, (period, period), sigma=6) for _ in range(2)]) * 0.5 * spec.label_px
        self.ink_rgb = np.array([self.glass, *(TEXTURE_MARKERS[m] for m in spec.markers)], dtype=np.float32)
        self.ink_density = -np.log(np.clip(self.ink_rgb / self.glass, 0.02, 1.0)) * (0.5 if spec.faint_markers else 1.0)

    def paint(self, top: int, rows: int) -> np.ndarray:
        """Level-0 rows ``top`` .. ``top + rows`` (all columns), uint8 RGB."""
        spec = self.spec
        ys = np.arange(top, top + rows)[:, None].astype(np.float64)
        xs = np.arange(spec.width)[None, :].astype(np.float64)
        py, px = (ys.astype(np.int64) % 512), (xs.astype(np.int64) % 512)
        # Which label: the truth maps, smoothed and interpolated between label pixels, cut at one half
        # through a small ragged displacement: curved outlines, not label-pixel stairs.
        fy = (ys + self.edge[0][py, px]) / spec.label_px - 0.5
        fx = (xs + self.edge[1][py, px]) / spec.label_px - 0.5
        coords = np.stack(np.broadcast_arrays(fy, fx))
        inside = ndimage.map_coordinates(self.tissue_field, coords, order=1, mode="nearest") >= 0.5
        tumour = ndimage.map_coordinates(self.tumour_field, coords, order=1, mode="nearest") >= 0.5
        label = np.where(inside, np.where(tumour, TUMOUR, TISSUE), BACKGROUND).astype(np.uint8)
        ly = np.clip(np.round(fy).astype(np.int64), 0, self.labels.shape[0] - 1)
        lx = np.clip(np.round(fx).astype(np.int64), 0, self.labels.shape[1] - 1)
        # Which Voronoi cell: the nearest seed of the 3 x 3 grid cells around, through a wavy displacement.
        wy, wx = ys + self.warp[0][py, px], xs + self.warp[1][py, px]
        size = spec.cell_px
        gy, gx = np.floor(wy / size).astype(np.int64) + 1, np.floor(wx / size).astype(np.int64) + 1
        best = np.full(label.shape, np.inf)
        cy = np.zeros(label.shape, dtype=np.int64)
        cx = np.zeros(label.shape, dtype=np.int64)
        gh, gw = self.cells.seeds.shape[:2]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = np.clip(gy + dy, 0, gh - 1), np.clip(gx + dx, 0, gw - 1)
                seed = self.cells.seeds[ny, nx]
                distance = (wy - seed[..., 0]) ** 2 + (wx - seed[..., 1]) ** 2
                closer = distance < best
                best = np.where(closer, distance, best)
                cy, cx = np.where(closer, ny, cy), np.where(closer, nx, cx)
        seed = self.cells.seeds[cy, cx]
        oy = np.broadcast_to(ys - seed[..., 0], label.shape)
        ox = np.broadcast_to(xs - seed[..., 1], label.shape)
        out = np.empty((*label.shape, 3), dtype=np.float32)
        out[:] = self.glass
        for k in (0, 1):
            where = label == (TUMOUR if k else TISSUE)
            if not where.any():
                continue
            turn = self.cells.turn[k][cy[where], cx[where]]
            dy_, dx_ = oy[where], ox[where]
            dy_, dx_ = np.where(turn & 1, dx_, dy_), np.where(turn & 1, dy_, dx_)
            dy_ = np.where(turn & 2, -dy_, dy_)
            dx_ = np.where(turn & 4, -dx_, dx_)
            centre = self.cells.centre[k][cy[where], cx[where]]
            index = self.cells.source[k][cy[where], cx[where]]
            for i, texture in enumerate(self.classes[k]):
                chosen = index == i
                if not chosen.any():
                    continue
                th, tw = texture.rgb.shape[:2]
                sy = np.clip(np.round(centre[chosen, 0] + dy_[chosen]).astype(np.int64), 0, th - 1)
                sx = np.clip(np.round(centre[chosen, 1] + dx_[chosen]).astype(np.int64), 0, tw - 1)
                flat = np.flatnonzero(where)[chosen]
                out.reshape(-1, 3)[flat] = texture.rgb[sy, sx]
        if spec.stain_scale != 1.0:
            stained = label != BACKGROUND
            relative = np.clip(out[stained] / self.glass, 1e-3, 1.0)
            out[stained] = self.glass * relative**spec.stain_scale
        glass = label == BACKGROUND
        out[glass] += self.noise.normal(0, GLASS_NOISE, (int(glass.sum()), 3)).astype(np.float32)
        if self.ink.any():
            ink = self.ink[ly, lx]
            inked = ink > 0
            if inked.any():
                uneven = 1 + 0.1 * self.edge[0][py, px] / max(1.0, 0.5 * spec.label_px)
                density = self.ink_density[ink[inked]] * np.broadcast_to(uneven, label.shape)[inked][:, None]
                out[inked] *= np.exp(-density)
        return np.clip(out, 0, 255)

    def paint_band(self, top: int, rows: int) -> np.ndarray:
        """As :meth:`paint`, with defocus patches blurred (a margin painted so the blur has its neighbours)."""
        band = self.paint(top, rows)
        if self.blur.any():
            ly = np.clip(np.arange(top, top + rows) // self.spec.label_px, 0, self.blur.shape[0] - 1)
            where = np.repeat(self.blur[ly], self.spec.label_px, axis=1)
            where = where[:, : self.spec.width]
            if where.any():
                sigma = self.spec.blur_sigma_um / self.spec.mpp
                margin = int(4 * sigma) + 1
                first, last = max(0, top - margin), min(self.spec.height, top + rows + margin)
                wide = self.paint(first, last - first)
                blurred = ndimage.gaussian_filter(wide, sigma=(sigma, sigma, 0))[top - first : top - first + rows]
                band = np.where(where[..., None], blurred, band)
        return np.clip(np.round(band), 0, 255).astype(np.uint8)


def _tiles(image: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    h, w = image.shape[:2]
    for y in range(0, h, tile_px):
        for x in range(0, w, tile_px):
            tile = np.zeros((tile_px, tile_px, 3), dtype=np.uint8)
            part = image[y : y + tile_px, x : x + tile_px]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_texture_slide(
    path: str | Path, normal: Sequence[Texture], tumour: Sequence[Texture], spec: TextureSlideSpec | None = None
) -> TextureSlide:
    """Paint a slide from the textures and write it as an Aperio SVS (levels at downsample 1, 4, 16)."""
    spec = spec or TextureSlideSpec()
    if not normal or not tumour:
        raise ConfigError("a texture slide needs at least one normal and one tumour texture")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    painter = _TexturePainter(spec, normal, tumour)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        level0 = np.lib.format.open_memmap(
            Path(scratch) / "level0.npy", mode="w+", dtype=np.uint8, shape=(spec.height, spec.width, 3)
        )
        for top in range(0, spec.height, BAND_ROWS):
            rows = min(BAND_ROWS, spec.height - top)
            level0[top : top + rows] = painter.paint_band(top, rows)
        write_aperio_svs(path, level0, spec.mpp, spec.tile_px, spec.jpeg_quality, scanner="TEXTURE")
        del level0
    return TextureSlide(path=path, spec=spec, labels=painter.labels, ink=painter.ink, blur=painter.blur)


def write_aperio_svs(
    path: str | Path, level0: np.ndarray, mpp: float, tile_px: int = 240, quality: int = 85, scanner: str = "ARRAY"
) -> Path:
    """An RGB image [H, W, 3] uint8 (an array or a memory map) as an Aperio SVS with levels at downsample 4^k
    and a thumbnail, as scanners write it (written under a temporary name, then renamed)."""
    path = Path(path)
    height, width = level0.shape[:2]
    levels = [level0]
    while max(levels[-1].shape[:2]) // 4 >= 1024:
        levels.append(_reduce(levels[-1], 4))
    common = dict(
        dtype=np.uint8,
        tile=(tile_px, tile_px),
        compression="jpeg",
        compressionargs={"level": quality},
        photometric="rgb",
        metadata=None,
    )
    tmp = building_path(path)
    head = f"Aperio Image Library v12.0.16 \r\n{width}x{height} [0,0 {width}x{height}]"
    fields_ = f"|AppMag = {10 / mpp:g}|ScanScope ID = {scanner}|MPP = {mpp:.4f}"
    with tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31 // 3) as tif:
        for index, level in enumerate(levels):
            h, w = level.shape[:2]
            description = f"{head} ({tile_px}x{tile_px}) JPEG/RGB Q={quality}{fields_}"
            if index:
                description = f"{head} -> {w}x{h} - {fields_}"
            tif.write(_tiles(level, tile_px), shape=(h, w, 3), description=description, **common)
            if index == 0:
                thumb = _reduce(levels[0], max(1, max(width, height) // 768))
                tif.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    metadata=None,
                    description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - |thumbnail",
                )
    tmp.replace(path)
    return path


def load_textures(manifest: str | Path, slide_mpp: float = 0.5) -> dict[str, list[Texture]]:
    """The textures a manifest lists (``{"textures": [{"file", "class": normal|tumour, "mpp"}]}``, files
    relative to it: PNG/JPEG, or a slide read whole at level 0), each at ``slide_mpp``, by class."""
    import json

    from PIL import Image

    from wsi_dala.slides.reader import Slide

    manifest = Path(manifest)
    try:
        entries = json.loads(manifest.read_text())["textures"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{manifest}: not a texture manifest ({exc})") from exc
    out: dict[str, list[Texture]] = {"normal": [], "tumour": []}
    for entry in entries:
        path = manifest.parent / entry["file"]
        if entry.get("class") not in out:
            raise ConfigError(f"{manifest}: {entry['file']}: class must be normal or tumour")
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff") and path.suffix.lower() != ".svs":
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        else:
            with Slide(path) as slide:
                rgb = slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
        out[entry["class"]].append(texture_from_image(path.stem, rgb, float(entry["mpp"]), slide_mpp))
    return out
