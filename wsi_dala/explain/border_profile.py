"""Grad-CAM's border attenuation: the mean map over a tile, measured, and divided out.

A CNN's last feature map is systematically weaker at a tile's borders and corners (zero padding, a
receptive field that runs off the tile, ResNet's asymmetric stride-2 padding): on the demo model the
top-left cell of a tumour tile reads 0.16 of the tile's mean and the centre 1.95. Stitched side by
side, tiles print that pattern into the slide's map as a grid of dim corners, and region outlines
follow it. The attenuation belongs to the model, not to the tissue: averaged over many tiles of the
positive class (tumour at every offset), the tissue's own pattern averages out and what is left is the
profile. Dividing each map by it makes a uniformly tumorous area read uniformly.

Pure numpy: the heatmap stitches without torch.
"""

from __future__ import annotations

import numpy as np

# How many of a slide's interior tumour tiles the model card's profile is worth. The card's was measured on
# validation tiles that are tumour for sure, but the attenuation shifts with stain and scanner: on a pale
# slide unlike the training ones, weight 64 left a seam index of 0.94, weight 4 gave 0.98, the slide alone
# 0.99 (benchmarks/heatmap.py). So a slide with a handful of tumour tiles leans on the card; with dozens,
# on itself.
PRIOR_TILES_CARD = 4.0
# Without a card profile, the slide's own estimate from this many tiles on (each tile's relative map varies
# by ~40 % per cell, so 8 tiles pin the profile to ~15 %); flat below. Not a blend with flat: the dimmest
# corner reads ~0.2 of the mean, and mixing in ones biases exactly the cells that need correcting most.
MIN_SLIDE_TILES = 8
MIN_PROFILE = 0.05  # never divide by less: a corner the model does not see at all stays dim, not noise x 20


def profile_sum(cams: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum over tiles of each raw map divided by its own mean, and how many tiles had a map ([g, g], n).

    Sums, so a slide's chunks can be added up before :func:`blend_profile`.
    """
    cams = np.asarray(cams, dtype=np.float64)
    if cams.ndim != 3 or len(cams) == 0:
        return np.zeros(cams.shape[1:] if cams.ndim == 3 else (1, 1)), 0
    means = cams.reshape(len(cams), -1).mean(axis=1)
    usable = np.isfinite(means) & (means > 0)
    relative = cams[usable] / means[usable, None, None]
    return relative.sum(axis=0), int(usable.sum())


def normalised(profile: np.ndarray) -> np.ndarray:
    """Scaled to mean 1 (a flat profile is all ones)."""
    profile = np.asarray(profile, dtype=np.float64)
    mean = float(profile.mean()) if profile.size else 0.0
    return profile / mean if mean > 0 and np.isfinite(mean) else np.ones_like(profile)


def measure_profile(cams: np.ndarray) -> np.ndarray | None:
    """The mean relative map of these tiles (mean 1); None without a single usable map."""
    total, n = profile_sum(cams)
    return normalised(total / n) if n else None


def blend_profile(slide_sum: np.ndarray, n_tiles: int, prior: np.ndarray | None) -> np.ndarray:
    """The slide's estimate shrunk towards the prior (the model card's profile, else flat): a slide with
    few tumour tiles leans on the card, one with hundreds on itself."""
    grid = slide_sum.shape
    total = np.asarray(slide_sum, dtype=np.float64)
    if prior is not None and np.shape(prior) == grid:
        return normalised((total + PRIOR_TILES_CARD * normalised(prior)) / (n_tiles + PRIOR_TILES_CARD))
    return normalised(total / n_tiles) if n_tiles >= MIN_SLIDE_TILES else np.ones(grid)


def symmetrised(profile: np.ndarray, views: str) -> np.ndarray:
    """The profile averaged over the test-time views (``flips``: the two mirrors and the half turn, ``d4``:
    all turns and mirrors): what a card's profile, measured on plain tiles, looks like in CAMs that were
    averaged over those views (wsi_dala.inference.tta maps each view's CAM back into the tile's frame)."""
    profile = np.asarray(profile, dtype=np.float64)
    if views == "flips":
        images = [profile, profile[:, ::-1], profile[::-1, :], profile[::-1, ::-1]]
    elif views == "d4":
        images = [np.rot90(p, k) for p in (profile, profile[:, ::-1]) for k in range(4)]
    else:
        return profile
    return np.mean(images, axis=0)


def correct(cams: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Each map divided by the profile (floored at MIN_PROFILE)."""
    return np.asarray(cams, dtype=np.float64) / np.maximum(profile, MIN_PROFILE)
