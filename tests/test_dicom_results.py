"""DICOM results (issue 33): the tumour map as a FRACTIONAL Segmentation and the regions as Microscopy Bulk
Simple Annotations, read back with highdicom (equal to heatmap.zarr within quantisation, polygons equal to the
GeoJSON), checked with dicom3tools' dciodvfy, referencing a DICOM slide as it is (same study) or a DICOM copy
of any other slide; and the bad input each refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr

from tests.dicom_wsi import write_dicom_wsi, write_undescribed_dicom_wsi
from tests.test_cli_commands import ok, refused, wsi_dala
from wsi_dala.model import write_untrained_checkpoint
from wsi_dala.model.colour import CLASS_NAMES
from wsi_dala.slides.reader import Slide
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

hd = pytest.importorskip("highdicom")
DCIODVFY = shutil.which("dciodvfy")
# The packaged dicom3tools (2022) asks a 2D annotation about CommonZCoordinateValue, which it does not hold
# (that attribute is for 3D annotations only): an error of the validator's, explained in docs/dicom.md.
KNOWN_VALIDATOR_ERRORS = {
    "Error - Only valid for AnnotationCoordinateType of 3D - attribute <CommonZCoordinateValue> = <>"
}


def dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")}


def check_round_trip(run: Path) -> dict[str, object]:
    """The objects equal what the run wrote: probabilities within 8-bit quantisation, polygons to 0.01 px."""
    record = json.loads((run / "run.json").read_text())
    seg = hd.seg.segread(run / "dicom" / "tumour-probability.seg.dcm")
    read = seg.get_total_pixel_matrix(segment_numbers=[1])[..., 0]
    heatmap = np.nan_to_num(np.asarray(zarr.open_array(run / "heatmap.zarr" / "tumour" / "0", mode="r")[:]), nan=0.0)
    assert read.shape == heatmap.shape and np.abs(read - heatmap).max() <= 0.5 / 255 + 1e-6
    annotations = hd.ann.annread(run / "dicom" / "tumour-regions.ann.dcm")
    group = annotations.get_annotation_groups()[0]
    outlines = group.get_graphic_data(coordinate_type="2D")
    regions = json.loads((run / Path(record["outputs"]["tumour_geojson"]).name).read_text())["features"]
    lowest = min(f["properties"]["measurements"]["Threshold"] for f in regions)
    expected = [
        np.asarray(f["geometry"]["coordinates"][0])[:-1]
        for f in regions
        if f["properties"]["measurements"]["Threshold"] == lowest and f["geometry"]["type"] == "Polygon"
    ]
    assert len(outlines) == len(expected) > 0
    for got, want in zip(outlines, expected, strict=True):
        assert got.shape == want.shape and np.abs(got - want).max() <= 0.01
    _, values, _ = group.get_measurements()
    means = [
        f["properties"]["measurements"]["Mean tumour probability"]
        for f in regions
        if f["properties"]["measurements"]["Threshold"] == lowest
    ]
    assert np.allclose(values[:, 0], means, atol=1e-4)
    if DCIODVFY:
        for path in sorted((run / "dicom").rglob("*.dcm")):
            assert dciodvfy_errors(path) <= KNOWN_VALIDATOR_ERRORS, (path.name, dciodvfy_errors(path))
    return record


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return write_untrained_checkpoint(
        tmp_path_factory.mktemp("model") / "colour.safetensors", "colour-reference", 64, 1.0, CLASS_NAMES
    )


@pytest.mark.slow
def test_run_dicom_on_an_svs_writes_the_slide_as_dicom_and_results_that_reference_it(colour, tmp_path):
    slide = write_synthetic_slide(
        tmp_path / "case.svs", SyntheticSlideSpec(width=2048, height=1536, mpp=0.5, seed=61, app_mag=20)
    ).path
    run = tmp_path / "run"
    result = ok(wsi_dala("run", slide, "--model", colour, "--out", run, "--dicom", "-q", timeout_s=300))
    assert "written as DICOM first" in result.stdout
    check_round_trip(run)
    seg = pydicom.dcmread(run / "dicom" / "tumour-probability.seg.dcm", stop_before_pixels=True)
    copy = [pydicom.dcmread(p, stop_before_pixels=True) for p in (run / "dicom" / "slide").glob("*.dcm")]
    assert {d.StudyInstanceUID for d in copy} == {seg.StudyInstanceUID}
    assert seg.FrameOfReferenceUID == copy[0].FrameOfReferenceUID
    assert not any("LABEL" in list(d.ImageType) or "OVERVIEW" in list(d.ImageType) for d in copy)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"

    # An unwritable output and a full disk: one line each, and nothing that looks like a result.
    from tests.test_hostile import _cli, _one_error

    blocked = tmp_path / "blocked"
    shutil.copytree(run, blocked, ignore=shutil.ignore_patterns("dicom"))
    (blocked / "dicom").write_text("a file where the folder would go")
    _one_error(_cli("export-dicom", blocked), "dicom")
    full = tmp_path / "full"
    shutil.copytree(run, full, ignore=shutil.ignore_patterns("dicom"))
    result = _cli("export-dicom", full, max_file_bytes=100_000)  # the slide's DICOM copy is larger
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len([line for line in result.stderr.splitlines() if line.startswith("wsi-dala: error")]) == 1
    assert not list((full / "dicom").rglob("*.dcm"))


@pytest.mark.slow
def test_export_dicom_of_a_dicom_slide_shares_its_study_and_frame_of_reference(colour, tmp_path):
    svs = Path(__file__).parent / "data" / "cmu_small_region.svs"
    with Slide(svs) as slide:
        rgb = slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
        mpp = slide.require_mpp().mpp
    files = write_dicom_wsi([rgb, rgb[::4, ::4].copy()], mpp, tmp_path / "cmu-dicom")
    run = tmp_path / "run"
    ok(wsi_dala("run", files[0], "--model", colour, "--out", run, "-q", timeout_s=300))
    result = ok(wsi_dala("export-dicom", run))
    assert "referenced as is" in result.stdout and not (run / "dicom" / "slide").exists()
    check_round_trip(run)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for name in ("tumour-probability.seg.dcm", "tumour-regions.ann.dcm"):
        written = pydicom.dcmread(run / "dicom" / name, stop_before_pixels=True)
        assert written.StudyInstanceUID == source.StudyInstanceUID
        assert written.PatientID == source.PatientID
        assert written.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert pydicom.dcmread(
        run / "dicom" / "tumour-probability.seg.dcm", stop_before_pixels=True
    ).FrameOfReferenceUID == (source.FrameOfReferenceUID)


def test_export_dicom_refuses_in_one_line_and_writes_nothing(colour, tmp_path):
    refused(wsi_dala("export-dicom", tmp_path), "not a finished wsi-dala run")
    with Slide(Path(__file__).parent / "data" / "cmu_small_region.svs") as slide:
        rgb = slide.read_region(0, 0, 0, 1024, 1024)
    undescribed = write_undescribed_dicom_wsi(rgb, tmp_path / "case" / "crop.dcm")
    run = tmp_path / "run"
    ok(wsi_dala("run", undescribed, "--model", colour, "--out", run, "--slide-mpp", "0.5", "-q", timeout_s=300))
    refused(wsi_dala("export-dicom", run), "lacks FrameOfReferenceUID")
    assert not any((run / "dicom").glob("*.dcm"))
    # UIDs longer than DICOM's 64 characters (the real pathml file's): the run is kept, the results refused by name
    overlong = write_undescribed_dicom_wsi(rgb, tmp_path / "long" / "crop.dcm", long_uids=True)
    run = tmp_path / "run-long"
    argv = ("run", overlong, "--model", colour, "--out", run, "--slide-mpp", "0.5", "--dicom", "-q")
    done = wsi_dala(*argv, timeout_s=300)  # the reader's warning on the frame order comes first
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("wsi-dala: error: ")]
    assert errors == [line for line in done.stderr.splitlines()[-1:]], done.stderr
    assert "crop.dcm: not valid DICOM (The value length (65) exceeds the maximum length of 64" in errors[0], errors
    assert (run / "run.json").is_file() and not any((run / "dicom").glob("*.dcm"))


@pytest.mark.slow
def test_batch_dicom_writes_each_slides_results_and_adds_them_to_a_finished_batch(colour, tmp_path):
    """`batch --dicom`: every slide's folder gets its DICOM results, referencing a DICOM copy of the slide; a
    batch that finished without them, run again with --dicom, adds them without running any slide again; run
    once more, it leaves them as they are. `export.dicom: true` in a config file does the same."""
    archive = tmp_path / "archive"
    for seed in (71, 72):
        write_synthetic_slide(
            archive / f"case{seed}.svs", SyntheticSlideSpec(width=2048, height=1536, mpp=0.5, seed=seed, app_mag=20)
        )
    out = tmp_path / "out"
    ok(wsi_dala("batch", archive, "--model", colour, "--out", out, "-q", timeout_s=600))
    folders = sorted(p for p in out.iterdir() if (p / "run.json").is_file())
    assert len(folders) == 2 and not any((f / "dicom").exists() for f in folders)
    records = {f: (f / "run.json").stat().st_mtime_ns for f in folders}
    result = ok(wsi_dala("batch", archive, "--model", colour, "--out", out, "--dicom", "-q", timeout_s=600))
    assert "2 skipped" in result.stdout, result.stdout
    assert {f: (f / "run.json").stat().st_mtime_ns for f in folders} == records  # no slide ran again
    written = {}
    for folder in folders:
        check_round_trip(folder)
        seg = folder / "dicom" / "tumour-probability.seg.dcm"
        copy = pydicom.dcmread(next((folder / "dicom" / "slide").glob("*.dcm")), stop_before_pixels=True)
        assert pydicom.dcmread(seg, stop_before_pixels=True).StudyInstanceUID == copy.StudyInstanceUID
        written[seg] = seg.stat().st_mtime_ns
    config = tmp_path / "dicom.yaml"
    config.write_text("export:\n  dicom: true\n")
    ok(wsi_dala("batch", archive, "--model", colour, "--out", out, "--config", config, "-q", timeout_s=600))
    assert {seg: seg.stat().st_mtime_ns for seg in written} == written  # whole and newer than the runs: kept
