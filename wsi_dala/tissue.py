"""Tissue detection on a low-resolution image of the slide.

H&E tissue is saturated pink-to-purple (hue near magenta); glass is bright and grey. Pathologists'
pen ink is saturated too, but green/blue/black, so it is removed by hue and darkness rather than by
saturation. Sizes are in µm² so one setting works at any scan resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from skimage import filters, morphology


@dataclass(frozen=True)
class TissueSettings:
    """How tissue is told from background. Defaults suit H&E on glass."""

    mask_mpp: float = 8.0  # µm/px of the image the mask is computed on
    min_saturation: float = 0.07  # floor under Otsu's saturation threshold (an empty slide has no split)
    max_brightness: float = 0.97  # brighter than this is glass, whatever its saturation
    pen_hue_range: tuple[float, float] = (0.15, 0.65)  # green..blue hues; H&E sits at 0.7..1.0
    dark_ink_value: float = 0.25  # darker than this (HSV value) is ink or dirt, not stain
    min_tissue_area_um2: float = 20_000.0  # smaller pieces are debris
    min_hole_area_um2: float = 10_000.0  # smaller holes inside tissue are filled
    pen_margin_um: float = 12.0  # ink edges blur into neighbours; drop this much around ink

    def to_dict(self) -> dict:
        return asdict(self)


def detect_tissue(rgb: np.ndarray, mpp: float, settings: TissueSettings | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image whose pixels are ``mpp`` µm wide."""
    settings = settings or TissueSettings()
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    hue, saturation, value = _hsv(rgb)
    threshold = settings.min_saturation
    if float(saturation.max() - saturation.min()) > 1e-3:
        threshold = max(threshold, float(filters.threshold_otsu(saturation)))
    stained = (saturation > threshold) & (value < settings.max_brightness)
    pen_low, pen_high = settings.pen_hue_range
    ink = (stained & (hue > pen_low) & (hue < pen_high)) | (value < settings.dark_ink_value)
    margin_px = round(settings.pen_margin_um / mpp)
    if margin_px > 0 and ink.any():
        ink = morphology.dilation(ink, morphology.disk(margin_px))
    tissue = stained & ~ink
    pixel_area_um2 = mpp * mpp
    tissue = morphology.remove_small_holes(tissue, max_size=max(1, int(settings.min_hole_area_um2 / pixel_area_um2)))
    tissue = morphology.remove_small_objects(
        tissue, max_size=max(1, int(settings.min_tissue_area_um2 / pixel_area_um2))
    )
    return tissue & ~ink


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value in [0, 1], float32 (skimage's rgb2hsv works in float64: 4x slower)."""
    rgb = rgb[..., :3].astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    safe = np.where(delta > 0, delta, 1.0)
    saturation = np.where(value > 0, delta / np.where(value > 0, value, 1.0), 0.0)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return hue.astype(np.float32), saturation.astype(np.float32), value
