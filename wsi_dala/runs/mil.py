"""``wsi-dala mil train`` and ``mil evaluate``: attention MIL from slide labels and stored features, its
out-of-fold predictions, metrics with bootstrap intervals, and a card with the slide thresholds.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.core.errors import CheckpointError, ConfigError, OutputError
from wsi_dala.core.fileio import atomic_open, ensure_writable_dir, write_json_atomic
from wsi_dala.core.layout import MilLayout
from wsi_dala.model.mil_card import MIL_CARD_KEY, MilCard, read_mil_card
from wsi_dala.model.slide_thresholds import fit_slide_thresholds
from wsi_dala.training.mil import MilSettings, cross_validate, load_bags, mil_card, new_model, predict, train_bags
from wsi_dala.training.slide_labels import read_slide_labels
from wsi_dala.training.slide_metrics import slide_metrics

PREDICTION_COLUMNS = ("slide", "label", "tumour", "probability", "fold")


@dataclasses.dataclass(frozen=True)
class MilResult:
    layout: MilLayout
    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    seconds: float


def train_mil(
    labels_csv: str | Path,
    places: list[str],
    out_dir: str | Path,
    settings: MilSettings,
    positive: str | None = None,
) -> MilResult:
    """Cross-validate, fit the thresholds on the pooled out-of-fold probabilities, train on every slide, write
    the model, the predictions, the metrics and their curve, and the record (last)."""
    import torch
    from safetensors.torch import save

    started = time.perf_counter()
    layout = MilLayout(Path(out_dir))
    labels = [entry for entry in read_slide_labels(labels_csv) if entry.split != "test"]
    data = load_bags(labels, places, str(labels_csv), positive, feature=settings.feature)
    tumour = np.array([data.class_names[bag.label] == data.positive_class for bag in data.bags])
    if tumour.all() or not tumour.any():
        raise ConfigError(f"{labels_csv}: slide labels hold one class only")
    ensure_writable_dir(layout.root)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    probability, folds = cross_validate(data, settings)
    thresholds = fit_slide_thresholds(
        probability, tumour, "slide_probability", f"out-of-fold predictions on {len(labels)} slides"
    )
    metrics = slide_metrics(probability, tumour, settings.seed)
    positive_index = data.class_names.index(data.positive_class)
    final = train_bags(data.bags, positive_index, settings, settings.seed)
    training = {
        "labels": Path(labels_csv).name,
        "slides": len(labels),
        "tumour_slides": int(tumour.sum()),
        "folds": int(folds.max()) + 1,
        "settings": dataclasses.asdict(settings),
        "out_of_fold": {k: metrics[k] for k in ("auc", "balanced_accuracy", "sensitivity_at_95_specificity", "ece")},
    }
    card = mil_card(data, settings, thresholds, training)
    card.validate(str(layout.model))
    state = {k: v.detach().contiguous() for k, v in final.state_dict().items()}
    with atomic_open(layout.model, "wb") as handle:
        handle.write(save(state, metadata={MIL_CARD_KEY: card.to_json()}))
    rows = [
        {
            "slide": bag.slide,
            "label": data.class_names[bag.label],
            "tumour": int(is_tumour),
            "probability": float(p),
            "fold": int(fold),
        }
        for bag, is_tumour, p, fold in zip(data.bags, tumour, probability, folds, strict=True)
    ]
    write_predictions(layout.predictions_csv, rows)
    plot_roc(layout.roc_png, probability, tumour, metrics, "ABMIL, out-of-fold")
    write_json_atomic(layout.metrics_json, metrics)
    seconds = time.perf_counter() - started
    write_json_atomic(layout.record_json, {"card": dataclasses.asdict(card), "seconds": round(seconds, 2)})
    return MilResult(layout, metrics, thresholds, seconds)


def load_mil(path: str | Path) -> tuple[Any, MilCard]:
    """The model with its weights (strict: every key and shape), and its card; nothing executed from the file."""
    from safetensors.torch import load_file

    card = read_mil_card(path)
    model = new_model(card.in_dim, MilSettings(hidden=card.hidden, attention=card.attention, dropout=card.dropout))
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit its card ({str(exc).splitlines()[0]})") from exc
    return model.eval(), card


def evaluate_mil(
    out_dir: str | Path,
    predictions_csv: str | Path | None = None,
    model_path: str | Path | None = None,
    labels_csv: str | Path | None = None,
    places: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics with bootstrap intervals, from pooled predictions (``mil train``'s out-of-fold CSV) or from a
    model applied to labelled slides' stored features; written with the ROC curve."""
    layout = MilLayout(Path(out_dir))
    if predictions_csv is not None:
        probability, tumour, what = read_predictions(Path(predictions_csv))
    else:
        if model_path is None or labels_csv is None or not places:
            raise ConfigError("mil evaluate: give --predictions CSV, or --model, --labels and --features")
        model, card = load_mil(model_path)
        labels = read_slide_labels(labels_csv)
        data = load_bags(
            labels, places, str(labels_csv), card.positive_class, card.class_names, card.encoder_key, card.feature
        )
        positive = card.positive_index
        probability = np.array([predict(model, bag.features, positive)[0] for bag in data.bags])
        tumour = np.array([bag.label == positive for bag in data.bags])
        what = f"{Path(model_path).name} on {len(labels)} slides of {Path(labels_csv).name}"
    if tumour.all() or not tumour.any():
        raise ConfigError(f"{predictions_csv or labels_csv}: one class only; metrics need tumour and tumour-free")
    metrics = {**slide_metrics(probability, tumour), "evaluated": what}
    ensure_writable_dir(layout.root)
    if predictions_csv is None:
        write_predictions(
            layout.predictions_csv,
            [
                {
                    "slide": bag.slide,
                    "label": card.class_names[bag.label],
                    "tumour": int(t),
                    "probability": p,
                    "fold": "",
                }
                for bag, t, p in zip(data.bags, tumour, probability, strict=True)
            ],
        )
    plot_roc(layout.roc_png, probability, tumour, metrics, what)
    write_json_atomic(layout.metrics_json, metrics)
    return metrics


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        probability = np.array([float(row["probability"]) for row in rows])
        tumour = np.array([row["tumour"].strip() in ("1", "true", "True") for row in rows])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a predictions CSV (columns slide, tumour, probability): {exc}") from exc
    if not rows or not np.isfinite(probability).all() or ((probability < 0) | (probability > 1)).any():
        raise OutputError(f"{path}: needs one probability from 0 to 1 per slide")
    return probability, tumour, f"pooled predictions of {path.name}"


def plot_roc(path: Path, probability: np.ndarray, tumour: np.ndarray, metrics: dict[str, Any], title: str) -> None:
    """The ROC curve, with the AUC and its interval, and the point of 95 % specificity."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    from wsi_dala.training.plots import save_figure

    fpr, tpr, _ = roc_curve(tumour, probability)
    fig = Figure(figsize=(4.8, 4.6))
    axis = fig.subplots()
    auc = metrics["auc"]
    axis.plot(fpr, tpr, color="C3", lw=2, label=f"AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]")
    axis.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    sensitivity = metrics["sensitivity_at_95_specificity"]["value"]
    axis.plot([0.05], [sensitivity], "o", color="black", label=f"sensitivity {sensitivity:.2f} at 95 % specificity")
    axis.set(xlabel="1 − specificity (tumour-free slides called tumour)", ylabel="sensitivity", xlim=(0, 1))
    axis.set(ylim=(0, 1.02), title=f"{title}\n{metrics['slides']} slides, {metrics['tumour_slides']} with tumour")
    axis.title.set_fontsize(9)
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    save_figure(fig, path)
