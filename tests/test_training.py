"""Training: DALAResNet50 learns, training resumes reproducibly, imbalance weights, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import QUICK
from tests.images import write_blob_folder, write_breakhis_tree
from wsi_dala.cli import main
from wsi_dala.core.config import TrainConfig
from wsi_dala.model import read_card
from wsi_dala.training.datasets import image_folder_samples
from wsi_dala.training.losses import class_balanced_weights
from wsi_dala.training.splits import group_split
from wsi_dala.training.train import train_model


def test_dalaresnet50_learns_synthetic_data(blob_model):
    result, out = blob_model
    assert result.best_metrics["accuracy"] >= 0.95
    assert result.best_metrics["binary"]["gmean"] >= 0.95
    card = read_card(result.checkpoint)
    assert card.positive_class == "tumour" and card.tile_size_px == 96 and card.mpp == 0.5
    assert card.validation_metrics["accuracy"] >= 0.95
    assert (out / "curves.png").stat().st_size > 1000
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 1 + len(result.history)
    summary = json.loads((out / "train.json").read_text())
    assert set(summary["train_groups"]).isdisjoint(summary["val_groups"])


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    root = write_blob_folder(tmp_path / "data", size=32, n=48, groups=4)
    samples, names = image_folder_samples(root)
    train, val = group_split([s.label for s in samples], [s.group for s in samples], 0.5, seed=0)
    train_s, val_s = [samples[i] for i in train], [samples[i] for i in val]
    config = TrainConfig(input_size=32, epochs=2, **QUICK)
    straight = train_model(train_s, val_s, names, "tumour", config, tmp_path / "a", {"mpp": None}, progress=False)

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(
            train_s,
            val_s,
            names,
            "tumour",
            config,
            tmp_path / "b",
            {"mpp": None},
            progress=False,
            on_epoch_end=stop_after_first,
        )
    resumed = train_model(train_s, val_s, names, "tumour", config, tmp_path / "b", {"mpp": None}, progress=False)
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_card_records_the_training_stain_and_normalised_training_maps_to_the_reference(tmp_path):
    from wsi_dala.tissue.stain import REFERENCE_PROFILE, StainProfile

    root = write_blob_folder(tmp_path / "data", size=32, n=24, groups=4)
    samples, names = image_folder_samples(root)
    train, val = group_split([s.label for s in samples], [s.group for s in samples], 0.5, seed=0)
    train_s, val_s = [samples[i] for i in train], [samples[i] for i in val]
    plain = TrainConfig(input_size=32, epochs=1, **QUICK)
    result = train_model(train_s, val_s, names, "tumour", plain, tmp_path / "plain", {"mpp": None}, progress=False)
    card = read_card(result.checkpoint)
    measured = StainProfile.from_dict(card.stain_reference, "card")
    assert measured.n_pixels > 100 and card.training_data["stain_normalise"] == "none"
    normalised = plain.model_copy(update={"stain_normalise": "macenko"})
    result = train_model(train_s, val_s, names, "tumour", normalised, tmp_path / "norm", {"mpp": None}, progress=False)
    card = read_card(result.checkpoint)
    assert card.stain_reference == REFERENCE_PROFILE.to_dict() and card.training_data["stain_normalise"] == "macenko"
    assert np.isfinite(result.history[0]["train_loss"])


def test_class_balanced_weights():
    weights = class_balanced_weights([100, 10], beta=0.999)
    effective = [(1 - 0.999**100) / 0.001, (1 - 0.999**10) / 0.001]
    expected = np.array([1 / effective[0], 1 / effective[1]])
    np.testing.assert_allclose(weights.numpy(), expected / expected.sum() * 2, rtol=1e-5)
    assert float(weights.sum()) == pytest.approx(2.0)
    assert weights[1] > weights[0]


def test_train_and_evaluate_cli_on_breakhis(tmp_path, capsys):
    root = write_breakhis_tree(tmp_path, per_magnification=3)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--breakhis",
            str(root),
            "--out",
            str(run),
            "--pretrained",
            "none",
            "--input-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--lr-backbone",
            "1e-3",
            "--precise-bn-batches",
            "4",
            "--breakhis-magnification",
            "40X",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gmean" in out and "weighted avg" in out and "checkpoint:" in out
    card = read_card(run / "best.safetensors")
    assert card.mpp == 0.49 and "assumed" in card.mpp_note
    assert sum(card.training_data["counts_train"].values()) + sum(card.training_data["counts_val"].values()) == 18
    code = main(
        [
            "evaluate",
            "--model",
            str(run / "best.safetensors"),
            "--breakhis",
            str(root),
            "--out",
            str(tmp_path / "eval"),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for mag in ("40X", "100X", "200X", "400X"):
        assert f"{mag} (n=18)" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["per_magnification"]) == {"40X", "100X", "200X", "400X"}
    assert metrics["overall"]["n"] == 72
    assert (tmp_path / "eval" / "confusion.png").exists()
