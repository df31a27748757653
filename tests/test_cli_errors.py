"""Bad input: one clear line naming the file and the problem, a non-zero exit, nothing that looks complete."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from wsi_dala.cli import main
from wsi_dala.tiling.store import is_complete


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("wsi-dala: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_file(capsys, tmp_path):
    code, _, err = _run(capsys, "tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o"), "-q")
    _assert_one_line_error(code, err, "nope.svs", "file not found")
    assert not (tmp_path / "o").exists()


def test_png_and_text_are_not_slides(capsys, tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    for path in (png, text):
        code, _, err = _run(capsys, "tile", str(path), "--out", str(tmp_path / "o"), "-q")
        _assert_one_line_error(code, err, path.name)
        assert "not" in err
    assert not (tmp_path / "o" / "tiles.zarr").exists()


def test_truncated_tiff(capsys, svs_050, tmp_path):
    broken = tmp_path / "truncated.svs"
    data = svs_050.path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "tile", str(broken), "--out", str(tmp_path / "o"), "-q")
    _assert_one_line_error(code, err, "truncated.svs", "truncated")
    assert not is_complete(tmp_path / "o" / "tiles.zarr")


def test_corrupt_tile_data_fails_cleanly(capsys, svs_050, tmp_path):
    corrupt = tmp_path / "corrupt.svs"
    shutil.copy(svs_050.path, corrupt)
    with open(corrupt, "r+b") as handle:  # overwrite the middle of level 0's JPEG tiles with garbage
        size = corrupt.stat().st_size
        handle.seek(size // 4)
        handle.write(np.random.default_rng(0).integers(0, 255, size // 3, dtype=np.uint8).tobytes())
    code, _, err = _run(capsys, "tile", str(corrupt), "--out", str(tmp_path / "o"), "-q", "--mpp", "0.5")
    _assert_one_line_error(code, err, "corrupt.svs")
    assert not is_complete(tmp_path / "o" / "tiles.zarr")


def test_no_mpp_needs_slide_mpp(capsys, single_level_no_mpp, tmp_path):
    code, _, err = _run(capsys, "tile", str(single_level_no_mpp.path), "--out", str(tmp_path / "o"), "-q")
    _assert_one_line_error(code, err, "bare.tif", "--slide-mpp")
    assert not (tmp_path / "o").exists()
    code, out, _ = _run(
        capsys,
        "tile",
        str(single_level_no_mpp.path),
        "--out",
        str(tmp_path / "o"),
        "-q",
        "--slide-mpp",
        "0.25",
        "--mpp",
        "1.0",
        "--tile-size",
        "64",
    )
    assert code == 0 and "source: user" in out


def test_target_finer_than_finest_level(capsys, svs_050, tmp_path):
    code, _, err = _run(capsys, "tile", str(svs_050.path), "--out", str(tmp_path / "o"), "-q", "--magnification", "40")
    _assert_one_line_error(code, err, "aperio_050.svs", "finer than", "--allow-upsample")
    code, out, _ = _run(
        capsys,
        "tile",
        str(svs_050.path),
        "--out",
        str(tmp_path / "o"),
        "-q",
        "--magnification",
        "40",
        "--allow-upsample",
        "--tile-size",
        "64",
    )
    assert code == 0 and "resize factor 0.5" in out


def test_unwritable_output(capsys, svs_050, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "tile", str(svs_050.path), "--out", str(blocker / "sub"), "-q")
    _assert_one_line_error(code, err, "sub", "cannot be written")


def test_info_prints_resolution_and_source(capsys, tiff_generic):
    code, out, _ = _run(capsys, "info", str(tiff_generic.path))
    assert code == 0
    assert "tiff-resolution" in out and "mpp_x: 0.5" in out


@pytest.mark.parametrize("verb", ["info", "tile"])
def test_help_lists_defaults(capsys, verb):
    with pytest.raises(SystemExit) as stop:
        main([verb, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--reader" in out and "(default: auto)" in out


def test_train_input_errors_are_one_line(capsys, svs_050, tmp_path):
    broken = tmp_path / "case.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    slide = tmp_path / "case.svs"
    slide.write_bytes(svs_050.path.read_bytes())
    code, _, err = _run(capsys, "train", "--slide", str(slide), "--out", str(tmp_path / "run"), "-q")
    _assert_one_line_error(code, err, "case.geojson", "not a readable GeoJSON")
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "run"), "-q")
    _assert_one_line_error(code, err, "exactly one data source")
    code, _, err = _run(
        capsys,
        "batch",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(tmp_path / "m.safetensors"),
        "-q",
    )
    _assert_one_line_error(code, err, "nowhere", "archive folder not found")
