"""Attention MIL from slide labels (issue 31): the model, the metrics and their bootstrap intervals, `mil
train` and `mil evaluate` through the console script, `run --mil`, and the bad input each refuses."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.test_cli_commands import ok, wsi_dala
from wsi_dala.model import write_untrained_checkpoint
from wsi_dala.model.mil import GatedAttentionMIL
from wsi_dala.model.mil_card import read_mil_card
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.slide_metrics import sensitivity_at_specificity, slide_metrics

CLASSES = ("Non-tumor", "Tumor")


def test_attention_is_a_distribution_over_the_tiles_and_the_bag_order_does_not_matter():
    torch.manual_seed(0)
    model = GatedAttentionMIL(16).eval()
    bag = torch.randn(30, 16)
    with torch.no_grad():
        logits, attention = model(bag)
        order = torch.randperm(30)
        shuffled_logits, shuffled_attention = model(bag[order])
    assert logits.shape == (2,) and attention.shape == (30,)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6) and bool((attention > 0).all())
    assert torch.allclose(logits, shuffled_logits, atol=1e-5)
    assert torch.allclose(attention[order], shuffled_attention, atol=1e-6)


def test_slide_metrics_and_their_bootstrap_intervals():
    rng = np.random.default_rng(1)
    tumour = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    probability = np.clip(np.where(tumour, 0.7, 0.3) + rng.normal(0, 0.15, 60), 0, 1)
    metrics = slide_metrics(probability, tumour)
    for name in ("auc", "balanced_accuracy", "sensitivity_at_95_specificity", "ece"):
        value = metrics[name]
        assert value["low"] <= value["value"] <= value["high"], name
        assert value["high"] - value["low"] > 0.01, name  # 60 slides: a real interval, not a point
    assert 0.9 < metrics["auc"]["value"] < 1.0
    # Perfect separation: sensitivity 1 at any specificity; one tumour slide below every tumour-free one: 29/30.
    assert sensitivity_at_specificity(np.r_[0.9, 0.8, 0.1, 0.2], np.r_[True, True, False, False]) == 1.0
    scores = np.r_[np.linspace(0.6, 0.9, 29), 0.05, np.linspace(0.1, 0.5, 30)]
    assert sensitivity_at_specificity(scores, tumour) == pytest.approx(29 / 30)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Ten small slides (five with tumour), a tiny ResNet18 classifier, and its backbone's features of each
    slide through `wsi-dala features --model`."""
    root = tmp_path_factory.mktemp("mil")
    rows = ["slide,label"]
    for i in range(10):
        tumour = i % 2 == 0
        spec = SyntheticSlideSpec(
            width=2048, height=1536, mpp=0.5, seed=90 + i, tumour_regions=3 if tumour else 0, pen_marks=False
        )
        write_synthetic_slide(root / "slides" / f"case{i}.svs", spec)
        rows.append(f"case{i}.svs,{CLASSES[1] if tumour else CLASSES[0]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    model = write_untrained_checkpoint(root / "r18.safetensors", "resnet18", 32, 4.0, CLASSES)
    result = ok(wsi_dala("features", root / "slides", "--model", model, "--out", root / "features", "-q"))
    assert result.stdout.count("x 512") == 10, result.stdout
    return root


@pytest.mark.slow
def test_mil_train_cross_validates_by_slide_and_writes_a_card_with_thresholds(stored, tmp_path):
    out = tmp_path / "mil"
    flags = ("--labels", stored / "labels.csv", "--features", stored / "features", "--out", out)
    result = ok(wsi_dala("mil", "train", *flags, "--cv-folds", "3", "--epochs", "15"))
    assert "slide AUC" in result.stdout and "trained in" in result.stdout
    card = read_mil_card(out / "mil.safetensors")
    assert card.encoder["architecture"] == "resnet18" and card.in_dim == 512 and card.positive_class == "Tumor"
    assert card.slide_thresholds["measure"] == "slide_probability" and card.training["folds"] == 3
    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    assert len(rows) == 10 and {row["fold"] for row in rows} == {"0", "1", "2"}
    for fold in "012":  # stratified: each fold holds both classes
        assert {row["tumour"] for row in rows if row["fold"] == fold} == {"0", "1"}
    metrics = json.loads((out / "slide_metrics.json").read_text())
    assert metrics["slides"] == 10 and metrics["auc"]["value"] >= 0.8  # the synthetic tumour is plain to see
    assert (out / "slide_roc.png").stat().st_size > 5000

    # evaluate: the pooled predictions, and the model applied to the same slides' features
    pooled = ok(wsi_dala("mil", "evaluate", "--predictions", out / "oof_predictions.csv", "--out", tmp_path / "e1"))
    assert f"{metrics['auc']['value']:.3f}" in pooled.stdout
    applied = ok(wsi_dala("mil", "evaluate", "--model", out / "mil.safetensors", *flags[:4], "--out", tmp_path / "e2"))
    assert "slide AUC" in applied.stdout
    assert json.loads((tmp_path / "e2" / "slide_metrics.json").read_text())["auc"]["value"] >= 0.9  # seen slides

    # run --mil: the run computes the features itself (its model is the MIL model's encoder)
    slide = stored / "slides" / "case0.svs"
    run_out = tmp_path / "run"
    ok(
        wsi_dala(
            "run",
            slide,
            "--model",
            stored / "r18.safetensors",
            "--mil",
            out / "mil.safetensors",
            "--out",
            run_out,
            "-q",
            timeout_s=300,
        )
    )
    record = json.loads((run_out / "run.json").read_text())
    assert record["mil"]["features_computed_by_run"] and 0 <= record["mil"]["slide_probability"] <= 1
    assert record["slide_answer"]["slide_probability"] == pytest.approx(record["mil"]["slide_probability"], abs=1e-6)
    assert "attention" in record["heatmap"]["layers"] and (run_out / "attention.png").stat().st_size > 5000
    tiles = json.loads((run_out / "case0.tiles.geojson").read_text())["features"]
    attention = [t["properties"]["measurements"]["MIL attention (x even share)"] for t in tiles]
    assert len(attention) == record["counts"]["tiles"] and math.isclose(np.mean(attention), 1.0, rel_tol=1e-3)

    # batch --mil: each slide's MIL probability in the review list; the features stored as the batch goes
    import shutil

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("case0.svs", "case1.svs"):
        shutil.copy2(stored / "slides" / name, archive / name)
    batch = tmp_path / "batch"
    flags = ("--model", stored / "r18.safetensors", "--mil", out / "mil.safetensors", "--out", batch, "-q")
    ok(wsi_dala("batch", archive, *flags, timeout_s=300))
    rows = list(csv.DictReader((batch / "review.csv").open(encoding="utf-8")))
    assert len(rows) == 2 and all(0 <= float(row["slide_probability"]) <= 1 for row in rows)
    assert len(list(batch.glob("*/features.zarr"))) == 2


def _refused_in_process(capsys, phrase: str, *argv: object) -> None:
    """The command run in this process (faster than the console script, which the good paths go through)."""
    from wsi_dala.cli import main

    code = main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("wsi-dala: error: ") and phrase in lines[0], lines


def test_mil_refuses_bad_input_in_one_line(stored, tmp_path, capsys):
    features = stored / "features"
    labels = tmp_path / "labels.csv"

    def train(labels_text: str, phrase: str, *extra: object) -> None:
        labels.write_text(labels_text)
        flags = ("--labels", labels, "--features", features, "--out", tmp_path / "o", *extra)
        _refused_in_process(capsys, phrase, "mil", "train", *flags)

    train("slide,label\ncase0.svs,Tumor\nnowhere.svs,Non-tumor\n", "labels for slides without features")
    train("slide,label\ncase0.svs,Tumor\ncase2.svs,Tumor\n", "MIL needs two")
    train("slide,label\ncase0.svs,Tumor\ncase0.tif,Non-tumor\n", "listed twice")
    train("slide,label\ncase0.svs,a\ncase1.svs,b\n", "cannot tell which label is tumour")
    train("slide,label\ncase0.svs,Tumor\ncase1.svs,Non-tumor\n", "Cancer", "--tumour-label", "Cancer")
    # Features stores of another encoder: two of one slide, or one slide's of another encoder, named.
    from wsi_dala.cli import main

    other = write_untrained_checkpoint(tmp_path / "other.safetensors", "resnet18", 32, 4.0, CLASSES)
    slide1 = stored / "slides" / "case1.svs"
    assert main(["features", str(slide1), "--model", str(other), "--out", str(tmp_path / "f" / "c1"), "-q"]) == 0
    flags = ("--labels", stored / "labels.csv", "--features", tmp_path / "f", "--features", features)
    _refused_in_process(capsys, "two features stores", "mil", "train", *flags, "--out", tmp_path / "o")
    labels.write_text("slide,label\ncase0.svs,Tumor\ncase1.svs,Non-tumor\n")
    case0 = next(features.glob("case0-*"))
    flags = ("--labels", labels, "--features", case0, "--features", tmp_path / "f")
    _refused_in_process(capsys, "a features store of another encoder", "mil", "train", *flags, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    _refused_in_process(capsys, "give --predictions CSV, or --model", "mil", "evaluate", "--out", tmp_path / "e")
    run_flags = ("--model", other, "--mil", stored / "labels.csv", "--out", tmp_path / "r")
    _refused_in_process(capsys, "labels.csv", "run", slide1, *run_flags)
    assert not (tmp_path / "r").exists()
