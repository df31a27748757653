"""The training loop: seeded, resumable, imbalance-aware, best checkpoint by validation balanced accuracy.

Its parts: the setup in ``session``, one epoch in ``epochs``, the resume state in ``resume``, every loss in
``losses``; this module runs them and calibrates the best checkpoint at the end.

Imbalance is handled by the class-balanced loss of Cui et al. 2019 (weight ∝ (1−β)/(1−β^n_c),
normalised to sum to the number of classes) or by a weighted sampler, never both. Early stopping
watches the validation loss. Every file of a run is named by :class:`wsi_dala.core.layout.TrainLayout`: each
epoch appends to the metrics table, redraws the curves and saves the resume state (loaded with
``weights_only=True``), from which an interrupted run resumes. At the end, the best checkpoint's temperature
and Grad-CAM profile are fitted on the validation split and written into its model card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.core.config import TrainConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.fileio import ensure_writable_dir, write_json_atomic
from wsi_dala.core.layout import TrainLayout
from wsi_dala.model import load_checkpoint, save_checkpoint
from wsi_dala.model.calibration import check_labels
from wsi_dala.training.calibrate import (
    CamProfile,
    calibrated_card,
    fit_calibration,
    positive_cam_profile,
    sample_folds,
    uncalibrated_card,
    write_reliability,
)
from wsi_dala.training.datasets import Sample, class_counts
from wsi_dala.training.epochs import head_predictions, run_epoch
from wsi_dala.training.predict import predict
from wsi_dala.training.resume import TrainState, load_state
from wsi_dala.training.session import Session, head_data, run_key, start_session

log = logging.getLogger(__name__)
VALIDATION = "validation split"  # what the temperature of a trained model is fitted on


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, float]]
    resumed_from_epoch: int


def train_model(
    train_samples: list[Sample],
    val_samples: list[Sample],
    class_names: list[str],
    positive_class: str,
    config: TrainConfig,
    out_dir: str | Path,
    card_fields: dict[str, Any],
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    feature_cache_dir: Path | None = None,
) -> TrainResult:
    """Train, validate every epoch, keep the best checkpoint, then calibrate it on the validation split;
    resume from ``out_dir`` when it can.

    ``on_epoch_end(row)`` is called after each epoch's state is saved. ``feature_cache_dir``: where
    ``freeze_backbone`` keeps the encoder features (default: the run folder's ``features``).
    """
    layout = TrainLayout(ensure_writable_dir(out_dir))
    session = start_session(train_samples, class_names, positive_class, config, card_fields)
    if config.freeze_backbone:
        session.features = head_data(
            session, train_samples, val_samples, feature_cache_dir or layout.features_dir, progress
        )
    state = load_state(layout, session, run_key(config, class_names, train_samples))
    resumed_from = state.epoch
    while state.epoch < config.epochs and state.stale < config.patience:
        row = run_epoch(session, state, layout, train_samples, val_samples, progress)
        if on_epoch_end is not None:
            on_epoch_end(row)
    _calibrate_best(session, layout, val_samples, progress)
    _write_train_json(layout, session, positive_class, train_samples, val_samples, state)
    return TrainResult(layout.best_checkpoint, state.best_epoch, state.best_metrics, state.history, resumed_from)


def read_validation_groups(train_dir: str | Path) -> list[str]:
    """The patients/slides a training run held out for validation (``val_groups`` of its summary)."""
    path = TrainLayout(Path(train_dir)).train_json
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; is {train_dir} the --out folder of a training run?") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable training summary ({exc})") from exc
    groups = summary.get("val_groups") if isinstance(summary, dict) else None
    if not isinstance(groups, list):
        raise ConfigError(f"{path}: no list of validation groups (val_groups) in this training summary")
    return [str(group) for group in groups]


def _calibrate_best(session: Session, layout: TrainLayout, val_samples: list[Sample], progress: bool) -> None:
    """Fit the best checkpoint's temperature and CAM profile on the validation tiles and re-save it, with its
    reliability diagram. From the checkpoint's own weights and raw logits, so a resumed run that has nothing
    left to train refits to the same card. Never fails the run: validation that fits no temperature (empty,
    one class) is recorded in the card as the reason there is none."""
    path = layout.best_checkpoint
    if not path.exists():
        return
    model, card = load_checkpoint(path, session.device)
    profile = CamProfile(None, 0)
    try:
        check_labels(np.array([s.label for s in val_samples]), VALIDATION, session.class_names)
        if session.features is not None:  # the cached features: no encoder pass, and so no CAM profile
            predictions = head_predictions(session, model, session.features)
        else:
            predictions = predict(
                model,
                session.loader(val_samples, False, 0),
                session.device,
                session.mean,
                session.std,
                session.config.precision,
                progress=progress,
                stain=session.stain,
                cam_class=card.positive_index,
            )
        profile = positive_cam_profile(predictions, card.positive_index)
        folds = sample_folds(val_samples, predictions.labels)
        calibration = fit_calibration(predictions, session.class_names, VALIDATION, folds=folds)
    except ConfigError as exc:
        log.warning("%s; the model stays uncalibrated (T = 1)", exc)
        save_checkpoint(path, model, uncalibrated_card(card, str(exc), profile))
        layout.reliability_png.unlink(missing_ok=True)  # an earlier run's figure would describe another model
        return
    save_checkpoint(path, model, calibrated_card(card, calibration, profile, VALIDATION))
    write_reliability(layout.reliability_png, calibration, "the validation split")


def _write_train_json(
    layout: TrainLayout,
    session: Session,
    positive_class: str,
    train_samples: list[Sample],
    val_samples: list[Sample],
    state: TrainState,
) -> None:
    """The run's summary: settings, classes, counts, the best epoch and the split (by group)."""
    n_classes = len(session.class_names)
    write_json_atomic(
        layout.train_json,
        {
            "config": session.config.to_dict(),
            "class_names": session.class_names,
            "positive_class": positive_class,
            "counts": {"train": class_counts(train_samples, n_classes), "val": class_counts(val_samples, n_classes)},
            "best_epoch": state.best_epoch,
            "best_validation": state.best_metrics,
            "history": state.history,
            "train_groups": sorted({s.group for s in train_samples}),
            "val_groups": sorted({s.group for s in val_samples}),
        },
    )
