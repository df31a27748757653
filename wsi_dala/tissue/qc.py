"""Quality control per tile: out of focus, folded, inked.

**Blur is the width of the tile's own edges**, in µm, so it tells defocus from texture. Defocus
widens every edge; texture changes how many edges there are and how strong, not how wide each is. The
measure (after Hu and de Haan, "Low cost robust blur estimator", ICIP 2006, with Gaussian derivatives
in place of their re-blurred differences): a step edge blurred by σ has, after smoothing by s, a peak
gradient A / √(2π(σ² + s²)). The ratio R of the peaks at two smoothings s₁ < s₂ cancels the
contrast A and gives σ² = (s₂² − R² s₁²) / (R² − 1). It is read on *edge pixels* only — local maxima
of the gradient across the edge (non-maximum suppression), at least ``MIN_GRADIENT`` grey levels a
pixel, so sensor noise and flat stain are not measured — and summarised per part of the tile by the
median (a tile half out of focus is found part by part; the mean over a tile is ruled by its sharp
half). Close pairs of edges (a thin fibre, a small nucleus) read a little *sharper* than they are,
never blurrier, so dense tumour, lymphocytes, fat septa and stroma alike read near 0 when in focus.

The verdict is absolute: a part is out of focus when its edges are wider than ``max_edge_blur_um``
(σ, µm); a tile is flagged when at least ``max_blur_fraction`` of the parts that could be judged are.
No slide median: a tumour nest whose texture differs from the rest of the slide is not "blurred" for
being different (the last release's rule flagged 37 % of sharp tumour on a slide of another
generator). A part of *tissue* with fewer than ``MIN_EDGE_PIXELS`` edge pixels reads as out of focus
(+inf): in focus, no part of tissue of any of the benchmark's kinds lacked edges (fat and pale stroma
included), while a defocus of σ = 4 µm washes them out of 19-100 % of parts. A part that is mostly glass
(a lumen, a fat vacuole, the section's edge) is *not judged* (NaN); a tile none of whose parts is judged
is counted as such, never as a pass.

Measured by ``benchmarks/qc.py`` (tables in ``docs/quality.md``) on real H&E of six sources (CMU-1 skin;
TCGA carcinoma, lung and level-0 tiles of fat and mixed tissue; HistoQC's four templates; torchstain's pair)
and on both generators, 19 kinds, at 0.5 µm/px with sensor noise and JPEG: no tile in focus flagged, every
tile blurred by σ ≥ 1 µm (2 px, Gaussian) or a disk of radius ≥ 1.5 µm flagged, in every kind. At 0.25 µm/px
(40x) in-focus edges reach about 0.38 µm, so the threshold is in µm, not pixels. A tile at a coarse µm/px
cannot show blur finer than about a pixel: at 1 µm/px a 1 µm blur reads as sharp, as it does to a model
working at that resolution. The edge threshold rises with the tile's own noise (Immerkær's estimate, capped
at 4 grey levels: dense fine texture reads as noise too), and a part needs a few strong edges, so the noise
of a heavily defocused tile on a noisy scanner is not read as sharp edges.

**Folds and ink** come from the low-resolution masks (:mod:`wsi_dala.tissue.detect`): the fraction of each
tile they cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsi_dala.core.config import QCConfig

BLUR, FOLD, INK = 1, 2, 4  # bits of the per-tile flags
SMOOTHING_UM = (0.4, 0.6)  # the two Gaussian smoothings compared, in µm: the same physical scales at every µm/px
MIN_SMOOTHING_PX = (0.8, 1.2)  # ... but never finer than this in pixels (a narrower kernel is badly sampled)
MIN_GRADIENT_PER_UM = 6.0  # grey levels a µm (green channel, after the finer smoothing): an edge, not noise
MAX_NOISE_GREY = np.float32(4.0)  # the noise estimate is capped here: dense fine texture reads as noise too
NOISE_MARGIN = np.float32(2.0)  # ... and at least this many times the tile's own noise SD (a noisy scan's noise
# ridges reach 1.2 SD at the 99th percentile after the finer smoothing; counted as edges they read as sharp)
MIN_EDGE_PIXELS = 12  # a part with fewer edge pixels is not judged
STRONG_EDGE = np.float32(2.0)  # ... nor one whose edges are all weaker than this many times the threshold
MIN_STRONG_PIXELS = 4  # (under heavy defocus a noisy scan's only "edges" are noise, just above the threshold)
QC_PARTS = 4  # each tile is judged in QC_PARTS x QC_PARTS parts (the store keeps each part's edge blur)
BLOCKS = QC_PARTS
MIN_BLOCK_PX = 24  # ... each at least this many pixels a side (a smaller tile is judged in fewer parts)
BORDER_PX = 3  # edge pixels this close to the tile's border are not used (the filters see padding there)
NO_RATIO_SIGMA_PX = 10.0  # an edge whose two peaks are equal is as wide as can be measured
GLASS_SHARE = 0.92  # a pixel brighter (green channel) than this share of the glass is glass
MIN_GLASS_SHARE = 0.5  # a part without edges and at least this much glass is glass, not judged


def tile_edge_blur_um(tiles: np.ndarray, tile_mpp: float, glass_green: float = 245.0) -> np.ndarray:
    """Edge blur σ (µm) per part of each tile of a uint8 batch [n, T, T, 3] at ``tile_mpp``: [n, b, b]
    float32, about 0 in focus; +inf where a part of tissue has no edge at all (defocus has washed them out);
    NaN where the part is mostly glass (brighter than GLASS_SHARE of ``glass_green``). Vectorised."""
    n = len(tiles)
    if n == 0:
        return np.zeros((0, 1, 1), dtype=np.float32)
    green = tiles[..., 1].astype(np.float32)  # haematoxylin and eosin both absorb green: most of the contrast
    s1, s2 = (max(low, um / tile_mpp) for um, low in zip(SMOOTHING_UM, MIN_SMOOTHING_PX, strict=True))
    fine, fine_y, fine_x = _gradient(green, s1)
    coarse = _gradient(green, s2)[0]
    noise = np.minimum(noise_sigma(green), MAX_NOISE_GREY)  # fine texture reads as noise; scanners stay below
    floor = np.maximum(np.float32(MIN_GRADIENT_PER_UM * tile_mpp), NOISE_MARGIN * noise)
    edges = _ridges(fine, fine_y, fine_x) & (fine >= floor[:, None, None])
    del fine_y, fine_x
    edges[:, :BORDER_PX] = edges[:, -BORDER_PX:] = False
    edges[:, :, :BORDER_PX] = edges[:, :, -BORDER_PX:] = False
    ratio2 = (fine / np.maximum(coarse, 1e-6)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = np.where(ratio2 > 1.0, (s2**2 - ratio2 * s1**2) / (ratio2 - 1.0), NO_RATIO_SIGMA_PX**2)
    sigma2 = np.clip(sigma2, 0.0, NO_RATIO_SIGMA_PX**2).astype(np.float32)
    sigma2[~edges] = np.nan
    blocks = max(1, min(BLOCKS, green.shape[1] // MIN_BLOCK_PX))
    per_part = _parts(sigma2, blocks)  # [n, b, b, pixels of a part]
    count = np.isfinite(per_part).sum(axis=-1)
    strong = _parts((edges & (fine >= STRONG_EDGE * floor[:, None, None])).astype(np.float32), blocks).sum(-1)
    median = np.full(count.shape, np.inf, dtype=np.float32)  # tissue without edges: as wide as can be
    judged = (count >= MIN_EDGE_PIXELS) & (strong >= MIN_STRONG_PIXELS)
    if judged.any():
        median[judged] = finite_median(per_part[judged], count[judged])
    glass = _parts((green >= np.float32(GLASS_SHARE * glass_green)).astype(np.float32), blocks).mean(axis=-1)
    median[(glass >= MIN_GLASS_SHARE) & ~judged] = np.nan  # mostly glass (a lumen, fat, the slide's edge)
    return (np.sqrt(median) * np.float32(tile_mpp)).astype(np.float32)


def noise_sigma(images: np.ndarray) -> np.ndarray:
    """Each image's sensor noise (grey levels, SD), by Immerkær's estimator ("Fast noise variance
    estimation", 1996): the mean absolute response to a mask that cancels flat and linear image content.
    Texture raises it a little (edges, not much): the edge threshold then rises with it, which only ever
    leaves fewer edges to judge."""
    # The mask [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] is the outer product of [1, -2, 1] with itself: second
    # differences across, then down, on the interior (no border pixel is used). On whole grey levels every
    # sum is exact in float32, so this equals the 2-D convolution bit for bit, at a third of its time.
    across = images[:, :, :-2] - 2 * images[:, :, 1:-1] + images[:, :, 2:]
    response = across[:, :-2] - 2 * across[:, 1:-1] + across[:, 2:]
    return (np.sqrt(np.pi / 2) / 6 * np.abs(response).mean(axis=(1, 2))).astype(np.float32)


def finite_median(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of each row's ``counts`` finite values (the rest NaN): ``np.nanmedian(values, axis=-1)``, to
    the bit (the mean of the two middle values in float32), without its Python loop over rows."""
    ordered = np.sort(values, axis=-1)  # NaN sorts last
    rows = np.arange(len(values))
    low, high = ordered[rows, (counts - 1) // 2], ordered[rows, counts // 2]
    return ((low + high) / np.float32(2)).astype(values.dtype)


def _gradient(images: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient magnitude and its y, x components of each image, at Gaussian scale ``sigma`` (pixels)."""
    gy = ndimage.gaussian_filter(images, (0, sigma, sigma), order=(0, 1, 0), mode="nearest", truncate=3.0)
    gx = ndimage.gaussian_filter(images, (0, sigma, sigma), order=(0, 0, 1), mode="nearest", truncate=3.0)
    return np.hypot(gy, gx), gy, gx


TAN_22_5 = np.float32(np.tan(np.pi / 8))


def _ridges(magnitude: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Pixels whose gradient is a maximum across the edge (non-maximum suppression in 4 directions, the
    direction binned by comparing |gx| and |gy|: no arctangent)."""
    padded = np.pad(magnitude, ((0, 0), (1, 1), (1, 1)))
    centre = padded[:, 1:-1, 1:-1]
    ax, ay = np.abs(gx), np.abs(gy)
    across_x = ay <= TAN_22_5 * ax  # the edge runs along y: compare left and right
    across_y = ax <= TAN_22_5 * ay
    diagonal = ~(across_x | across_y)
    same_sign = (gx * gy) > 0
    ridge = across_x & (centre >= padded[:, 1:-1, 2:]) & (centre > padded[:, 1:-1, :-2])
    ridge |= across_y & (centre >= padded[:, 2:, 1:-1]) & (centre > padded[:, :-2, 1:-1])
    falling = diagonal & same_sign  # gradient towards +x +y (rows grow downwards)
    ridge |= falling & (centre >= padded[:, 2:, 2:]) & (centre > padded[:, :-2, :-2])
    rising = diagonal & ~same_sign
    ridge |= rising & (centre >= padded[:, 2:, :-2]) & (centre > padded[:, :-2, 2:])
    return ridge


def _parts(images: np.ndarray, blocks: int) -> np.ndarray:
    """[n, h, w] -> [n, blocks, blocks, part pixels] (the last pixels of an uneven side go to no part)."""
    n, h, w = images.shape
    bh, bw = h // blocks, w // blocks
    trimmed = images[:, : bh * blocks, : bw * blocks].reshape(n, blocks, bh, blocks, bw)
    return trimmed.transpose(0, 1, 3, 2, 4).reshape(n, blocks, blocks, bh * bw)


@dataclass(frozen=True)
class QCResult:
    """Per-tile QC of one slide."""

    blur: np.ndarray  # [N] share of the tile's judged parts that are out of focus, in [0, 1] (0: none judged)
    flags: np.ndarray  # [N] uint8, bits BLUR | FOLD | INK
    judged: np.ndarray  # [N] bool: at least one part of the tile had edges enough to judge its focus
    median_edge_blur_um: float  # over the judged parts of the slide (NaN: none)


def judge(edge_blur_um: np.ndarray, fold_fraction: np.ndarray, ink_fraction: np.ndarray, config: QCConfig) -> QCResult:
    """Flag each tile from its measurements: blur part by part against an absolute edge width.

    ``edge_blur_um`` is [N, b, b] (+inf: tissue without edges, out of focus; NaN: glass, or not measured).
    """
    n = len(edge_blur_um)
    parts = edge_blur_um.reshape(n, int(np.prod(edge_blur_um.shape[1:])))
    judged = ~np.isnan(parts)  # +inf (tissue without edges) is judged: out of focus
    judged_parts = judged.sum(axis=1)
    with np.errstate(invalid="ignore"):
        blurred_parts = (parts > config.max_edge_blur_um).sum(axis=1)
    blur = np.where(judged_parts > 0, blurred_parts / np.maximum(judged_parts, 1), 0.0).astype(np.float32)
    flags = np.zeros(n, dtype=np.uint8)
    flags[(judged_parts > 0) & (blur >= config.max_blur_fraction)] |= BLUR
    flags[fold_fraction > config.max_fold_fraction] |= FOLD
    flags[ink_fraction > config.max_ink_fraction] |= INK
    measured = np.isfinite(parts)
    median = float(np.median(parts[measured])) if measured.any() else float("nan")
    return QCResult(blur=blur, flags=flags, judged=judged_parts > 0, median_edge_blur_um=median)
