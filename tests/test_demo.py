"""The demo: a DALAResNet50 trained in the test finds the planted tumour (IoU >= 0.8)."""

from __future__ import annotations

import json

import pytest

from tests.qupath_rules import check_file
from wsi_dala.demo import run_demo
from wsi_dala.model import read_card


@pytest.mark.slow
def test_demo_trains_runs_and_finds_the_tumour(tmp_path):
    messages = []
    summary, iou = run_demo(tmp_path, progress=False, say=messages.append)
    assert iou >= 0.8, f"tumour IoU {iou:.3f}"
    assert len(messages) >= 4
    card = read_card(tmp_path / "model" / "best.safetensors")
    assert card.architecture == "dalaresnet50" and card.mpp == 0.5 and card.positive_class == "Tumor"
    record = json.loads(summary.layout.run_json.read_text())
    assert record["counts"]["regions"] >= 1 and record["model"]["architecture"] == "dalaresnet50"
    check_file(summary.layout.tiles_geojson())
    check_file(summary.layout.tumour_geojson())
    assert json.loads((tmp_path / "demo.json").read_text())["tumour_iou"] == iou
