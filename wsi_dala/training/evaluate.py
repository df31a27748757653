"""Evaluate a checkpoint on labelled tiles: metrics overall and per magnification, calibration (ECE, Brier,
NLL at T = 1 and at the card's temperature), confusion and reliability PNGs, JSON and a table. Or calibrate
it on them: the same pass, a temperature fitted instead of reported, written into a new checkpoint.

File names come from :class:`wsi_dala.core.layout.EvalLayout` and :class:`wsi_dala.core.layout.CalibrateLayout`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from wsi_dala.core.errors import ConfigError, OutputError
from wsi_dala.core.fileio import ensure_writable_dir, write_json_atomic
from wsi_dala.core.layout import CalibrateLayout, EvalLayout
from wsi_dala.model import ModelCard, load_checkpoint, save_checkpoint
from wsi_dala.model.calibration import ECE_BINS, calibration_metrics, check_labels, reliability_bins, softmax
from wsi_dala.model.devices import pick_device
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.tissue.stain import StainProfile
from wsi_dala.training.calibrate import (
    Calibration,
    CamProfile,
    calibrated_card,
    fit_calibration,
    positive_cam_profile,
    sample_folds,
    write_reliability,
)
from wsi_dala.training.datasets import Sample
from wsi_dala.training.loaders import make_loader
from wsi_dala.training.metrics import classification_metrics, format_table
from wsi_dala.training.plots import plot_confusion, plot_reliability
from wsi_dala.training.predict import Predictions, predict
from wsi_dala.training.session import training_stain


def _evaluation_stain(card: ModelCard, samples: list[Sample]) -> StainNormaliser | None:
    """A model trained on stain-normalised batches sees evaluation images mapped the same way: from the
    evaluation set's own stain to the card's reference."""
    method = card.training_data.get("stain_normalise", "none")
    if method == "none" or card.stain_reference is None:
        return None
    measured = training_stain(samples)
    if measured is None:
        raise ConfigError(
            f"{Path(samples[0].source).parent if samples else 'evaluation data'}: the evaluation images' stain "
            "could not be measured, and this model was trained on stain-normalised tiles"
        )
    return StainNormaliser(
        method,
        StainProfile.from_dict(measured, "evaluation images"),
        StainProfile.from_dict(card.stain_reference, "model card stain reference"),
    )


@dataclass(frozen=True)
class _Run:
    """How to run a checkpoint over labelled tiles."""

    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True


def _checkpoint_predictions(
    checkpoint: str | Path, samples: list[Sample], class_names: list[str], run: _Run, cams: bool
) -> tuple[nn.Module, ModelCard, Predictions]:
    """Load ``checkpoint`` and run it once over ``samples`` (raw logits; CAMs of the positive class if asked)."""
    torch_device = pick_device(run.device)
    model, card = load_checkpoint(checkpoint, torch_device)
    if list(class_names) != list(card.class_names):
        raise ConfigError(f"{checkpoint}: model classes {card.class_names} differ from the data's {class_names}")
    loader = make_loader(
        samples, input_size=card.tile_size_px, batch_size=run.batch_size, train=False, n_classes=len(class_names)
    )
    predictions = predict(
        model,
        loader,
        torch_device,
        card.normalisation["mean"],
        card.normalisation["std"],
        precision=run.precision,
        progress=run.progress,
        stain=_evaluation_stain(card, samples),
        cam_class=card.positive_index if cams else None,
    )
    return model, card, predictions


def evaluate_checkpoint(
    checkpoint: str | Path,
    samples: list[Sample],
    class_names: list[str],
    out_dir: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
    precision: str = "auto",
) -> tuple[dict[str, Any], str]:
    """Metrics dict (also written to the layout's metrics JSON) and the printable table.

    ``precision``: ``auto`` (fp16 autocast on CUDA, bf16 on a CPU with native bf16, else fp32), ``fp32``,
    ``bf16`` or ``fp16`` (see :mod:`wsi_dala.model.devices`).
    """
    layout = EvalLayout(Path(out_dir))
    ensure_writable_dir(layout.root)
    run = _Run(batch_size, device, precision, progress)
    _, card, predictions = _checkpoint_predictions(checkpoint, samples, class_names, run, cams=False)
    probabilities, labels = predictions.probabilities, predictions.labels
    predicted = probabilities.argmax(1)
    overall = classification_metrics(labels, predicted, class_names, card.positive_index, probabilities)
    calibration, calibration_text = _calibration_section(
        predictions, card.temperature, layout.reliability_png, (card.calibration or {}).get("note")
    )
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "overall": overall,
        "calibration": calibration,
        "per_magnification": {},
    }
    tables = [format_table(overall, f"all images (n={len(labels)})") + "\n" + calibration_text]
    plot_confusion(layout.confusion_png(), overall["confusion_matrix"], class_names)
    by_mag: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        if sample.magnification:
            by_mag[sample.magnification].append(i)
    if len(by_mag) > 1:
        for mag in sorted(by_mag, key=lambda m: int(m.rstrip("X"))):
            idx = np.array(by_mag[mag])
            metrics = classification_metrics(
                labels[idx], predicted[idx], class_names, card.positive_index, probabilities[idx]
            )
            result["per_magnification"][mag] = metrics
            tables.append(format_table(metrics, f"{mag} (n={len(idx)})"))
            plot_confusion(layout.confusion_png(mag), metrics["confusion_matrix"], class_names, mag)
    write_json_atomic(layout.metrics_json, result)
    return result, "\n\n".join(tables)


def _calibration_section(
    predictions: Predictions, temperature: float | None, figure: Path, note: str | None = None
) -> tuple[dict[str, Any], str]:
    """ECE, Brier and NLL at T = 1 and, when the card has one, at its temperature, on these tiles (held out
    from the fit, unless they are the tiles it was fitted on); the reliability diagram. ``note``: the card's
    word on its temperature (why it stayed 1)."""
    logits, labels = predictions.logits, predictions.labels
    before = calibration_metrics(logits, labels)
    after = calibration_metrics(logits, labels, temperature) if temperature is not None else None
    section = {
        "status": "uncalibrated" if temperature is None else "calibrated",
        "temperature": temperature,
        "bins": ECE_BINS,
        "before": before.to_dict(),
        "after": after.to_dict() if after is not None else None,
    }
    head = f"calibration ({len(labels)} tiles, {ECE_BINS} bins): "
    if after is None or temperature is None:
        curves = [("uncalibrated (T = 1)", reliability_bins(softmax(logits), labels))]
        text = head + f"uncalibrated (no temperature in the model card)\n  ECE {before.ece:.4f}  "
        text += f"Brier {before.brier:.4f}  NLL {before.nll:.4f}"
    else:
        curves = [
            ("before (T = 1)", reliability_bins(softmax(logits), labels)),
            (f"after (T = {temperature:.3g})", reliability_bins(softmax(logits, temperature), labels)),
        ]
        text = head + f"temperature {temperature:.4g} from the model card, on these held-out tiles\n"
        if note:
            text += f"  ({note})\n"
        text += f"  ECE {before.ece:.4f} -> {after.ece:.4f}  Brier {before.brier:.4f} -> {after.brier:.4f}  "
        text += f"NLL {before.nll:.4f} -> {after.nll:.4f}"
    plot_reliability(figure, curves, f"Reliability: {len(labels)} tiles, {ECE_BINS} bins")
    return section, text


def calibrate_checkpoint(
    checkpoint: str | Path,
    samples: list[Sample],
    class_names: list[str],
    out_dir: str | Path,
    fitted_on: str,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
    precision: str = "auto",
) -> tuple[Calibration, CamProfile]:
    """Fit the temperature and CAM profile of ``checkpoint`` on ``samples`` and write a new checkpoint (same
    weights, updated card), the reliability diagram and the calibration JSON (last) into ``out_dir``.

    Refused before anything is written: data that fits no temperature (no tiles, one class;
    ``fitted_on`` names it in the error), an output that would replace the input checkpoint.
    """
    layout = CalibrateLayout(Path(out_dir))
    check_labels(np.array([s.label for s in samples]), fitted_on, class_names)
    if layout.checkpoint.resolve() == Path(checkpoint).resolve():
        raise OutputError(f"{layout.checkpoint}: is the input checkpoint; give calibrate another --out")
    run = _Run(batch_size, device, precision, progress)
    model, card, predictions = _checkpoint_predictions(checkpoint, samples, class_names, run, cams=True)
    calibration = fit_calibration(predictions, class_names, fitted_on, folds=sample_folds(samples, predictions.labels))
    profile = positive_cam_profile(predictions, card.positive_index)
    ensure_writable_dir(layout.root)
    save_checkpoint(layout.checkpoint, model, calibrated_card(card, calibration, profile, fitted_on))
    write_reliability(layout.reliability_png, calibration, fitted_on)
    write_json_atomic(
        layout.calibration_json,
        {
            "checkpoint": str(checkpoint),
            "calibrated_checkpoint": str(layout.checkpoint),
            "temperature": calibration.report.temperature,
            **calibration.record(fitted_on),
            "cam_profile": profile.card_value(),
            "cam_profile_tiles": profile.n_tiles,
            "reliability": {"before": calibration.before.to_dict(), "after": calibration.after.to_dict()},
        },
    )
    return calibration, profile
