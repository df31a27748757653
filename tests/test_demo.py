"""The demo, as the README runs it: `wsi-dala demo DIR` through the console script generates slides, trains a
DALAResNet50 and finds the planted tumour (IoU >= 0.8), telling the user where to look."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.qupath_rules import check_file
from tests.test_cli_commands import ok, wsi_dala
from wsi_dala.core.layout import RunLayout
from wsi_dala.model import read_card


@pytest.mark.slow
def test_demo_trains_runs_and_finds_the_tumour(tmp_path):
    stdout = ok(wsi_dala("demo", tmp_path, "-q", timeout_s=900)).stdout
    printed = re.search(r"tumour IoU vs planted truth: ([0-9.]+)", stdout)
    assert printed and float(printed.group(1)) >= 0.8, stdout
    assert "import_wsi_dala.groovy" in stdout and str(tmp_path.resolve()) in stdout
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert round(demo["tumour_iou"], 3) == float(printed.group(1))
    card = read_card(tmp_path / "model" / "best.safetensors")
    assert card.architecture == "dalaresnet50" and card.mpp == 0.5 and card.positive_class == "Tumor"
    record = json.loads(Path(demo["run"]).read_text())
    layout = RunLayout.for_slide(Path(demo["run"]).parent, record["slide"]["path"])
    assert record["status"] == "complete" and record["counts"]["regions"] >= 1
    assert record["model"]["architecture"] == "dalaresnet50"
    check_file(layout.tiles_geojson())
    check_file(layout.tumour_geojson())
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written <= 150e6, f"the demo wrote {written / 1e6:.0f} MB"
    assert not (tmp_path / "model" / "last-state.pt").exists() and not (tmp_path / "training-tiles").exists()
    assert card.training_data["weights_stored_as"].startswith("float16")
