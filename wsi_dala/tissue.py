"""Tissue, marker ink and tissue folds on a low-resolution image of the slide.

**Glass first.** Every pixel is divided by the slide's own glass colour (the median of its brightest
pixels), so a tinted or dim background reads as white and "stained" means *more saturated than this
slide's glass* rather than a fixed number. The threshold is a floor (``min_saturation``) raised to
a multiple of the glass's own noise (its 95th percentile of saturation); not Otsu's split, which on
real H&E falls between pale and dense stain and drops loose fibrous tissue (measured: 16 % of the
stained area of OpenSlide's CMU-1 crop).

**Ink by colour and shape, not darkness.** Dense haematoxylin (nuclei clusters, epidermis) is as
dark as marker ink, so darkness alone punches holes in tissue. Stain and ink differ in two ways that
survive different scanners and stains:

- *Colour.* H&E absorbs in the red and green channels, so dark stain is also saturated and sits in
  the pink-to-purple hue band. Black and dark-grey marker is a neutral absorber: dark *and*
  unsaturated (a neutral transmittance scales all channels alike, so over tissue it keeps the
  tissue's modest saturation while getting far darker than any stain). Green, blue and cyan marker
  have hues H&E never has; red marker is redder and more saturated than eosin.
- *Shape.* A marker stroke or dot is one large connected patch (hundreds of µm wide, millimetres
  long); ink-coloured stain pixels are specks. Each colour is found by hysteresis: *strong* pixels
  (unambiguous colour) seed a component, *weak* pixels (ink-like, but also seen in stain) extend it,
  and a component is ink only when its strong core covers ``min_ink_area_um2``. So a stroke that
  crosses dense tumour is followed across it, and isolated dark nuclei never are.

Measured on the CMU-1 crop at 8 µm/px, strong ink pixels are 0.01-0.35 % of stained pixels and none
forms a component near the minimum ink area; see ``benchmarks/tissue.py`` for recall and ink left.

**Folds** are two layers of tissue: the same stains at twice the optical density, so the same colour
in optical-density terms (the direction of the OD vector) at twice the magnitude. Each tissue pixel is
compared with the usual density of the slide's tissue *of the same OD colour* (the median over a
25 x 25 grid of chromaticities, pooled within 0.08): a fold candidate is ``fold_od_ratio`` times denser. That tells a
fold from a tumour nest, which is darker because it holds more haematoxylin and so has another OD
colour with its own usual density, and it needs no neighbourhood, so a fold wider than any window is
still found. Candidates must form patches of ``min_fold_area_um2``. The slide is its own reference:
it works when folds are a minority of the tissue of their colour, as they are.

HSV is computed in float32 here (skimage's ``rgb2hsv`` works in float64, 4x slower on a thumbnail).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import morphology

from wsi_dala.config import TissueConfig

GLASS_MAX_CHROMA_8BIT = 40  # the brightest pixels are glass only when nearly grey, else tissue fills the view
CHROMATIC_AREA_DIVISOR = 4  # green-to-blue ink needs only a quarter of ``min_ink_area_um2``


@dataclass(frozen=True)
class TissueAnalysis:
    """What the low-resolution image shows. Masks are bool and share the image's shape."""

    tissue: np.ndarray  # tissue to tile: stained, not ink, debris and specks removed, small holes filled
    ink: np.ndarray  # marker ink, margin included
    fold: np.ndarray  # folded (double-layer) tissue, a subset of ``tissue``
    glass_rgb: tuple[float, float, float]
    saturation_threshold: float


def detect_tissue(rgb: np.ndarray, mpp: float, settings: TissueConfig | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image whose pixels are ``mpp`` µm wide."""
    return analyse_tissue(rgb, mpp, settings).tissue


def analyse_tissue(rgb: np.ndarray, mpp: float, settings: TissueConfig | None = None) -> TissueAnalysis:
    """Tissue, ink and fold masks of an RGB uint8 image whose pixels are ``mpp`` µm wide."""
    settings = settings or TissueConfig()
    shape = rgb.shape[:2]
    if rgb.size == 0:
        empty = np.zeros(shape, dtype=bool)
        return TissueAnalysis(empty, empty, empty, (255.0, 255.0, 255.0), settings.min_saturation)
    glass = glass_colour(rgb)
    relative = np.clip(rgb[..., :3].astype(np.float32) / np.asarray(glass, dtype=np.float32), 0.0, 1.0)
    hue, saturation, value = hsv(relative)
    glass_like = value >= settings.max_brightness
    # The 95th percentile: the glass-like pixels also hold the mixed pixels at tissue edges, a few percent.
    noise = float(np.percentile(saturation[glass_like], 95)) if glass_like.sum() >= 100 else 0.0
    threshold = max(settings.min_saturation, settings.glass_noise_factor * noise)
    stained = (saturation > threshold) & (value < settings.max_brightness)
    pixel_area_um2 = mpp * mpp
    ink = find_ink(hue, saturation, value, pixel_area_um2, settings)
    margin_px = round(settings.ink_margin_um / mpp)
    if margin_px > 0 and ink.any():  # a distance transform: linear time, whatever the margin in pixels
        ink = ndimage.distance_transform_edt(~ink) <= margin_px
    tissue = stained & ~ink  # dark stain is saturated; dark and grey is ink, dirt or a greyscale scan
    tissue = morphology.remove_small_holes(tissue, max_size=max(1, int(settings.min_hole_area_um2 / pixel_area_um2)))
    tissue &= ~ink  # holes that are ink stay holes
    tissue = morphology.remove_small_objects(
        tissue, max_size=max(1, int(settings.min_tissue_area_um2 / pixel_area_um2))
    )
    fold = find_folds(relative, tissue, mpp, settings)
    return TissueAnalysis(
        tissue=tissue,
        ink=ink,
        fold=fold,
        glass_rgb=(float(glass[0]), float(glass[1]), float(glass[2])),
        saturation_threshold=threshold,
    )


def glass_colour(rgb: np.ndarray) -> np.ndarray:
    """The slide's background colour: the median of its brightest percent of pixels (white if dim)."""
    pixels = rgb[..., :3].reshape(-1, 3)
    brightness = np.maximum(np.maximum(pixels[:, 0], pixels[:, 1]), pixels[:, 2])
    top = brightness >= np.percentile(brightness, 99) * 0.97
    glass = np.median(pixels[top], axis=0).astype(np.float32)
    if glass.max() < 150 or glass.max() - glass.min() > GLASS_MAX_CHROMA_8BIT:  # no glass in view, or a dark scan
        return np.full(3, 255.0, dtype=np.float32)
    return np.maximum(glass, 1.0)


def find_ink(
    hue: np.ndarray, saturation: np.ndarray, value: np.ndarray, pixel_area_um2: float, settings: TissueConfig
) -> np.ndarray:
    """Marker ink: per colour family, strong pixels seed components that weak pixels extend."""
    min_core_px = max(1, int(settings.min_ink_area_um2 / pixel_area_um2))
    ink = np.zeros(hue.shape, dtype=bool)
    for family, (strong, weak) in ink_candidates(hue, saturation, value).items():
        # Green to blue is never H&E: a small dot of it is ink. Red and black need a mark's size.
        core_px = max(1, min_core_px // CHROMATIC_AREA_DIVISOR) if family == "chromatic" else min_core_px
        ink |= _hysteresis(strong, weak | strong, core_px)
    return ink


def ink_candidates(
    hue: np.ndarray, saturation: np.ndarray, value: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(strong, weak) pixel masks per ink colour family.

    H&E occupies hues from about 0.70 (blue-purple haematoxylin) through magenta to 0.97 (eosin);
    marker hues lie outside that band, except red, which is told from eosin by saturation.
    """
    reddish = (hue >= 0.96) | (hue <= 0.04)
    return {
        "chromatic": (
            ((hue > 0.15) & (hue < 0.60) & (saturation >= 0.3) & (value >= 0.25))  # green to cyan: never H&E
            | ((hue >= 0.60) & (hue < 0.70) & (saturation >= 0.45) & (value >= 0.45)),  # blue: bright, unlike nuclei
            (hue > 0.10) & (hue < 0.70) & (saturation >= 0.15),
        ),
        "red": (
            reddish & (saturation >= 0.6) & (value >= 0.35),
            ((hue >= 0.94) | (hue <= 0.06)) & (saturation >= 0.45),
        ),
        "neutral": (
            ((value < 0.45) & (saturation < 0.25)) | (value < 0.2),
            ((value < 0.5) & (saturation < 0.35)) | (value < 0.35),
        ),
    }


LARGE_MARK = 4  # a weak component this many times the minimum ink area needs only an eighth of it strong
# (a wide stroke of bluish-black ink over dense tissue is dark, but no darker than the darkest stain in
# places; its size and uniform colour give it away)


def _hysteresis(strong: np.ndarray, weak: np.ndarray, min_core_px: int) -> np.ndarray:
    """Components of ``weak`` with at least ``min_core_px`` strong pixels, or large with a smaller core."""
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(weak.shape, dtype=bool)
    core = np.bincount(labels[strong], minlength=count + 1)
    size = np.bincount(labels.ravel(), minlength=count + 1)
    keep = (core >= min_core_px) | ((size >= LARGE_MARK * min_core_px) & (core >= min_core_px / 8))
    keep[0] = False
    return keep[labels]


FOLD_COLOUR_BINS = 25  # chromaticity bins per axis: 0.04 wide
FOLD_COLOUR_RADIUS = 2  # "the same colour": within 2 bins (0.08), which holds a fold's slight shift in colour
# (the averaging of a thumbnail is not done in optical density) but not a tumour nest's (0.1-0.15 away)
DENSITY_BINS = np.geomspace(0.02, 6.0, 97)  # optical-density sums, for the per-colour medians
MIN_COLOUR_PIXELS = 30  # a colour seen on fewer tissue pixels has no "usual" density to compare with


def find_folds(relative_rgb: np.ndarray, tissue: np.ndarray, mpp: float, settings: TissueConfig) -> np.ndarray:
    """Folded tissue: ``fold_od_ratio`` times the usual optical density of tissue of the same colour."""
    if not tissue.any():
        return np.zeros(tissue.shape, dtype=bool)
    density = -np.log10(np.clip(relative_rgb, 1.0 / 255.0, 1.0))
    density = ndimage.uniform_filter(density, size=(3, 3, 1))  # per-pixel JPEG noise would scatter the colour
    magnitude = density[..., 0] + density[..., 1] + density[..., 2]
    valid = tissue & (magnitude > DENSITY_BINS[0])
    chromaticity = density[..., :2] / np.maximum(magnitude, 1e-6)[..., None]  # red and green shares of the OD
    cell = np.clip((chromaticity * FOLD_COLOUR_BINS).astype(np.int64), 0, FOLD_COLOUR_BINS - 1)
    usual = _usual_density(cell[valid], magnitude[valid])
    reference = usual[cell[..., 0], cell[..., 1]]
    ratio = magnitude / np.where(np.isfinite(reference), reference, np.inf)
    candidate = valid & (ratio >= settings.fold_od_ratio)
    candidate = ndimage.binary_opening(candidate)
    min_px = max(1, int(settings.min_fold_area_um2 / (mpp * mpp)))
    return morphology.remove_small_objects(candidate, max_size=min_px) & tissue


def _usual_density(cells: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
    """Median density of tissue within FOLD_COLOUR_RADIUS of each colour cell (NaN: too few pixels).

    A histogram of densities per colour cell, summed over the neighbouring cells, then read at its middle.
    """
    n = FOLD_COLOUR_BINS
    levels = np.clip(np.searchsorted(DENSITY_BINS, magnitudes) - 1, 0, len(DENSITY_BINS) - 2)
    counts = np.zeros((n, n, len(DENSITY_BINS) - 1), dtype=np.float64)
    np.add.at(counts, (cells[:, 0], cells[:, 1], levels), 1.0)
    disc = morphology.disk(FOLD_COLOUR_RADIUS)[..., None].astype(np.float64)
    counts = ndimage.convolve(counts, disc, mode="constant")
    cumulative = np.cumsum(counts, axis=-1)
    total = cumulative[..., -1]
    middle = np.argmax(cumulative >= total[..., None] / 2, axis=-1)
    centres = np.sqrt(DENSITY_BINS[:-1] * DENSITY_BINS[1:])
    return np.where(total >= MIN_COLOUR_PIXELS, centres[middle], np.nan)


def hsv(rgb01: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value in [0, 1], float32, of an RGB image already scaled to [0, 1]."""
    rgb = rgb01[..., :3].astype(np.float32, copy=False)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.maximum(np.maximum(r, g), b)  # element-wise over 3 planes: far faster than max(axis=-1)
    delta = value - np.minimum(np.minimum(r, g), b)
    safe = np.where(delta > 0, delta, 1.0)
    saturation = np.where(value > 0, delta / np.where(value > 0, value, 1.0), 0.0)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return hue.astype(np.float32), saturation.astype(np.float32), value
