"""Quality control per tile: blur measured on real H&E, flags against planted truth, what each mode does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsi_dala.config import QCConfig, TilingConfig
from wsi_dala.grid import tissue_fractions
from wsi_dala.qc import BLUR, FOLD, INK, judge, tile_sharpness
from wsi_dala.slide import Slide
from wsi_dala.store import TileStore
from wsi_dala.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling import tile_slide

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
TILING = dict(mpp=0.5, tile_size_px=224, chunk_tiles=16)


@pytest.fixture(scope="module")
def cmu_tiles() -> np.ndarray:
    """224-px tiles of the real CMU-1 crop, at its 0.5 µm/px, that are mostly tissue."""
    with Slide(CMU) as slide:
        width, height = slide.info.width, slide.info.height
        image = slide.read_region(0, 0, 0, width, height)
    tiles = [
        image[y : y + 224, x : x + 224]
        for y in range(0, height - 224, 224)
        for x in range(0, width - 224, 224)
        if (image[y : y + 224, x : x + 224, 1] < 215).mean() > 0.8
    ]
    assert len(tiles) >= 15
    return np.stack(tiles)


def _jpeg_like(tiles: np.ndarray, sigma_px: float, seed: int = 0) -> np.ndarray:
    """Blurred (Gaussian, sigma in pixels), then sensor noise and 8 bits, as a scanner would write it."""
    out = tiles.astype(np.float32)
    if sigma_px:
        out = ndimage.gaussian_filter(out, (0, sigma_px, sigma_px, 0))
    out += np.random.default_rng(seed).normal(0, 3, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def test_sharpness_separates_real_tissue_in_focus_from_blurred(cmu_tiles):
    sharp = np.nanmedian(tile_sharpness(_jpeg_like(cmu_tiles, 0), 0.5), axis=(1, 2))
    blurred = np.nanmedian(tile_sharpness(_jpeg_like(cmu_tiles, 4.0), 0.5), axis=(1, 2))  # σ = 2 µm
    assert np.percentile(sharp, 5) > 0.6
    assert np.percentile(blurred, 95) < 0.5 * np.median(sharp)


def test_sharpness_does_not_depend_on_contrast(cmu_tiles):
    """A pale slide is not a blurred slide: halving the stain's contrast keeps the sharpness."""
    tiles = _jpeg_like(cmu_tiles, 0).astype(np.float32)
    pale = (255 - (255 - tiles) * 0.5).astype(np.uint8)
    ratio = np.nanmedian(tile_sharpness(pale, 0.5)) / np.nanmedian(tile_sharpness(tiles.astype(np.uint8), 0.5))
    assert 0.8 < ratio < 1.25


def test_judge_flags_parts_against_the_slide_and_an_absolute_floor():
    config = QCConfig()
    sharpness = np.ones((6, 4, 4), dtype=np.float32)
    sharpness[1] = 0.3  # all out of focus
    sharpness[2, :2] = 0.3  # half out of focus: flagged (max_blur_fraction 0.5)
    sharpness[3, :1] = 0.3  # a quarter: not flagged
    sharpness[4] = np.nan  # all glass: not judged
    fold = np.array([0, 0, 0, 0, 0, 0.4], dtype=np.float32)
    ink = np.array([0.2, 0, 0, 0, 0, 0], dtype=np.float32)
    result = judge(sharpness, fold, ink, config)
    assert list(result.flags) == [INK, BLUR, BLUR, 0, 0, FOLD]
    assert result.blur[2] == pytest.approx(0.5) and result.blur[3] == pytest.approx(0.25)
    everywhere = judge(np.full((5, 4, 4), 0.1, dtype=np.float32), np.zeros(5), np.zeros(5), config)
    assert (everywhere.flags & BLUR).all(), "a slide blurred everywhere is caught by the floor"
    empty = judge(np.zeros((0, 4, 4), dtype=np.float32), np.zeros(0), np.zeros(0), config)
    assert empty.flags.shape == (0,)


@pytest.fixture(scope="module")
def flawed_slide(tmp_path_factory):
    spec = SyntheticSlideSpec(
        width=8192, height=6144, mpp=0.5, seed=3, markers=("black", "green"), folds=2, blur_patches=1
    )
    return write_synthetic_slide(tmp_path_factory.mktemp("flawed") / "flawed.svs", spec)


def test_tiles_flagged_where_truth_says(flawed_slide, tmp_path):
    result = tile_slide(flawed_slide.path, tmp_path, TilingConfig(**TILING), progress=False)
    store = TileStore(result.store)
    flags, coords, side = store.qc_flags(), store.coords(), store.info.tile_size_l0
    label_px = float(flawed_slide.label_px)  # truth pixels, in level-0 pixels
    inked = tissue_fractions(flawed_slide.ink_mask(), label_px, coords, side) >= 0.1
    for truth, bit in ((flawed_slide.blur, BLUR), (flawed_slide.folds, FOLD)):
        cover = tissue_fractions(truth, label_px, coords, side)
        positive, negative = (cover >= 0.5) & ~inked, (cover < 0.2) & ~inked
        predicted = (flags & bit) > 0
        assert positive.sum() >= 3
        assert (predicted & positive).sum() / positive.sum() >= 0.9, f"bit {bit}"
        assert (predicted & negative).sum() <= 0.1 * max(1, predicted.sum())
    record = store.info.qc
    assert record is not None and record.mode == "flag"
    assert record.counts["blur"] == int(((flags & BLUR) > 0).sum()) > 0
    assert record.areas_um2["fold"] > 0 and record.areas_um2["ink"] > 0
    assert (tmp_path / "qc.png").exists()
    picture = np.asarray(Image.open(tmp_path / "qc.png").convert("RGB"))
    assert ((picture == (255, 200, 0)).all(axis=-1) | (np.abs(picture.astype(int) - (255, 200, 0)).sum(-1) < 60)).any()


def test_exclude_mode_does_not_tile_inked_or_folded_tiles(flawed_slide, tmp_path):
    flag = tile_slide(flawed_slide.path, tmp_path / "flag", TilingConfig(**TILING), progress=False)
    exclude = tile_slide(
        flawed_slide.path, tmp_path / "exclude", TilingConfig(**TILING, qc={"mode": "exclude"}), progress=False
    )
    flagged = TileStore(flag.store).qc_flags()
    dropped = int(((flagged & (FOLD | INK)) > 0).sum())
    assert dropped > 0 and exclude.n_tiles == flag.n_tiles - dropped
    record = TileStore(exclude.store).info.qc
    assert record is not None and sum(record.excluded_tiles.values()) >= dropped


def test_off_mode_measures_no_blur(flawed_slide, tmp_path):
    result = tile_slide(flawed_slide.path, tmp_path, TilingConfig(**TILING, qc={"mode": "off"}), progress=False)
    store = TileStore(result.store)
    assert np.isnan(store.qc_sharpness()).all() and not store.qc_flags().any()
    assert store.info.qc is not None and store.info.qc.median_sharpness is None


def test_stain_recorded_in_the_store(flawed_slide, tmp_path):
    result = tile_slide(flawed_slide.path, tmp_path, TilingConfig(**TILING), progress=False)
    stain = TileStore(result.store).info.stain
    assert stain is not None
    h, e = (np.asarray(v) for v in stain["stain_matrix"])
    assert abs(np.linalg.norm(h) - 1) < 1e-3 and abs(np.linalg.norm(e) - 1) < 1e-3
    json.dumps(stain)  # plain JSON, for run.json


def test_slide_stain_ignores_marker_ink(cmu_tiles):
    """Blue and black marker over a tenth of the tiles does not turn the measured H&E vectors."""
    from wsi_dala.stain import measure_tiles, stain_distance

    clean = measure_tiles(list(cmu_tiles))
    inked = cmu_tiles.copy()
    inked[:, :22] = (60, 90, 190)  # a blue band over the top tenth of every tile
    inked[:, 22:30] = (40, 40, 45)  # and a black one
    distance = stain_distance(measure_tiles(list(inked)), clean)
    assert distance["h_angle_deg"] < 2 and distance["e_angle_deg"] < 2
