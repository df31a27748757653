"""Tissue detection against the planted truth of generated slides."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from wsi_dala.slide import Slide
from wsi_dala.synthetic import BLACK_INK, BLUE_PEN, DEBRIS, GREEN_PEN, TISSUE, TUMOUR
from wsi_dala.tissue import detect_tissue


def _truth_at(mask_shape, labels, *values):
    truth = np.isin(labels, values)
    return np.asarray(Image.fromarray(truth).resize(mask_shape[::-1], Image.Resampling.NEAREST))


def test_finds_planted_tissue_and_excludes_pen_and_glass(svs_025):
    with Slide(svs_025.path) as slide:
        thumbnail, downsample = slide.read_downsampled(8.0)
    mask = detect_tissue(thumbnail, 0.25 * downsample)
    tissue = _truth_at(mask.shape, svs_025.labels, TISSUE, TUMOUR)
    ink = _truth_at(mask.shape, svs_025.labels, GREEN_PEN, BLUE_PEN, BLACK_INK, DEBRIS)
    assert ink.any(), "the generated slide must carry pen marks for this test to mean something"
    recall = (mask & tissue).sum() / tissue.sum()
    assert recall >= 0.95
    assert (mask & ink).sum() == 0
    glass = ~tissue & ~ndimage.binary_dilation(tissue | ink, iterations=2)
    assert (mask & glass).sum() / glass.sum() < 0.005


def test_blank_glass_has_no_tissue(blank_slide):
    with Slide(blank_slide.path) as slide:
        thumbnail, downsample = slide.read_downsampled(8.0)
    assert not detect_tissue(thumbnail, 0.25 * downsample).any()


def test_small_debris_removed_by_physical_area():
    rgb = np.full((200, 200, 3), 243, dtype=np.uint8)
    rgb[50:150, 50:150] = (220, 150, 200)  # 100 x 100 px at 8 µm = 0.64 mm²: tissue
    rgb[10:13, 10:13] = (200, 140, 190)  # 3 x 3 px = 576 µm²: debris
    mask = detect_tissue(rgb, 8.0)
    assert mask[100, 100] and mask[50:150, 50:150].mean() > 0.99
    assert not mask[10:13, 10:13].any()
