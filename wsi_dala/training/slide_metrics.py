"""Slide-level metrics with bootstrap confidence intervals: ROC AUC, balanced accuracy, sensitivity at 95 %
specificity and ECE, over slides (one prediction per slide, pooled across cross-validation folds).

The intervals are percentile bootstrap intervals over slides (Efron & Tibshirani 1993): slides are drawn with
replacement, a draw holding one class only is drawn again. With tens of slides they are wide; that is the
point of reporting them. Pure numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from wsi_dala.model.calibration import ece
from wsi_dala.model.slide_thresholds import rank_auc

BOOTSTRAP_DRAWS = 2000
CONFIDENCE = 0.95
SPECIFICITY = 0.95
DECISION_AT = 0.5  # balanced accuracy: the class-balanced model's own decision


def sensitivity_at_specificity(probability: np.ndarray, tumour: np.ndarray, specificity: float = SPECIFICITY) -> float:
    """The share of tumour slides scored above the highest tumour-free score that still keeps ``specificity``."""
    negatives = np.sort(probability[~tumour])
    allowed = math.floor((1 - specificity) * len(negatives) + 1e-9)
    highest_cleared = negatives[len(negatives) - 1 - allowed]
    return float((probability[tumour] > highest_cleared).mean())


def point_metrics(probability: np.ndarray, tumour: np.ndarray) -> dict[str, float]:
    called = probability >= DECISION_AT
    two_class = np.column_stack([1 - probability, probability])
    return {
        "auc": rank_auc(probability, tumour),
        "balanced_accuracy": float((called[tumour].mean() + (~called[~tumour]).mean()) / 2),
        "sensitivity_at_95_specificity": sensitivity_at_specificity(probability, tumour),
        "ece": ece(two_class, tumour.astype(np.int64)),
    }


def slide_metrics(probability: np.ndarray, tumour: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Each metric with its bootstrap interval: {"auc": {"value", "low", "high"}, ...} and the counts."""
    probability, tumour = np.asarray(probability, dtype=np.float64), np.asarray(tumour, dtype=bool)
    point = point_metrics(probability, tumour)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in point}
    n = len(probability)
    while len(draws["auc"]) < BOOTSTRAP_DRAWS:
        pick = rng.integers(0, n, n)
        if tumour[pick].all() or not tumour[pick].any():
            continue
        for name, value in point_metrics(probability[pick], tumour[pick]).items():
            draws[name].append(value)
    tail = 100 * (1 - CONFIDENCE) / 2
    result: dict[str, Any] = {
        name: {
            "value": round(value, 4),
            "low": round(float(np.percentile(draws[name], tail)), 4),
            "high": round(float(np.percentile(draws[name], 100 - tail)), 4),
        }
        for name, value in point.items()
    }
    result["slides"] = n
    result["tumour_slides"] = int(tumour.sum())
    result["bootstrap"] = {"draws": BOOTSTRAP_DRAWS, "confidence": CONFIDENCE, "seed": seed}
    result["decision_at"] = DECISION_AT
    return result


def metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """The table the CLI prints."""
    names = {
        "auc": "slide AUC",
        "balanced_accuracy": f"balanced accuracy (p >= {metrics['decision_at']})",
        "sensitivity_at_95_specificity": "sensitivity at 95 % specificity",
        "ece": "ECE",
    }
    lines = [f"{metrics['slides']} slides ({metrics['tumour_slides']} with tumour), 95 % bootstrap intervals:"]
    lines += [
        f"  {words:<34} {metrics[key]['value']:.3f}  [{metrics[key]['low']:.3f}, {metrics[key]['high']:.3f}]"
        for key, words in names.items()
    ]
    return lines
