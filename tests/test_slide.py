"""Slide reading: both libraries, µm/px with its source, the QuPath frame, padding."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_dala.core.errors import ResolutionError
from wsi_dala.slides.reader import Slide, bounds_offset, magnification_to_mpp, resolve_resolution
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

READERS = ("openslide", "tiffslide")


@pytest.mark.parametrize("reader", READERS)
def test_svs_levels_and_vendor_mpp(svs_025, reader):
    with Slide(svs_025.path, reader=reader) as slide:
        info = slide.info
    assert info.reader == reader
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (6144, 4608)
    assert info.level_downsamples[:2] == (1.0, 4.0)
    assert info.level_dimensions[1] == (1536, 1152)
    assert (info.mpp_x, info.mpp_y, info.mpp_source) == (0.25, 0.25, "vendor")
    assert info.objective_power == 40


@pytest.mark.parametrize("reader", READERS)
def test_generic_tiff_mpp_comes_from_resolution_tags(tiff_generic, reader):
    with Slide(tiff_generic.path, reader=reader) as slide:
        assert slide.info.mpp_source == "tiff-resolution"
        assert slide.info.mpp_x == pytest.approx(0.5)
        assert slide.info.level_downsamples == (1.0, 4.0)


def test_no_mpp_is_an_error_unless_user_gives_it(single_level_no_mpp):
    with Slide(single_level_no_mpp.path) as slide:
        assert slide.info.mpp_x is None
        with pytest.raises(ResolutionError, match="--slide-mpp"):
            slide.require_mpp()
    with Slide(single_level_no_mpp.path, slide_mpp=0.4) as slide:
        resolution = slide.require_mpp()
        assert (resolution.mpp, resolution.source) == (0.4, "user")
        assert slide.info.level_downsamples == (1.0,)


def test_objective_power_fallback(tmp_path):
    spec = SyntheticSlideSpec(width=1024, height=768, layout="svs", write_mpp=False, app_mag=20)
    # write_mpp=False drops AppMag too; write an SVS with AppMag only by editing the description.
    slide = write_synthetic_slide(tmp_path / "mag_only.svs", spec)
    with Slide(slide.path) as opened:
        assert opened.info.mpp_source is None
    props = {"aperio.AppMag": "20", "openslide.objective-power": "20"}
    resolution = resolve_resolution(props, "openslide")
    assert resolution is not None
    assert (resolution.mpp, resolution.source) == (0.5, "objective-power")


def test_resolution_order_and_garbage_rejected():
    props = {
        "openslide.vendor": "aperio",
        "openslide.mpp-x": "0.2527",
        "openslide.mpp-y": "0.2527",
        "aperio.MPP": "0.2527",
        "openslide.objective-power": "40",
    }
    assert resolve_resolution(props, "openslide").source == "vendor"
    assert resolve_resolution(props, "openslide", user_mpp=0.3).mpp == 0.3
    garbage = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "1", "tiff.YResolution": "1"}
    assert resolve_resolution(garbage, "tiffslide") is None  # 25400 µm/px is not a slide
    no_unit = {"tiff.ResolutionUnit": "none", "tiff.XResolution": "20000", "tiff.YResolution": "20000"}
    assert resolve_resolution(no_unit, "tiffslide") is None
    with pytest.raises(ResolutionError):
        resolve_resolution({}, "openslide", user_mpp=-1)
    assert magnification_to_mpp(40) == 0.25


def test_bounds_offset_matches_qupath_frame():
    props = {
        "openslide.bounds-x": "1200",
        "openslide.bounds-y": "3400",
        "openslide.bounds-width": "50000",
        "openslide.bounds-height": "40000",
    }
    assert bounds_offset(props) == (1200, 3400, 50000, 40000)
    assert bounds_offset({}) == (0, 0, None, None)
    assert bounds_offset({"openslide.bounds-x": "garbage"})[0] == 0


@pytest.mark.parametrize("reader", READERS)
def test_outside_the_image_is_white(svs_025, reader):
    with Slide(svs_025.path, reader=reader) as slide:
        region = slide.read_region(6144 - 100, 4608 - 50, 0, 300, 200)
        assert region.shape == (200, 300, 3)
        assert (region[60:, :] == 255).all()
        assert (region[:, 110:] == 255).all()
        inside = slide.read_region(6144 - 100, 4608 - 50, 0, 100, 50)
        np.testing.assert_array_equal(region[:50, :100], inside)
        assert (slide.read_region(-500, -500, 0, 100, 100) == 255).all()


def test_both_readers_return_the_same_pixels(svs_025):
    with Slide(svs_025.path, reader="openslide") as a, Slide(svs_025.path, reader="tiffslide") as b:
        for level in (0, 1):
            ra = a.read_region(1000, 1200, level, 300, 300).astype(int)
            rb = b.read_region(1000, 1200, level, 300, 300).astype(int)
            assert np.abs(ra - rb).max() <= 3


def test_a_dicom_folder_opens_as_the_slide_its_files_make(tmp_path):
    """OpenSlide opens a DICOM WSI through one of its .dcm files and refuses the folder; we take either.
    The files are openslide-python's DICOM fixtures (tests/data/README.md)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    source = Path(__file__).parent / "data" / "dicom-boxes"
    folder = tmp_path / "case 7 (dicom)"
    shutil.copytree(source, folder)
    with Slide(folder) as whole, Slide(folder / "boxes_1.dcm") as one_file:
        assert whole.reader == "openslide" and whole.info.vendor == "dicom"
        assert (whole.info.width, whole.info.height) == (16, 16)
        assert whole.require_mpp().mpp == pytest.approx(0.499)
        pixels = whole.read_region(0, 0, 0, 16, 16)
        np.testing.assert_array_equal(pixels, one_file.read_region(0, 0, 0, 16, 16))
        assert len({tuple(p) for p in pixels.reshape(-1, 3)}) >= 3  # coloured boxes, not blank
    done = subprocess.run([sys.executable, "-m", "wsi_dala", "info", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0 and "vendor: dicom" in done.stdout
