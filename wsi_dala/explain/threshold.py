"""DT Grad-CAM's dynamic threshold: τ from each map's own distribution.

Pure numpy (no torch), because the QuPath export measures the thresholded area of every stored map
without running a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
from skimage.filters import threshold_otsu

from wsi_dala.core.config import ThresholdMethod

THRESHOLD_METHODS: tuple[str, ...] = get_args(ThresholdMethod)


@dataclass(frozen=True)
class CamSettings:
    """How the dynamic threshold is chosen from each map's own distribution."""

    method: str = "mean_std"  # τ = mean + k·std | Otsu | the p-th percentile
    k: float = 1.0
    percentile: float = 80.0

    def __post_init__(self) -> None:
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"CAM threshold method must be one of {THRESHOLD_METHODS}, got {self.method!r}")


def dynamic_threshold(cam: np.ndarray, settings: CamSettings) -> float:
    """τ from the map's own distribution, clipped so a non-zero map never comes out empty."""
    values = cam.ravel()
    if settings.method == "mean_std":
        tau = float(values.mean() + settings.k * values.std())
    elif settings.method == "otsu":
        tau = float(threshold_otsu(values)) if np.ptp(values) > 0 else float(values.max())
    else:
        tau = float(np.percentile(values, settings.percentile))
    return min(tau, float(values.max()))
