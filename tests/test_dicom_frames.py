"""DICOM that OpenSlide refuses (issue 33, item 3): a single-file VL Whole Slide Microscopy Image without
ImageType or pixel spacing, its frames stored column by column, as another tool wrote the real TCGA crop in
../shared/real/wsi; read frame by frame through pydicom with the same coordinates and µm/px rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import zarr
from pydicom.encaps import encapsulate, generate_fragmented_frames

from tests.dicom_wsi import write_undescribed_dicom_wsi
from wsi_dala.core.errors import ResolutionError, SlideReadError
from wsi_dala.slides.reader import Slide

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def undescribed(tmp_path_factory):
    with Slide(CMU) as slide:
        rgb = slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
    path = write_undescribed_dicom_wsi(rgb, tmp_path_factory.mktemp("dicom") / "case" / "crop.dcm")
    return rgb, path


def test_openslide_refuses_it_and_the_frame_reader_reads_it_in_place(undescribed):
    rgb, path = undescribed
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    with Slide(path) as slide:
        assert slide.info.reader == "pydicom" and (slide.info.width, slide.info.height) == (2220, 2967)
        assert slide.info.mpp_x is None and slide.info.associated_images == ()
        assert slide.properties["pydicom.frame-order"] == "column-major"
        with pytest.raises(ResolutionError, match="--slide-mpp"):
            slide.require_mpp()
        region = slide.read_region(700, 900, 0, 600, 500)  # across frame corners
        difference = np.abs(region.astype(int) - rgb[900:1400, 700:1300].astype(int)).mean()
        assert difference < 6, difference  # JPEG at q95 with 4:2:2 chroma; a misplaced frame differs by ~60
        edge = slide.read_region(2000, 2800, 0, 400, 300)  # past the right and bottom: white, not the padding
        assert (edge[200:, :] == 255).all() and (edge[:, 300:] == 255).all()


@pytest.mark.slow
def test_a_run_on_it_gives_the_svs_run_s_tiles_and_scores(undescribed, colour_checkpoint, tmp_path):
    _, path = undescribed
    runs = {}
    for name, source, extra in (("svs", CMU, []), ("dicom", path, ["--slide-mpp", "0.499"])):
        out = tmp_path / name
        cli = [sys.executable, "-m", "wsi_dala", "run", str(source), "--model", str(colour_checkpoint), "-q"]
        done = subprocess.run([*cli, "--out", str(out), *extra], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        store = zarr.open_group(out / "tiles.zarr", mode="r")
        runs[name] = ({tuple(c): i for i, c in enumerate(store["coords"][:])}, store["scores"][:, 1])
    record = json.loads((tmp_path / "dicom" / "run.json").read_text())
    assert record["resolution"]["slide_mpp_source"] == "user" and record["resolution"]["slide_mpp"] == 0.499
    (svs_index, svs_scores), (dicom_index, dicom_scores) = runs["svs"], runs["dicom"]
    common = sorted(set(svs_index) & set(dicom_index))
    assert len(common) >= 0.97 * max(len(svs_index), len(dicom_index)) and len(common) > 100
    a, b = svs_scores[[svs_index[c] for c in common]], dicom_scores[[dicom_index[c] for c in common]]
    assert np.abs(a - b).max() <= 0.02


def test_a_corrupt_frame_is_named(undescribed, tmp_path):
    _, path = undescribed
    ds = pydicom.dcmread(path)
    frames = list(generate_fragmented_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    frames = [b"".join(parts) for parts in frames]
    frames[5] = frames[5][:200]  # cut short
    ds.PixelData = encapsulate(frames)
    broken = tmp_path / "broken" / "crop.dcm"
    broken.parent.mkdir()
    ds.save_as(broken)
    with Slide(broken) as slide, pytest.raises(SlideReadError, match="frame 5"):
        # frame 5 of the column-major grid: column 0, row 5
        slide.read_region(0, 5 * 256, 0, 256, 256)
