"""Slide-level thresholds, chosen from slide labels, and the slide call they make (issue 31).

A tile classifier answers per tile; a lab asks per slide: tumour, no tumour, or look at it. Two thresholds
on one slide measure (the top-k mean tile probability, the tumour area, or an attention-MIL model's slide
probability) split the answer in three:

- at or above ``tumour_at`` the call is ``tumour``: set so at most 5 % of the tumour-free slides reach it
  (95 % specificity on the labelled slides);
- below ``no_tumour_below`` it is ``no tumour``: set so at most 5 % of the tumour slides fall below it (95 %
  sensitivity);
- between them, ``indeterminate``: the slides a pathologist reads first.

A slide with QC or stain warnings is never called ``no tumour`` (tumour may hide where the warning is): at
most ``indeterminate``, with the warning as the reason. Pure numpy, no torch: run.json and the batch report
use it. The thresholds are judgement on few slides; the card records how many they were fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_dala.core.errors import ConfigError

CALL_TUMOUR, CALL_NONE, CALL_INDETERMINATE = "tumour", "no tumour", "indeterminate"
NO_THRESHOLDS = "no slide-level thresholds in the model card; `wsi-dala calibrate --slide-labels` chooses them"
# The slide measures a call can rest on (keys of SlideAnswer); MIL models give the third.
RUN_MEASURES = ("top_k_mean_probability", "tumour_area_mm2")  # what a tile classifier's run offers
SLIDE_MEASURES = (*RUN_MEASURES, "slide_probability")
MEASURE_WORDS = {  # how a reason names them (the top-k is wsi_dala.outputs.slide_answer.TOP_K_TILES)
    "top_k_mean_probability": "top-10 mean probability",
    "tumour_area_mm2": "tumour area (mm²)",
    "slide_probability": "slide probability",
}
TARGET_SPECIFICITY = 0.95  # of "tumour" calls among tumour-free slides
TARGET_SENSITIVITY = 0.95  # of tumour slides kept out of "no tumour"


@dataclass(frozen=True)
class SlideThresholds:
    measure: str
    tumour_at: float
    no_tumour_below: float

    @classmethod
    def from_card(cls, record: dict[str, Any] | None, source: str = "model card") -> SlideThresholds | None:
        """The card's ``slide_thresholds`` (None when it has none); refused by name when malformed."""
        if not record:
            return None
        try:
            found = cls(str(record["measure"]), float(record["tumour_at"]), float(record["no_tumour_below"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: slide_thresholds needs measure, tumour_at and no_tumour_below") from exc
        if found.measure not in SLIDE_MEASURES:
            raise ConfigError(f"{source}: slide_thresholds measure {found.measure!r} is not one of {SLIDE_MEASURES}")
        if not (math.isfinite(found.tumour_at) and math.isfinite(found.no_tumour_below)):
            raise ConfigError(f"{source}: slide thresholds must be finite numbers")
        if found.no_tumour_below > found.tumour_at:
            raise ConfigError(f"{source}: slide threshold no_tumour_below is above tumour_at")
        return found


def slide_call(value: float | None, thresholds: SlideThresholds | None, warnings: Sequence[str]) -> tuple[str, str]:
    """(call, reason) for a slide whose measure is ``value``."""
    if thresholds is None:
        return CALL_INDETERMINATE, NO_THRESHOLDS
    name = MEASURE_WORDS[thresholds.measure]
    if value is None or not math.isfinite(value):
        return CALL_INDETERMINATE, f"no {name} for this slide"
    if value >= thresholds.tumour_at:
        return CALL_TUMOUR, f"{name} {value:.3g} ≥ {thresholds.tumour_at:.3g}"
    if value < thresholds.no_tumour_below:
        if warnings:
            return CALL_INDETERMINATE, f"{name} {value:.3g} is low, but {'; '.join(warnings)}"
        return CALL_NONE, f"{name} {value:.3g} < {thresholds.no_tumour_below:.3g}"
    return CALL_INDETERMINATE, (
        f"{name} {value:.3g} between {thresholds.no_tumour_below:.3g} and {thresholds.tumour_at:.3g}"
    )


def rank_auc(scores: np.ndarray, tumour: np.ndarray) -> float:
    """ROC AUC by ranks (Mann–Whitney U), ties counted half: no sklearn needed at run time."""
    positives, negatives = scores[tumour], scores[~tumour]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def fit_slide_thresholds(
    scores: np.ndarray,
    tumour: np.ndarray,
    measure: str,
    fitted_on: str,
    specificity: float = TARGET_SPECIFICITY,
    sensitivity: float = TARGET_SENSITIVITY,
) -> dict[str, Any]:
    """The card's ``slide_thresholds`` record from labelled slides' ``scores`` (``tumour``: bool per slide).

    Each threshold sits halfway between the two neighbouring slide scores it separates, so a slide scored
    exactly as a labelled one lands on the side that slide was counted on."""
    scores, tumour = np.asarray(scores, dtype=np.float64), np.asarray(tumour, dtype=bool)
    if not np.isfinite(scores).all():
        raise ConfigError(f"{fitted_on}: a slide has no {MEASURE_WORDS[measure]}")
    if tumour.all() or not tumour.any():
        raise ConfigError(f"{fitted_on}: slide labels hold one class only; thresholds need tumour and tumour-free")
    everything = np.unique(scores)
    negatives, positives = np.sort(scores[~tumour]), np.sort(scores[tumour])
    false_alarms = math.floor((1 - specificity) * len(negatives) + 1e-9)
    highest_cleared = negatives[len(negatives) - 1 - false_alarms]  # negatives above it may be called tumour
    above = everything[everything > highest_cleared]
    tumour_at = float((highest_cleared + above[0]) / 2) if len(above) else float(np.nextafter(highest_cleared, np.inf))
    misses = math.floor((1 - sensitivity) * len(positives) + 1e-9)
    lowest_kept = positives[misses]  # positives below it may be called no tumour
    below = everything[everything < lowest_kept]
    no_tumour_below = float((below[-1] + lowest_kept) / 2) if len(below) else float(lowest_kept)
    no_tumour_below = min(no_tumour_below, tumour_at)
    called_tumour = scores >= tumour_at
    called_none = scores < no_tumour_below
    return {
        "measure": measure,
        "tumour_at": round(tumour_at, 6),
        "no_tumour_below": round(no_tumour_below, 6),
        "fitted_on": fitted_on,
        "slides": len(scores),
        "tumour_slides": int(tumour.sum()),
        "auc": round(rank_auc(scores, tumour), 4),
        "target_specificity": specificity,
        "target_sensitivity": sensitivity,
        "specificity": round(float((~called_tumour[~tumour]).mean()), 4),
        "sensitivity": round(float(called_tumour[tumour].mean()), 4),
        "tumour_slides_called_no_tumour": int(called_none[tumour].sum()),
        "indeterminate_share": round(float((~called_tumour & ~called_none).mean()), 4),
    }


def best_measure(columns: dict[str, np.ndarray], tumour: np.ndarray) -> str:
    """The measure that separates the labelled slides best (highest AUC; the first named on a tie)."""
    return max(columns, key=lambda name: rank_auc(columns[name], tumour))
