"""Temperature scaling and calibration metrics: the fit finds a known temperature, the measures match hand
computation, training writes its calibration into the model card, `calibrate` and `evaluate` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import QUICK
from tests.images import write_blob_folder
from wsi_dala.cli import main
from wsi_dala.core.config import TrainConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.model import read_card, write_untrained_checkpoint
from wsi_dala.model.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    bound_warning,
    brier,
    calibration_folds,
    calibration_report,
    ece,
    fit_temperature,
    nll,
    nll_logits,
    reliability_bins,
    softmax,
)
from wsi_dala.training.datasets import image_folder_samples
from wsi_dala.training.train import train_model

# Four tiles, two classes: confidences 0.9, 0.6, 0.7, 0.8; the second is wrong.
PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
LABELS = np.array([0, 1, 1, 1])


def _sampled_at_temperature(temperature: float, n: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / T): data whose true temperature is T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 4.0, size=(n, 3))
    cumulative = softmax(logits, temperature).cumsum(axis=1)
    labels = (cumulative < rng.random(n)[:, None]).sum(axis=1)
    return logits, np.minimum(labels, 2)


def test_fit_recovers_a_known_temperature_and_lowers_nll():
    logits, labels = _sampled_at_temperature(2.5)
    temperature = fit_temperature(logits, labels, "synthetic")
    assert temperature == pytest.approx(2.5, abs=0.2)
    assert nll_logits(logits, labels, temperature) < nll_logits(logits, labels) - 0.05
    report = calibration_report(logits, labels, "synthetic")
    assert report.n == 5000 and report.after.ece < report.before.ece and report.after.nll < report.before.nll
    assert set(report.to_dict()["before"]) == {"ece", "brier", "nll"}


def test_fit_also_recovers_a_temperature_below_one():
    logits, labels = _sampled_at_temperature(0.5, seed=1)
    assert fit_temperature(logits, labels, "synthetic") == pytest.approx(0.5, abs=0.05)


def _slides(n: int, n_slides: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """A slide name and a level-0 position per tile."""
    rng = np.random.default_rng(seed)
    return [f"slide{i % n_slides}" for i in range(n)], rng.uniform(0, 20000, size=(n, 2))


def test_an_over_confident_model_gets_a_temperature_that_helps_on_held_out_tiles():
    """Logits of a calibrated model, x3: the cross-validated fit must find T > 1, and the held-out ECE must fall
    (so "always T = 1" cannot pass)."""
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, 3000)
    labels = (rng.random(3000) < 1 / (1 + np.exp(-z))).astype(np.int64)
    logits = np.stack([np.zeros_like(z), 3.0 * z], axis=1)
    for n_slides, by in ((5, "slides"), (2, "spatial blocks within slides")):
        groups, positions = _slides(3000, n_slides)
        folds = calibration_folds(labels, groups, positions)
        assert folds[1] == by
        report = calibration_report(logits, labels, "over-confident", folds=folds)
        held = report.held_out
        assert held is not None and held.helps and report.note is None
        assert report.temperature == pytest.approx(3.0, rel=0.15)
        assert held.after.ece < 0.5 * held.before.ece and held.after.brier < held.before.brier
        assert report.to_dict()["held_out"]["helps"] is True


def test_a_fit_that_does_not_help_on_held_out_tiles_is_not_kept():
    """A calibrated model, and a dozen tiles labelled against it with huge logits (annotation edges): the NLL
    fit raises T for the dozen and leaves the rest under-confident. Held out, NLL falls but ECE and Brier rise:
    T stays 1, and the report says why."""
    rng = np.random.default_rng(4)
    n = 2000
    z = rng.normal(0.0, 3.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    wrong = rng.choice(n, 12, replace=False)
    z[wrong] = np.where(labels[wrong] == 1, -25.0, 25.0)
    logits = np.stack([np.zeros(n), z], axis=1)
    groups, positions = _slides(n, 4)
    report = calibration_report(logits, labels, "noisy labels", folds=calibration_folds(labels, groups, positions))
    held = report.held_out
    assert report.fitted is not None and report.fitted > 1.3, "the NLL fit alone raises T"
    assert held is not None and held.after.nll < held.before.nll and held.after.ece > held.before.ece
    assert report.temperature == 1.0 and not held.helps
    assert report.note is not None and "not both better, so T = 1" in report.note
    assert report.after == report.before


def test_folds_follow_slides_then_blocks_then_chance():
    labels = np.array([0, 1] * 30)
    by_slide, _ = calibration_folds(labels, [f"s{i % 3}" for i in range(60)], None)
    assert all(len(set(by_slide[[j for j in range(60) if j % 3 == i]])) == 1 for i in range(3)), "a slide is one fold"
    positions = np.stack([np.tile([0.0, 10.0], 30), np.repeat([0.0, 10.0], 30)], axis=1)
    blocks, by = calibration_folds(labels, ["one"] * 60, positions)
    assert by == "spatial blocks within slides" and set(blocks.tolist()) == {0, 1, 2, 3}
    assert calibration_folds(labels, ["one"] * 60, None)[1] == "random folds"


def test_data_classified_all_right_is_confident_never_certain_and_uninformative_logits_flagged():
    """n right out of n: Laplace's rule puts the error rate at 1/(n+2); T is where the model's mean
    confidence in the true class says so — also when a few tiles have enormous margins."""
    rng = np.random.default_rng(3)
    labels = np.arange(200) % 2
    margins = np.r_[rng.uniform(10.0, 20.0, size=190), rng.uniform(300, 500, size=10)]  # all right, some hugely
    separated = np.stack([-margins / 2, margins / 2], axis=1) * np.where(labels == 1, 1, -1)[:, None]
    temperature = fit_temperature(separated, labels, "easy")
    report = calibration_report(separated, labels, "easy")
    true_class = np.exp(-np.logaddexp(0, -margins / temperature))  # sigmoid(margin / T)
    assert 1.0 < temperature < 10.0 and report.smoothing == pytest.approx(1 / 202)
    assert true_class.mean() == pytest.approx(1 - 1 / 202, abs=1e-6)  # confident, not certain
    assert report.after.ece < 0.01 and report.after.nll > report.before.nll  # honest about a finite sample
    uninformative = fit_temperature(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]), "random")
    assert "no information" in (bound_warning(uninformative) or "") and bound_warning(2.0) is None


def test_brier_nll_ece_by_hand():
    # Σ_c (p_c − y_c)²: 0.02, 0.72, 0.18, 0.08 -> mean 0.25 (the multi-class form, twice the binary one).
    assert brier(PROBS, LABELS) == pytest.approx(0.25)
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4)
    # 15 bins: each tile alone in its bin, so ECE is the mean |correct − confidence| = (0.1+0.6+0.3+0.2)/4.
    assert ece(PROBS, LABELS) == pytest.approx(0.3)
    # 2 bins: all four in (0.5, 1]: accuracy 3/4, mean confidence 3/4: perfectly calibrated on average.
    assert ece(PROBS, LABELS, bins=2) == pytest.approx(0.0)
    binned = reliability_bins(PROBS, LABELS, bins=2)
    assert binned.count.tolist() == [0, 4] and binned.accuracy[1] == pytest.approx(0.75)
    assert np.isnan(binned.confidence[0])


def test_nll_from_logits_is_exact_where_probabilities_underflow():
    logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
    assert nll_logits(logits, np.array([1, 0])) == pytest.approx((1000.0 + math.log(2)) / 2)
    assert nll_logits(logits, np.array([1, 0]), temperature=10.0) == pytest.approx(
        (100.0 + math.log1p(math.exp(-100.0)) + math.log(2)) / 2
    )
    assert np.isfinite(nll(softmax(logits), np.array([1, 0])))


def test_single_class_and_empty_data_are_refused_in_one_line():
    logits = np.zeros((57, 2))
    with pytest.raises(ConfigError) as refused:
        fit_temperature(logits, np.ones(57, dtype=int), "DIR", ["Non-tumor", "Tumor"])
    assert str(refused.value) == "DIR: calibration needs tiles of at least two classes; all 57 are 'Tumor'"
    with pytest.raises(ConfigError, match="DIR: calibration needs labelled tiles; there are none"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int), "DIR")


def test_model_card_refuses_a_temperature_the_fit_cannot_give():
    from wsi_dala.core.errors import CheckpointError
    from wsi_dala.model import ModelCard

    def card(temperature: float) -> ModelCard:
        return ModelCard("dalaresnet50", ["Non-tumor", "Tumor"], "Tumor", 224, 0.5, temperature=temperature)

    card(MIN_TEMPERATURE).validate()
    card(MAX_TEMPERATURE).validate()
    for bad in (MIN_TEMPERATURE / 2, MAX_TEMPERATURE * 2, float("nan"), 0.0):
        with pytest.raises(CheckpointError, match="temperature"):
            card(bad).validate()


def test_training_measures_the_cam_profile_even_where_every_validation_tile_is_right(blob_model):
    """The blob model gets all its validation tiles right: a temperature is fitted for Laplace's rule, then
    judged on held-out folds, where sharper is always better when nothing is wrong: T stays 1 and the card says
    why. The CAM profile is measured all the same."""
    result, out = blob_model
    card = read_card(result.checkpoint)
    n_val = card.validation_metrics["n"]
    assert card.validation_metrics["accuracy"] == 1.0  # re-saving kept the rest of the card
    assert card.temperature == 1.0 and card.calibration["fitted_temperature"] > 1.0
    assert card.calibration["held_out"]["helps"] is False and "T = 1" in card.calibration["note"]
    profile = np.asarray(card.cam_profile)
    assert profile.shape == (3, 3) and profile.mean() == pytest.approx(1.0, rel=0.05)
    assert 0 < card.calibration["cam_profile_tiles"] < n_val
    assert (out / "reliability.png").exists()


def _tiny_split(tmp_path):
    root = write_blob_folder(tmp_path / "data", size=32, n=24, groups=4)
    samples, names = image_folder_samples(root)
    train = [s for s in samples if s.group in ("slide0", "slide1")]
    val = [s for s in samples if s.group in ("slide2", "slide3")]
    return train, val, names


def test_training_calibrates_at_the_end_also_when_resumed_with_nothing_left(tmp_path):
    """One short run, three calls: validation of one class leaves the model uncalibrated; the same run
    (nothing left to train) with two-class validation calibrates the best checkpoint; once more gives the same
    card, because the fit starts from the checkpoint's raw logits, not from scaled ones."""
    train, val, names = _tiny_split(tmp_path)
    tumour_only = [s for s in val if names[s.label] == "tumour"]
    config = TrainConfig(input_size=32, epochs=1, **QUICK)
    run = tmp_path / "run"
    result = train_model(train, tumour_only, names, "tumour", config, run, {"mpp": None}, progress=False)
    card = read_card(result.checkpoint)
    assert card.temperature is None and card.cam_profile is None
    assert card.calibration == {
        "skipped": f"validation split: calibration needs tiles of at least two classes; all {len(tumour_only)} are "
        "'tumour'"
    }
    assert not (run / "reliability.png").exists()

    resumed = train_model(train, val, names, "tumour", config, run, {"mpp": None}, progress=False)
    assert resumed.resumed_from_epoch == 1
    card = read_card(resumed.checkpoint)
    assert card.temperature is not None and card.calibration["n_tiles"] == len(val)
    assert card.cam_profile == [[1.0]]  # 32 px: a 1 x 1 feature map
    assert (run / "reliability.png").exists()
    again = read_card(train_model(train, val, names, "tumour", config, run, {"mpp": None}, progress=False).checkpoint)
    assert again.temperature == card.temperature and again.calibration == card.calibration
    assert again.validation_metrics == card.validation_metrics


@pytest.fixture()
def untrained_32(tmp_path):
    return write_untrained_checkpoint(
        tmp_path / "untrained.safetensors", tile_size_px=32, class_names=("normal", "tumour"), positive_class="tumour"
    )


def test_calibrate_cli_writes_a_new_checkpoint_and_evaluate_reports_both(tmp_path, capsys, untrained_32):
    root = write_blob_folder(tmp_path / "data", size=32, n=24, groups=4)
    before = untrained_32.read_bytes()
    out = tmp_path / "cal"
    code = main(["calibrate", "--model", str(untrained_32), "--folder", str(root), "--out", str(out), "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "temperature:" in printed and "ECE" in printed and "->" in printed
    assert untrained_32.read_bytes() == before  # the input is never touched
    card = read_card(out / "calibrated.safetensors")
    summary = json.loads((out / "calibration.json").read_text())
    assert card.temperature == pytest.approx(summary["temperature"]) and summary["n_tiles"] == 24
    assert card.calibration["fitted_on"].startswith("image folder")
    assert (out / "reliability.png").stat().st_size > 1000

    calibrated = str(out / "calibrated.safetensors")
    code = main(["evaluate", "--model", calibrated, "--folder", str(root), "--out", str(tmp_path / "ev"), "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and f"temperature {card.temperature:.4g} from the model card" in printed
    section = json.loads((tmp_path / "ev" / "metrics.json").read_text())["calibration"]
    assert section["status"] == "calibrated" and section["after"]["nll"] <= section["before"]["nll"] + 1e-9
    # The same tiles, the same raw logits (to the last bits: calibrate runs the head in fp32, as scoring does).
    assert section["before"]["ece"] == pytest.approx(summary["before"]["ece"], abs=1e-3)
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000

    code = main(["evaluate", "--model", str(untrained_32), "--folder", str(root), "--out", str(tmp_path / "raw"), "-q"])
    printed = capsys.readouterr().out
    section = json.loads((tmp_path / "raw" / "metrics.json").read_text())["calibration"]
    assert code == 0 and "uncalibrated" in printed and section["status"] == "uncalibrated" and section["after"] is None


def test_calibrate_cli_refuses_single_class_data_and_its_own_output(tmp_path, capsys, untrained_32):
    root = write_blob_folder(tmp_path / "data", size=32, n=12, groups=4)
    for image in (root / "normal").iterdir():
        image.unlink()
    out = tmp_path / "cal"
    code = main(["calibrate", "--model", str(untrained_32), "--folder", str(root), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "calibration needs tiles of at least two classes; all 6 are 'tumour'" in err[0] and str(root) in err[0]
    assert not out.exists()
    inside = tmp_path / "ckpt"
    inside.mkdir()
    target = inside / "calibrated.safetensors"
    target.write_bytes(untrained_32.read_bytes())
    root_two = write_blob_folder(tmp_path / "two", size=32, n=8, groups=4)
    code = main(["calibrate", "--model", str(target), "--folder", str(root_two), "--out", str(inside), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is the input checkpoint" in err[0]


def test_calibrate_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["calibrate", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--out", "--split-from", "--batch-size", "--device", "--precision", "--folder"):
        assert option in text
    assert "(default: 32)" in text and "(default: auto)" in text and "never modified" in text


def test_sharpening_needs_other_slides_to_confirm_it():
    """An under-confident model (calibrated logits / 3): with five validation slides held out in turn, T ~ 1/3
    is kept; with two (spatial blocks within them) it is not, and the report says why."""
    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 3.0, 3000)
    labels = (rng.random(3000) < 1 / (1 + np.exp(-z))).astype(np.int64)
    logits = np.stack([np.zeros_like(z), z / 3.0], axis=1)
    five = calibration_report(logits, labels, "five slides", folds=calibration_folds(labels, *_slides(3000, 5)))
    assert five.temperature == pytest.approx(1 / 3, rel=0.15) and five.held_out is not None and five.held_out.helps
    two = calibration_report(logits, labels, "two slides", folds=calibration_folds(labels, *_slides(3000, 2)))
    assert two.temperature == 1.0 and two.fitted is not None and two.fitted < 0.5
    assert two.note is not None and "sharpen" in two.note
