"""The synthetic slide generator's quality-control truth: marker ink, tissue folds, blurred patches, stains.

Small slides (2048 x 2048 px at 0.5 µm/px) are written once per module and read back through
``wsi_dala.slides.reader.Slide``, so the tests measure what a reader sees, JPEG included. At level 0 the painted
edges of every truth region are ragged by up to one label pixel, so masks are eroded or dilated by
``EDGE_LABEL_PX`` before pixels are compared.
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from scipy import ndimage

from wsi_dala.cli import main
from wsi_dala.cli import slides as slides_cli
from wsi_dala.core.errors import ConfigError
from wsi_dala.slides.reader import Slide
from wsi_dala.slides.synthetic import (
    BACKGROUND,
    BLACK_INK,
    BLUE_PEN,
    GREEN_PEN,
    STAIN_NAMES,
    TISSUE,
    TUMOUR,
    SyntheticSlide,
    SyntheticSlideSpec,
    make_truth,
    write_synthetic_slide,
)
from wsi_dala.slides.synthetic_artefacts import INK_BLACK, INK_BLUE, INK_GREEN, INK_NONE, MARKER_NAMES

SIDE_PX, MPP = 2048, 0.5
EDGE_LABEL_PX = 2  # margin around truth edges: ragged painting (1 label px) plus JPEG blocks
GLASS_RGB = np.array([243, 242, 240])


def _spec(**kwargs) -> SyntheticSlideSpec:
    return SyntheticSlideSpec(width=SIDE_PX, height=SIDE_PX, mpp=MPP, seed=0, **kwargs)


def _read(slide: SyntheticSlide, level: int = 0) -> np.ndarray:
    side = SIDE_PX // (1 if level == 0 else slide.spec.level_step**level)
    with Slide(slide.path) as reader:
        return reader.read_region(0, 0, level, side, side).astype(np.float64)


def _at_pixels(mask: np.ndarray, label_px: int, side_px: int) -> np.ndarray:
    """A truth map (one value per label pixel) blown up to one value per painted pixel."""
    return np.repeat(np.repeat(mask, label_px, axis=0), label_px, axis=1)[:side_px, :side_px]


_SQUARE = np.ones((3, 3), dtype=bool)  # grow and shrink along diagonals too (JPEG blocks are square)


def _inside(mask: np.ndarray, label_px: int = EDGE_LABEL_PX) -> np.ndarray:
    return ndimage.binary_erosion(mask, structure=_SQUARE, iterations=label_px)


def _near(mask: np.ndarray, label_px: int = EDGE_LABEL_PX) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=_SQUARE, iterations=label_px)


@pytest.fixture(scope="module")
def inked(tmp_path_factory):
    """All five markers; level-0 pixels read back."""
    slide = write_synthetic_slide(tmp_path_factory.mktemp("inked") / "inked.svs", _spec(markers=MARKER_NAMES[1:]))
    return slide, _read(slide)


@pytest.fixture(scope="module")
def damaged_and_clean(tmp_path_factory):
    """Two folds and two blurred patches, and the same slide without them (no ink on either)."""
    folder = tmp_path_factory.mktemp("damaged")
    damaged = write_synthetic_slide(folder / "damaged.svs", _spec(markers=(), folds=2, blur_patches=2))
    clean = write_synthetic_slide(folder / "clean.svs", _spec(markers=()))
    return damaged, clean


def _ink_over(slide: SyntheticSlide, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 masks of one marker's ink inside glass, and inside tissue (one label pixel in from the edges,
    beyond the ragged painting)."""
    ink = _inside(slide.ink_mask(name), 1)
    tissue = np.isin(slide.labels, [TISSUE, TUMOUR])
    over_glass = _at_pixels(ink & ~_near(slide.labels != BACKGROUND, 1), slide.label_px, SIDE_PX)
    over_tissue = _at_pixels(ink & _inside(tissue, 1), slide.label_px, SIDE_PX)
    assert over_glass.sum() >= 500 and over_tissue.sum() >= 500, f"{name}: the stroke must cross tissue"
    return over_glass, over_tissue


def _chroma(rgb: np.ndarray) -> float:
    return float(rgb.max() - rgb.min())


@pytest.mark.parametrize("name", MARKER_NAMES[1:])
def test_marker_ink_over_glass_has_its_colour(inked, name):
    slide, image = inked
    over_glass, _ = _ink_over(slide, name)
    r, g, b = mean = image[over_glass].mean(axis=0)
    hue_deg = colorsys.rgb_to_hsv(*(mean / 255))[0] * 360
    if name == "green":
        assert 100 <= hue_deg <= 170 and g > r + 60 and g > b + 40, mean
    elif name == "blue":
        assert 200 <= hue_deg <= 250 and b > r + 80 and b > g + 60, mean
    elif name == "red":
        assert (hue_deg >= 330 or hue_deg <= 20) and r > g + 100 and r > b + 100, mean
    elif name == "black":
        assert mean.max() < 65 and _chroma(mean) < 35, mean
    else:  # dark-grey: unsaturated, clearly lighter than black and darker than any stained tissue
        assert 60 <= mean.max() <= 115 and _chroma(mean) < 35, mean


@pytest.mark.parametrize("name", MARKER_NAMES[1:])
def test_ink_over_tissue_is_darker_and_lets_texture_through(inked, name):
    """Beer–Lambert: ink multiplies what is under it, so nuclei still show as fine detail (Laplacian)."""
    slide, image = inked
    over_glass, over_tissue = _ink_over(slide, name)
    assert image[over_tissue].mean() < image[over_glass].mean() - 3
    if name != "black":  # black lets too little light through for nuclei to show above the noise
        laplacian = ndimage.laplace(image.mean(axis=2))
        assert laplacian[over_tissue].var() > 2 * laplacian[over_glass].var()


def test_folds_are_darker_and_more_saturated_than_the_tissue_beside_them(damaged_and_clean):
    damaged, _ = damaged_and_clean
    image = _read(damaged)
    tissue = damaged.labels == TISSUE
    folds = damaged.folds & ~_near(damaged.blur)
    assert folds.any() and not (damaged.folds & ~np.isin(damaged.labels, [TISSUE, TUMOUR])).any()
    fold_px = _at_pixels(_inside(folds) & tissue, damaged.label_px, SIDE_PX)
    beside = ndimage.binary_dilation(folds, iterations=8) & ~_near(damaged.folds | damaged.blur) & _inside(tissue)
    beside_px = _at_pixels(beside, damaged.label_px, SIDE_PX)
    assert fold_px.sum() >= 2000 and beside_px.sum() >= 2000

    def saturation(rgb: np.ndarray) -> float:
        return float(((rgb.max(axis=1) - rgb.min(axis=1)) / np.maximum(rgb.max(axis=1), 1)).mean())

    assert image[fold_px].mean() < image[beside_px].mean() - 25
    assert saturation(image[fold_px]) > saturation(image[beside_px]) + 0.1


def test_blurred_patches_lose_detail_at_level_0_only(damaged_and_clean):
    damaged, clean = damaged_and_clean
    assert damaged.blur.any() and not (damaged.blur & ~np.isin(damaged.labels, [TISSUE, TUMOUR])).any()
    laplacian = ndimage.laplace(_read(damaged).mean(axis=2))
    blurred = _at_pixels(_inside(damaged.blur), damaged.label_px, SIDE_PX)
    sharp = _at_pixels(
        _inside(np.isin(damaged.labels, [TISSUE, TUMOUR]) & ~_near(damaged.blur)), damaged.label_px, SIDE_PX
    )
    assert blurred.sum() >= 5000 and sharp.sum() >= 5000
    assert laplacian[blurred].var() < 0.05 * laplacian[sharp].var()
    # Further out nothing changes: level 1 matches the slide without blur wherever there is no fold.
    level_px = SIDE_PX // damaged.spec.level_step
    # (a level-1 JPEG block of 16 px spans 4 label pixels)
    outside_folds = ~_at_pixels(_near(damaged.folds, 5), damaged.label_px // damaged.spec.level_step, level_px)
    difference = np.abs(_read(damaged, level=1) - _read(clean, level=1))
    assert difference[outside_folds].max() <= 2


def test_folds_and_blur_change_nothing_else(damaged_and_clean):
    damaged, clean = damaged_and_clean
    elsewhere = ~_at_pixels(_near(damaged.folds | damaged.blur, EDGE_LABEL_PX + 1), damaged.label_px, SIDE_PX)
    assert elsewhere.mean() > 0.5
    assert np.abs(_read(damaged) - _read(clean))[elsewhere].max() <= 2


def test_blurred_patches_show_no_tile_seams(damaged_and_clean):
    """Each tile is painted with a margin before blurring: tile edges are no sharper than JPEG block edges."""
    damaged, _ = damaged_and_clean
    grey = _read(damaged).mean(axis=2)
    blurred = _at_pixels(_inside(damaged.blur), damaged.label_px, SIDE_PX)
    step = np.abs(np.diff(grey, axis=1))  # step[:, x - 1]: between columns x - 1 and x
    columns = np.arange(1, SIDE_PX)
    both = blurred[:, 1:] & blurred[:, :-1]
    tile_edge = both & (columns % damaged.spec.tile_px == 0)
    block_edge = both & (columns % 8 == 0) & (columns % damaged.spec.tile_px != 0)
    assert tile_edge.sum() >= 200
    assert step[tile_edge].mean() < 1.3 * step[block_edge].mean()


def test_truth_maps_line_up_with_the_painted_pixels(inked, damaged_and_clean):
    """At level 1 (no ragged edges) every label pixel away from an edge is painted as its truth says."""
    slide, _ = inked
    block = slide.label_px // slide.spec.level_step
    image = _read(slide, level=1)
    side = image.shape[0] // block
    per_label = image[: side * block, : side * block].reshape(side, block, side, block, 3).mean(axis=(1, 3))
    ink = slide.ink != INK_NONE
    glass = _inside((slide.labels == BACKGROUND) & ~ink)[:side, :side]
    tissue = _inside(np.isin(slide.labels, [TISSUE, TUMOUR]) & ~ink)[:side, :side]
    inked_ = _inside(ink)[:side, :side]
    assert np.abs(per_label[glass] - GLASS_RGB).max() <= 12
    red, green, blue = per_label[tissue].T
    assert ((red > green + 25) & (blue > green + 15)).mean() > 0.99  # pink to purple
    assert (per_label[inked_].mean(axis=1) < 160).all()
    # Folds darken every label pixel they cover, against the same slide without them.
    damaged, clean = damaged_and_clean
    folds = _inside(damaged.folds)[:side, :side]
    darker = _read(damaged, level=1).reshape(side, block, side, block, 3).mean(axis=(1, 3, 4))
    darker -= _read(clean, level=1).reshape(side, block, side, block, 3).mean(axis=(1, 3, 4))
    assert (darker[folds] < -15).all()


def test_layers_are_separate_and_independent():
    truth = make_truth(_spec())
    assert not np.isin(truth.labels, [GREEN_PEN, BLUE_PEN, BLACK_INK]).any()  # pen lives in the ink layer now
    assert set(np.unique(truth.ink)) == {INK_NONE, INK_GREEN, INK_BLUE, INK_BLACK}  # the default markers
    assert not truth.folds.any() and not truth.blur.any()
    damaged = make_truth(_spec(folds=3, blur_patches=3))
    np.testing.assert_array_equal(damaged.ink, truth.ink)  # adding folds or blur does not move the ink
    np.testing.assert_array_equal(damaged.labels, truth.labels)
    assert not make_truth(_spec(pen_marks=False)).ink.any()
    assert not make_truth(_spec(markers=())).ink.any()


def test_ink_mask_selects_markers(inked):
    slide, _ = inked
    assert slide.ink_mask().sum() == (slide.ink != INK_NONE).sum() > 0
    green, blue = slide.ink_mask("green"), slide.ink_mask("blue")
    assert green.any() and blue.any() and not (green & blue).any()
    assert (slide.ink_mask("green", "blue") == (green | blue)).all()
    assert slide.truth_mask(TISSUE, TUMOUR).any()  # the label helper still works
    with pytest.raises(ConfigError, match="purple"):
        slide.ink_mask("purple")


def test_markers_are_drawn_at_physical_scale():
    """Strokes are 0.4–1 mm wide (dots up to ~1.4 mm across), not a fraction of the image."""
    spec = SyntheticSlideSpec(width=20000, height=20000, mpp=0.5, label_px=32, markers=MARKER_NAMES[1:])
    truth = make_truth(spec)
    label_mm = spec.mpp * spec.label_px / 1000
    for index, name in enumerate(MARKER_NAMES[1:], start=1):
        widest_mm = 2 * ndimage.distance_transform_edt(truth.ink == index).max() * label_mm
        assert 0.3 <= widest_mm <= 1.6, f"{name}: {widest_mm:.2f} mm"
    # However small the slide, a stroke is at least 2 label pixels wide.
    tiny = make_truth(SyntheticSlideSpec(width=256, height=256, mpp=0.05, markers=("green",)))
    assert 2 * ndimage.distance_transform_edt(tiny.ink == INK_GREEN).max() >= 2


def test_no_tissue_still_gets_ink_and_no_folds():
    truth = make_truth(_spec(tissue_fraction=0.0, folds=2, blur_patches=2, markers=("red", "blue")))
    assert truth.ink.any() and not truth.folds.any() and not truth.blur.any()


def test_stains_differ_the_way_their_names_say(tmp_path):
    tissue_rgb, tumour_rgb = {}, {}
    for stain in STAIN_NAMES:
        slide = write_synthetic_slide(tmp_path / f"{stain}.svs", _spec(markers=(), stain=stain))
        image = _read(slide, level=1)
        block = slide.label_px // slide.spec.level_step
        for label, means in ((TISSUE, tissue_rgb), (TUMOUR, tumour_rgb)):
            where = _at_pixels(_inside(slide.labels == label), block, image.shape[0])
            means[stain] = image[where].mean(axis=0)
    for stain in STAIN_NAMES:  # tumour is the darker tissue in every palette
        assert tumour_rgb[stain].mean() < tissue_rgb[stain].mean() - 15
    # pale: lighter, with less eosin (red over green); dark: darker and bluer (blue over red).
    pale, default, dark = tissue_rgb["pale"], tissue_rgb["default"], tissue_rgb["dark"]
    assert pale.mean() > default.mean() + 10 and pale[0] - pale[1] < default[0] - default[1] - 15
    assert dark.mean() < default.mean() - 5 and dark[2] - dark[0] > default[2] - default[0] + 10


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"markers": ("purple",)}, "marker 'purple'"),
        ({"markers": "green"}, "markers 'green'"),
        ({"stain": "vivid"}, "stain 'vivid'"),
        ({"folds": -1}, "folds -1"),
        ({"blur_patches": 1.5}, "blur patches 1.5"),
    ],
)
def test_bad_spec_values_are_one_line_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as error:
        _spec(**kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_synthesize_help_states_every_default(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["synthesize", "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: green,blue,black)", "(default: 0)", "(default: default)"):
        assert default in out
    # The names are spelled out in the CLI (so building the parser stays light): they must match.
    assert ", ".join(MARKER_NAMES[1:]) == slides_cli._MARKERS_HELP
    assert ", ".join(STAIN_NAMES) == slides_cli._STAINS_HELP


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--markers", "green,pink", "--markers"),
        ("--markers", ",", "--markers"),
        ("--folds", "-1", "--folds"),
        ("--blur-patches", "many", "--blur-patches"),
        ("--stain", "vivid", "--stain"),
    ],
)
def test_synthesize_bad_values_are_one_line(capsys, tmp_path, flag, value, fragment):
    with pytest.raises(SystemExit) as stop:
        main(["synthesize", str(tmp_path / "s.svs"), flag, value])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wsi-dala: error: ") and fragment in lines[0]
    assert not (tmp_path / "s.svs").exists()


def test_synthesize_writes_the_options_asked_for(capsys, tmp_path):
    path = tmp_path / "s.svs"
    argv = ["synthesize", str(path), "--width", "1024", "--height", "1024", "--slide-mpp", "0.5"]
    code = main([*argv, "--markers", "none", "--folds", "1", "--blur-patches", "1", "--stain", "pale", "-q"])
    assert code == 0 and path.exists()
    with Slide(path) as slide:
        assert slide.info.width == 1024
