"""QC and stain through `wsi-dala run`: what run.json, the GeoJSON, the overlay and the batch report say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from PIL import Image

from tests.qupath_rules import check_file
from wsi_dala.archive import quality_notes
from wsi_dala.cli import main
from wsi_dala.config import PipelineConfig, ScoringConfig, TilingConfig
from wsi_dala.errors import QualityError
from wsi_dala.heatmap import HATCH_RGB
from wsi_dala.pipeline import run_slide
from wsi_dala.qc import BLUR
from wsi_dala.store import TileStore
from wsi_dala.synthetic import SyntheticSlideSpec, write_synthetic_slide


@pytest.fixture(scope="module")
def flawed(tmp_path_factory):
    """Tumour, a fold, an out-of-focus patch and two markers on one slide (1 µm/px tiles: quick)."""
    spec = SyntheticSlideSpec(
        width=6144, height=4608, mpp=0.5, seed=6, label_px=8, markers=("black", "blue"), folds=1, blur_patches=1
    )
    return write_synthetic_slide(tmp_path_factory.mktemp("flawed") / "flawed.svs", spec)


def _config(checkpoint, **scoring):
    return PipelineConfig(model=str(checkpoint), tiling=TilingConfig(min_tissue=0.05), scoring=ScoringConfig(**scoring))


def test_run_records_qc_and_stain_and_keeps_flagged_tiles_out_of_regions(tmp_path, colour_checkpoint, flawed):
    summary = run_slide(flawed.path, tmp_path, _config(colour_checkpoint), progress=False)
    record = json.loads(summary.layout.run_json.read_text())
    qc, stain = record["qc"], record["stain"]
    assert qc["mode"] == "flag" and qc["tiles_flagged"]["blur"] > 0
    assert 0 < qc["percent_of_tissue"]["blur"] < 100 and qc["areas_um2"]["ink"] > 0 and qc["ink_mm2"] > 0
    assert stain["slide"] is not None and stain["normalised"] == "none"
    assert stain["distance"]["h_angle_deg"] >= 0
    assert stain["out_of_distribution"] is None  # the colour scorer's card records no training stain
    assert record["outputs"]["qc"] == "qc.png" and (tmp_path / "qc.png").exists()
    tiles = check_file(summary.layout.tiles_geojson())
    measurements = tiles[0]["properties"]["measurements"]
    assert {"QC blur", "QC fold", "QC ink", "QC flagged"} <= set(measurements)
    flagged = [f for f in tiles if f["properties"]["measurements"]["QC flagged"] == 1.0]
    assert len(flagged) == TileStore(summary.layout.tiles_store).qc_flags().astype(bool).sum() > 0
    regions = [shapely.geometry.shape(f["geometry"]) for f in check_file(summary.layout.tumour_geojson())]
    centres = [shapely.geometry.shape(f["geometry"]).centroid for f in flagged]
    inside = sum(region.contains(centre) for region in regions for centre in centres)
    assert inside == 0, "a QC-flagged tile's centre lies in a tumour region"
    overlay = np.asarray(Image.open(summary.layout.overlay_png).convert("RGB"))
    assert (np.abs(overlay.astype(int) - HATCH_RGB).sum(axis=-1) < 30).sum() > 50, "flagged tiles are hatched"


def test_stain_normalised_run_scores_and_says_so(tmp_path, colour_checkpoint, flawed):
    summary = run_slide(flawed.path, tmp_path, _config(colour_checkpoint, stain_normalise="macenko"), progress=False)
    record = json.loads(summary.layout.run_json.read_text())
    assert record["stain"]["normalised"] == "macenko"
    assert record["stain"]["reference_source"] == "published Macenko H&E reference"  # the card records none
    assert record["stain"]["out_of_distribution"] is None  # not judged against a target no model was trained on
    scores = TileStore(summary.layout.tiles_store).positive_scores()
    assert np.isfinite(scores).all() and len(scores) == record["counts"]["tiles"]


def test_exclude_mode_leaves_blurred_tiles_out_of_the_geojson(tmp_path, colour_checkpoint, flawed):
    config = PipelineConfig(model=str(colour_checkpoint), tiling=TilingConfig(min_tissue=0.05, qc={"mode": "exclude"}))
    summary = run_slide(flawed.path, tmp_path, config, progress=False)
    store = TileStore(summary.layout.tiles_store)
    blurred = int(((store.qc_flags() & BLUR) > 0).sum())
    assert blurred > 0
    assert len(check_file(summary.layout.tiles_geojson())) == store.info.n_tiles - blurred


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
