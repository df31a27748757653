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

Three additions hold real marker ink that flat-colour markers never showed: *red* is found at a dull
marker's saturation (0.45, not 0.6), its weak band begins at hue 0.95 (eosin-rich stroma sits at 0.94) and
its core must be a patch, not scattered red blood cells; a *faint* green-to-blue or red component twice the
minimum ink area is ink even without a strong core (a marker running dry over glass); and *purple-black*
marker, as saturated as haematoxylin, extends neutral ink where it is dark (value < 0.5) and 2.2x the
slide's usual optical density. Where a faint stroke crosses tissue its colour is that of eosin-rich tissue
and it stays in the mask (QC flags the tiles next to its visible part).

**Pale tissue.** The stain threshold is raised above the glass's own noise, but never above 3 x 0.025:
in a view with little or no glass the "glass-like" pixels are fat and loose stroma, whose saturation
(0.12-0.27) would otherwise drop every pale tissue (a crop of fat and tumour kept 62 % of its tissue).

Measured (``benchmarks/tissue.py``): on a TCGA diagnostic-slide thumbnail with red, green and purple-black
marker rings, ink left in the tissue mask red 2.5 %, green 1.1 %, purple-black 2.6 % (before: 3.1, 1.4,
21.5), stained tissue kept 98.6 % with its pale fragment; a TCGA crop of fat and tumour under red ink, red
left 0.6 %, tissue kept 95.4 % (before 7.2 %, 62 %). On the CMU-1 crop at 8 µm/px, strong ink pixels are
0.01-0.35 % of stained pixels and none forms a component near the minimum ink area.

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

from wsi_dala.core.config import TissueConfig

GLASS_MAX_CHROMA_8BIT = 40  # the brightest pixels are glass only when nearly grey, else tissue fills the view
GLASS_MAX_STAIN_CHROMA_8BIT = 16  # ... and a tint in H&E's own hues (pink to purple) is pale tissue, not glass:
# real glass reads 1-6 grey levels of chroma, a yellowish scan 32, the brightest pixels of a pink crop 32
MAX_GLASS_NOISE = 0.025  # glass's own saturation noise (95th percentile) is at most this: real glass reads
# 0.000-0.017; more means the "glass-like" pixels are pale tissue (fat, loose stroma: 0.12-0.27), whose
# saturation would otherwise raise the stain threshold above every pale tissue on the slide
FAINT_MARK = 2  # a green-to-blue or red component of this many minimum ink areas is ink even without a strong
# core: a marker running dry, or a light stroke over glass (H&E has no such hue in patches that large)
DARKER_THAN_TISSUE = 2.2  # a dark, unsaturated stroke this many times the slide's usual optical density
# extends neutral ink: purple-black marker is as saturated as haematoxylin but 3-9x darker than the tissue
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
    noise = min(noise, MAX_GLASS_NOISE)  # more is pale tissue, not glass (a view with little or no glass)
    threshold = max(settings.min_saturation, settings.glass_noise_factor * noise)
    stained = (saturation > threshold) & (value < settings.max_brightness)
    pixel_area_um2 = mpp * mpp
    darkness = relative_darkness(relative, stained)
    ink = find_ink(hue, saturation, value, pixel_area_um2, settings, darkness)
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
    chroma = float(glass.max() - glass.min())
    hue = float(hsv(glass[None, None] / 255.0)[0][0, 0])
    stain_tint = chroma > GLASS_MAX_STAIN_CHROMA_8BIT and (hue >= 0.7 or hue <= 0.02)  # pink to purple: tissue
    if glass.max() < 150 or chroma > GLASS_MAX_CHROMA_8BIT or stain_tint:  # no glass in view, or a dark scan
        return np.full(3, 255.0, dtype=np.float32)
    return np.maximum(glass, 1.0)


def relative_darkness(relative_rgb: np.ndarray, stained: np.ndarray) -> np.ndarray:
    """Each pixel's optical density (sum over channels) over the median of the slide's stained pixels."""
    density = -np.log10(np.clip(relative_rgb, 1.0 / 255.0, 1.0)).sum(axis=-1)
    usual = float(np.median(density[stained])) if stained.sum() >= 100 else 0.0
    return density / usual if usual > 0 else np.zeros_like(density)


def find_ink(
    hue: np.ndarray,
    saturation: np.ndarray,
    value: np.ndarray,
    pixel_area_um2: float,
    settings: TissueConfig,
    darkness: np.ndarray | None = None,
) -> np.ndarray:
    """Marker ink: per colour family, strong pixels seed components that weak pixels extend."""
    min_core_px = max(1, int(settings.min_ink_area_um2 / pixel_area_um2))
    ink = np.zeros(hue.shape, dtype=bool)
    for family, (strong, weak) in ink_candidates(hue, saturation, value, darkness).items():
        # Green to blue is never H&E: a small dot of it is ink. Red needs half a mark's size, black a mark's.
        core_px = max(1, min_core_px // {"chromatic": CHROMATIC_AREA_DIVISOR, "red": 2}.get(family, 1))
        faint = FAINT_MARK * min_core_px if family in ("chromatic", "red") else None
        ink |= _hysteresis(strong, weak | strong, core_px, faint)
    return ink


def ink_candidates(
    hue: np.ndarray, saturation: np.ndarray, value: np.ndarray, darkness: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(strong, weak) pixel masks per ink colour family.

    H&E occupies hues from about 0.70 (blue-purple haematoxylin) through magenta to 0.97 (eosin);
    marker hues lie outside that band, except red, which is told from eosin by hue (0.95 and up; eosin-rich
    stroma reads 0.94 at its median) and saturation. ``darkness``: :func:`relative_darkness` (None: not used).
    """
    far_darker = darkness >= DARKER_THAN_TISSUE if darkness is not None else np.zeros(hue.shape, dtype=bool)
    return {
        "chromatic": (
            ((hue > 0.15) & (hue < 0.60) & (saturation >= 0.3) & (value >= 0.25))  # green to cyan: never H&E
            | ((hue >= 0.60) & (hue < 0.70) & (saturation >= 0.45) & (value >= 0.45)),  # blue: bright, unlike nuclei
            (hue > 0.10) & (hue < 0.70) & (saturation >= 0.15),
        ),
        "red": (
            # a dull red marker reads 0.5 saturation; isolated pixels (red blood cells) are opened away, so a
            # core is a patch, and eosin-rich stroma (hue 0.94 at the median) never joins through the weak band
            ndimage.binary_opening(((hue >= 0.96) | (hue <= 0.03)) & (saturation >= 0.45) & (value >= 0.3)),
            ((hue >= 0.95) | (hue <= 0.05)) & (saturation >= 0.15),
        ),
        "neutral": (
            ((value < 0.45) & (saturation < 0.25)) | (value < 0.2),
            ((value < 0.5) & (saturation < 0.35)) | (value < 0.35) | (far_darker & (saturation < 0.6) & (value < 0.5)),
        ),
    }


LARGE_MARK = 4  # a weak component this many times the minimum ink area needs only an eighth of it strong
# (a wide stroke of bluish-black ink over dense tissue is dark, but no darker than the darkest stain in
# places; its size and uniform colour give it away)


def _hysteresis(strong: np.ndarray, weak: np.ndarray, min_core_px: int, faint_px: int | None = None) -> np.ndarray:
    """Components of ``weak`` with at least ``min_core_px`` strong pixels, or large with a smaller core, or
    (``faint_px``) of that many weak pixels without any core: a faint stroke of a colour stain never has."""
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(weak.shape, dtype=bool)
    core = np.bincount(labels[strong], minlength=count + 1)
    size = np.bincount(labels.ravel(), minlength=count + 1)
    keep = (core >= min_core_px) | ((size >= LARGE_MARK * min_core_px) & (core >= min_core_px / 8))
    if faint_px is not None:
        keep |= size >= faint_px
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
