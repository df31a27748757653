"""QC and stain through `wsi-dala run`: what run.json, the GeoJSON, the overlay and the batch report say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from tests.qupath_rules import check_file
from wsi_dala.cli import main
from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig
from wsi_dala.core.errors import QualityError
from wsi_dala.outputs.overlay import HATCH_RGB
from wsi_dala.outputs.slide_answer import quality_notes
from wsi_dala.runs.pipeline import run_slide
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import TileStore

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def flawed(tmp_path_factory):
    """Tumour, a fold, an out-of-focus patch and two markers on one slide (1 µm/px tiles: quick)."""
    spec = SyntheticSlideSpec(
        width=6144, height=4608, mpp=0.5, seed=6, label_px=8, markers=("black", "blue"), folds=1, blur_patches=1
    )
    return write_synthetic_slide(tmp_path_factory.mktemp("flawed") / "flawed.svs", spec)


def _config(checkpoint, **scoring):
    return PipelineConfig(model=str(checkpoint), tiling=TilingConfig(min_tissue=0.05), scoring=ScoringConfig(**scoring))


def _regions(path):
    return [shapely.geometry.shape(f["geometry"]) for f in check_file(path)]


@pytest.mark.parametrize("stain_normalise", ["none", "macenko"])
def test_flag_mode_marks_tiles_and_changes_no_call(tmp_path, colour_checkpoint, flawed, stain_normalise):
    """QC is advisory: with --qc flag, probabilities, the tumour layer and the regions are those of --qc off;
    flagged tiles are marked (hatched, tile measurements, each region's flagged share)."""
    flag = run_slide(flawed.path, tmp_path / "flag", _config(colour_checkpoint, stain_normalise=stain_normalise),
                     progress=False)  # fmt: skip
    off_config = _config(colour_checkpoint, stain_normalise=stain_normalise)
    off_config = off_config.model_copy(update={"tiling": TilingConfig(min_tissue=0.05, qc={"mode": "off"})})
    off = run_slide(flawed.path, tmp_path / "off", off_config, progress=False)
    flagged_store, off_store = TileStore(flag.layout.tiles_store), TileStore(off.layout.tiles_store)
    assert flagged_store.qc_flags().astype(bool).sum() > 0 and not off_store.qc_flags().any()
    assert np.array_equal(flagged_store.positive_scores(), off_store.positive_scores())
    import zarr

    for layer in ("probability", "tumour"):
        a = zarr.open_group(flag.layout.heatmap_store, mode="r")[f"{layer}/0"][:]
        b = zarr.open_group(off.layout.heatmap_store, mode="r")[f"{layer}/0"][:]
        assert np.array_equal(a, b, equal_nan=True), layer
    flag_regions, off_regions = _regions(flag.layout.tumour_geojson()), _regions(off.layout.tumour_geojson())
    assert len(flag_regions) == len(off_regions) > 0
    assert all(a.equals(b) for a, b in zip(flag_regions, off_regions, strict=True))
    features = check_file(flag.layout.tumour_geojson())
    shares = [f["properties"]["measurements"]["QC flagged fraction"] for f in features]
    assert all(0.0 <= v <= 1.0 for v in shares)
    assert [r["qc_flagged_fraction"] for r in flag.record.regions] == pytest.approx(shares, abs=1e-4)
    overlay = np.asarray(Image.open(flag.layout.overlay_png).convert("RGB"))
    assert (np.abs(overlay.astype(int) - HATCH_RGB).sum(axis=-1) < 30).sum() > 50, "flagged tiles are hatched"


def test_run_records_qc_and_stain(tmp_path, colour_checkpoint, flawed):
    summary = run_slide(flawed.path, tmp_path, _config(colour_checkpoint), progress=False)
    record = json.loads(summary.layout.run_json.read_text())
    qc, stain = record["qc"], record["stain"]
    assert qc["mode"] == "flag" and qc["tiles_flagged"]["blur"] > 0 and qc["warning"] is None
    assert 0 < qc["percent_of_tissue"]["blur"] < 100 and qc["areas_um2"]["ink"] > 0 and qc["ink_mm2"] > 0
    assert "blur_not_judged" in qc["tiles_flagged"] and qc["median_edge_blur_um"] is not None
    assert stain["slide"] is not None and stain["normalised"] == "none"
    assert stain["distance"]["h_angle_deg"] >= 0
    assert stain["out_of_distribution"] is None  # the colour scorer's card records no training stain
    assert record["outputs"]["qc"] == "qc.png" and (tmp_path / "qc.png").exists()
    tiles = check_file(summary.layout.tiles_geojson())
    measurements = tiles[0]["properties"]["measurements"]
    assert {"QC blur", "QC fold", "QC ink", "QC flagged"} <= set(measurements)
    flagged = [f for f in tiles if f["properties"]["measurements"]["QC flagged"] == 1.0]
    assert len(flagged) == TileStore(summary.layout.tiles_store).qc_flags().astype(bool).sum() > 0


def test_stain_normalised_run_scores_and_says_so(tmp_path, colour_checkpoint, flawed):
    summary = run_slide(flawed.path, tmp_path, _config(colour_checkpoint, stain_normalise="macenko"), progress=False)
    record = json.loads(summary.layout.run_json.read_text())
    assert record["stain"]["normalised"] == "macenko"
    assert record["stain"]["reference_source"] == "published Macenko H&E reference"  # the card records none
    assert record["stain"]["out_of_distribution"] is None  # not judged against a target no model was trained on
    scores = TileStore(summary.layout.tiles_store).positive_scores()
    assert np.isfinite(scores).all() and len(scores) == record["counts"]["tiles"]


def test_exclude_mode_leaves_flagged_tiles_out_and_says_how_much_tumour(tmp_path, capsys, colour_checkpoint, flawed):
    code = main(["run", str(flawed.path), "--model", str(colour_checkpoint), "--out", str(tmp_path), "--qc", "exclude",
                 "--min-tissue", "0.05", "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads((tmp_path / "run.json").read_text())
    store = TileStore(tmp_path / "tiles.zarr")
    flagged = store.qc_flags() > 0
    assert flagged.sum() > 0 and record["qc"]["tiles_excluded"]["any"] == int(flagged.sum())
    features = check_file(tmp_path / f"{flawed.path.stem}.tiles.geojson")
    assert len(features) == store.info.n_tiles - int(flagged.sum())
    tumour = record["qc"]["tumour_excluded"]
    called = np.nan_to_num(store.positive_scores()) >= record["settings"]["export"]["tile_threshold"]
    assert tumour["tumour_tiles"] == int((called & flagged).sum()) and tumour["of_tumour_tiles"] == int(called.sum())
    assert tumour["tissue_mm2"] >= 0
    assert f"--qc exclude left out {int(flagged.sum())} tiles, {tumour['tumour_tiles']} of the" in out


def test_a_slide_out_of_focus_everywhere_finishes_with_a_warning(tmp_path, capsys, colour_checkpoint):
    """QC never changes the exit code: the real CMU-1 crop, defocused by σ = 1.5 µm, is scored, marked and
    reported, exit 0."""
    from scipy import ndimage

    from wsi_dala.slides.reader import Slide
    from wsi_dala.slides.synthetic_texture import write_aperio_svs

    with Slide(CMU) as slide:
        image = slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
    blurred = np.clip(ndimage.gaussian_filter(image.astype(np.float32), (3, 3, 0)), 0, 255).astype(np.uint8)
    path = write_aperio_svs(tmp_path / "defocused.svs", blurred, 0.499)
    code = main(["run", str(path), "--model", str(colour_checkpoint), "--out", str(tmp_path / "run"), "-q"])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert code == 0 and record["status"] == "complete"
    qc = record["qc"]
    assert qc["tiles_flagged"]["blur"] >= 0.9 * record["counts"]["tiles"]
    assert qc["warning"] is not None and "rescan" in qc["warning"]
    assert any(line.startswith("warning:") and "QC flagged" in line for line in out.splitlines())


def test_blank_slide_run_fails_in_one_line_with_the_pictures(tmp_path, capsys, colour_checkpoint, blank_slide):
    with pytest.raises(QualityError, match=r"blank\.svs: no tissue found; mask written to .*qc\.png"):
        run_slide(blank_slide.path, tmp_path / "direct", _config(colour_checkpoint), progress=False)
    code = main(["run", str(blank_slide.path), "--model", str(colour_checkpoint), "--out", str(tmp_path / "cli"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("wsi-dala: error: ") and "no tissue found" in err[0]
    assert (tmp_path / "cli" / "qc.png").exists() and (tmp_path / "cli" / "tissue_mask.png").exists()


def test_batch_report_lines_for_qc_and_stain():
    qc = {"percent_of_tissue": {"blur": 12.4, "fold": 0.3}, "ink_mm2": 0.42}
    stain = {"out_of_distribution": True, "summary": "H 21°, E 4° from the reference"}
    assert quality_notes(qc, stain) == [
        "12 % of tissue out of focus",
        "marker ink on 0.42 mm² (removed from the tissue)",
        "out of distribution: stain (H 21°, E 4° from the reference)",
    ]
    assert quality_notes({}, {}) == []
    warned = {"warning": "QC flagged 97 of 100 tiles (97 %: 97 out of focus); they are scored and marked: ..."}
    assert quality_notes(warned, {}) == ["QC flagged 97 of 100 tiles (97 %: 97 out of focus)"]


def test_exclude_that_removes_every_tumour_tile_says_so():
    """--qc exclude leaving no tumour: the summary says why the export has no region, never an empty export alone."""
    from wsi_dala.cli.pipeline import qc_lines

    qc = {
        "mode": "exclude",
        "tiles_flagged": {"blur": 30, "fold": 0, "ink": 0, "any": 30},
        "tiles_excluded": {"blur": 30, "fold": 0, "ink": 0, "any": 30},
        "percent_of_tissue": {"blur": 40.0, "fold": 0.0},
        "ink_mm2": 0.0,
        "tumour_excluded": {"tumour_tiles": 12, "tissue_mm2": 0.05, "of_tumour_tiles": 12, "threshold": 0.5},
        "warning": None,
    }
    lines = qc_lines(qc)
    assert any("--qc exclude left out 30 tiles, 12 of the 12 tiles called tumour" in line for line in lines)
    assert any(line.startswith("warning:") and "no tumour region is exported" in line for line in lines)
    assert not any(
        "no tumour region" in line
        for line in qc_lines({**qc, "tumour_excluded": {**qc["tumour_excluded"], "tumour_tiles": 3}})
    )
