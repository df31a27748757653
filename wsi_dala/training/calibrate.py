"""Calibrating a model on labelled tiles: its temperature, and its Grad-CAM border profile, both recorded in the
model card.

The end of `wsi-dala train` fits both on the validation split; `wsi-dala calibrate` on any labelled data.
Both take the raw logits of one pass (:func:`wsi_dala.training.predict.predict`), so fitting twice gives the
same card, never a temperature compounded on an earlier one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.explain.border_profile import MIN_PROFILE, measure_profile
from wsi_dala.model import ModelCard
from wsi_dala.model.calibration import (
    ECE_BINS,
    CalibrationReport,
    ReliabilityBins,
    bound_warning,
    calibration_folds,
    calibration_report,
    reliability_bins,
    softmax,
)
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.datasets import Sample
from wsi_dala.training.plots import plot_reliability
from wsi_dala.training.predict import Predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """A temperature fitted on a set of labelled tiles, and what it did to them."""

    report: CalibrationReport
    before: ReliabilityBins  # at T = 1
    after: ReliabilityBins  # at the fitted T
    warning: str | None = None  # why the temperature is not to be trusted (see calibration.bound_warning)

    def record(self, fitted_on: str) -> dict[str, Any]:
        """The model card's ``calibration``: where it was fitted, what it did, and how it fared on held-out
        tiles (and so whether it was kept)."""
        report = self.report
        record: dict[str, Any] = {
            "fitted_on": fitted_on,
            "n_tiles": report.n,
            "bins": len(self.before.count),
            "before": report.before.to_dict(),
            "after": report.after.to_dict(),
            "smoothing": report.smoothing,  # > 0: all tiles right, T set for a mean error of 1/(n+2)
        }
        if report.fitted is not None:
            record["fitted_temperature"] = report.fitted
        if report.held_out is not None:
            record["held_out"] = report.held_out.to_dict()
        if report.note:
            record["note"] = report.note
        return record | ({"warning": self.warning} if self.warning else {})


@dataclass(frozen=True)
class CamProfile:
    """The mean relative Grad-CAM over tiles of the positive class (:mod:`wsi_dala.explain.border_profile`)."""

    grid: np.ndarray | None  # [g, g], mean ~1; None without CAMs or without a single usable tile
    n_tiles: int  # tiles labelled and predicted positive that it averages

    def card_value(self) -> list[list[float]] | None:
        return None if self.grid is None else self.grid.tolist()


def sample_folds(samples: list[Sample], labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Cross-validation folds for calibrating on these samples (:func:`wsi_dala.model.calibration.calibration_folds`):
    by slide (or patient) when there are three or more, else by spatial blocks of each slide (tiles of a tile
    store have level-0 positions), else random."""
    positions = np.full((len(samples), 2), np.nan)
    stores: dict[str, np.ndarray] = {}
    for i, sample in enumerate(samples):
        if sample.index >= 0:
            if sample.source not in stores:
                stores[sample.source] = TileStore(sample.source).coords()
            positions[i] = stores[sample.source][sample.index]
    return calibration_folds(labels, [s.group for s in samples], positions)


def fit_calibration(
    predictions: Predictions,
    class_names: list[str],
    where: str,
    bins: int = ECE_BINS,
    folds: tuple[np.ndarray, str] | None = None,
) -> Calibration:
    """The temperature (by NLL) of one pass's raw logits, cross-validated on ``folds`` and kept only where
    held-out tiles confirm it (else T = 1, with the reason); a ConfigError naming ``where`` when none can be
    fitted (no tiles, one class). Every tile right: T for a mean error of Laplace's 1/(n+2) (see
    :func:`wsi_dala.model.calibration.fit_temperature`)."""
    report = calibration_report(predictions.logits, predictions.labels, where, class_names, bins, folds)
    warning = bound_warning(report.temperature)
    if warning is not None:
        log.warning("%s (%d tiles): %s", where, report.n, warning)
    return Calibration(
        report=report,
        before=reliability_bins(softmax(predictions.logits), predictions.labels, bins),
        after=reliability_bins(softmax(predictions.logits, report.temperature), predictions.labels, bins),
        warning=warning,
    )


def positive_cam_profile(predictions: Predictions, positive_index: int) -> CamProfile:
    """The mean relative CAM of the tiles labelled *and* predicted positive (tumour for sure, the model sure
    too: a false negative's map shows what the model missed, not its border attenuation), floored at the
    heatmap's MIN_PROFILE (a card holds positive numbers only)."""
    if predictions.cams is None:
        return CamProfile(None, 0)
    chosen = (predictions.labels == positive_index) & (predictions.logits.argmax(axis=1) == positive_index)
    grid = measure_profile(predictions.cams[chosen])
    return CamProfile(None if grid is None else np.maximum(grid, MIN_PROFILE), int(chosen.sum()))


def calibrated_card(card: ModelCard, calibration: Calibration, profile: CamProfile, fitted_on: str) -> ModelCard:
    """A copy of ``card`` with the fitted temperature, its record and the CAM profile."""
    record = calibration.record(fitted_on) | {"cam_profile_tiles": profile.n_tiles}
    return dataclasses.replace(
        card, temperature=calibration.report.temperature, calibration=record, cam_profile=profile.card_value()
    )


def uncalibrated_card(card: ModelCard, reason: str, profile: CamProfile) -> ModelCard:
    """A copy of ``card`` that says why it has no temperature (it is used at T = 1), with the CAM profile
    (which needs no temperature: a validation split that cannot fit one still measures it)."""
    record = {"skipped": reason} | ({"cam_profile_tiles": profile.n_tiles} if profile.grid is not None else {})
    return dataclasses.replace(card, temperature=None, calibration=record, cam_profile=profile.card_value())


def write_reliability(path: Path, calibration: Calibration, data: str) -> None:
    """The reliability diagram of a fit: before and after, on the tiles it was fitted on."""
    temperature = calibration.report.temperature
    plot_reliability(
        path,
        [("before (T = 1)", calibration.before), (f"after (T = {temperature:.3g})", calibration.after)],
        f"Reliability on {data}: {calibration.report.n} tiles, {len(calibration.before.count)} bins",
    )


def summary_lines(calibration: Calibration, profile: CamProfile) -> list[str]:
    """What the CLI prints about a fit."""
    report = calibration.report
    before, after = report.before, report.after
    lines = [f"temperature: {report.temperature:.4g} (fitted on {report.n} tiles)"]
    held = report.held_out
    if held is not None:
        lines.append(
            f"held out ({held.folds} folds by {held.by}, {held.n} tiles): ECE {held.before.ece:.4f} -> "
            f"{held.after.ece:.4f}, Brier {held.before.brier:.4f} -> {held.after.brier:.4f}"
        )
    if report.note:
        lines.append(f"note: {report.note}")
    lines += [
        f"on the tiles it was fitted on: ECE {before.ece:.4f} -> {after.ece:.4f}, Brier {before.brier:.4f} -> "
        f"{after.brier:.4f}, NLL {before.nll:.4f} -> {after.nll:.4f}",
    ]
    if calibration.warning:
        lines.append(f"note: {calibration.warning}")
    if profile.grid is None:
        lines.append("CAM profile: not measured (no tile labelled and predicted positive, or a model without Grad-CAM)")
    else:
        lines.append(f"CAM profile: measured on {profile.n_tiles} tiles labelled and predicted positive")
    return lines
