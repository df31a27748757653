"""Temperature scaling and the measures of calibration: ECE, Brier score, NLL, reliability bins.

A network trained with cross-entropy is usually over-confident: of the tiles it calls tumour with 0.95,
far fewer than 95 % are. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks") divides the logits by one scalar T fitted on held-out data by negative log-likelihood: it
changes no prediction (the argmax and every ranking stay), only how far the probabilities are believed.

Pure numpy/scipy: evaluation reports and the heatmap use these without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import log_softmax

from wsi_dala.core.errors import ConfigError

# The model card's accepted range (wsi_dala.model.checkpoint): outside it, the fit has gone wrong.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
ECE_BINS = 15  # Guo et al. 2017


@dataclass(frozen=True)
class CalibrationMetrics:
    """How well probabilities match frequencies (all: lower is better)."""

    ece: float  # expected calibration error, top-label, equal-width bins
    brier: float  # multi-class Brier score: mean over tiles of Σ_c (p_c − y_c)², from 0 to 2
    nll: float  # mean negative log-likelihood of the true class, nats

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class CalibrationReport:
    """A temperature fitted on a set of labelled tiles, judged on held-out folds, and what it does to them."""

    temperature: float  # the one to apply: the fit when held-out tiles confirm it, else 1
    n: int  # tiles it was fitted on
    before: CalibrationMetrics  # T = 1
    after: CalibrationMetrics  # T = temperature
    smoothing: float = 0.0  # > 0: every tile was right; T set so the mean error is Laplace's 1/(n+2)
    fitted: float | None = None  # the NLL fit on all tiles (None: the same as ``temperature``)
    held_out: HeldOut | None = None  # cross-validation, when folds were given
    note: str | None = None  # why the fit was not kept

    def to_dict(self) -> dict[str, object]:
        record: dict[str, object] = {
            "temperature": self.temperature,
            "n": self.n,
            "smoothing": self.smoothing,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }
        if self.fitted is not None:
            record["fitted_temperature"] = self.fitted
        if self.held_out is not None:
            record["held_out"] = self.held_out.to_dict()
        return record | ({"note": self.note} if self.note else {})


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label confidence in equal-width bins over [0, 1]: the points of a reliability diagram."""

    edges: np.ndarray  # [bins + 1]
    confidence: np.ndarray  # [bins] mean top-label probability of the tiles in each bin; NaN where empty
    accuracy: np.ndarray  # [bins] share of those tiles whose top label is right; NaN where empty
    count: np.ndarray  # [bins] tiles per bin

    def to_dict(self) -> dict[str, list[float | None]]:
        def listed(values: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in values]

        return {
            "edges": [float(e) for e in self.edges],
            "confidence": listed(self.confidence),
            "accuracy": listed(self.accuracy),
            "count": [float(c) for c in self.count],
        }


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) per row, computed in float64 through the log-softmax (no overflow)."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def check_labels(labels: np.ndarray, where: str, class_names: Sequence[str] | None = None) -> None:
    """Refuse data a temperature cannot be fitted on: none, or tiles of one class only (where the NLL is
    lowest for an infinitely sharp or flat model, whatever the model is worth)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ConfigError(f"{where}: calibration needs labelled tiles; there are none")
    present = np.unique(labels)
    if len(present) < 2:
        only = int(present[0])
        name = class_names[only] if class_names is not None and 0 <= only < len(class_names) else str(only)
        raise ConfigError(f"{where}: calibration needs tiles of at least two classes; all {labels.size} are {name!r}")


def nll_logits(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T), from the log-softmax (exact for huge logits)."""
    logits, labels = _checked(logits, labels)
    log_p = log_softmax(logits / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def nll(probabilities: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of given probabilities (floored at ``eps``: a confident mistake costs
    ~27.6 nats, not infinity). Prefer :func:`nll_logits` where the logits are at hand."""
    probabilities, labels = _checked(probabilities, labels)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(picked, eps)).mean())


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over tiles of Σ_c (p_c − y_c)² with y one-hot (0 perfect, 2 worst).

    Not the binary form (p_positive − y)², which for two classes is half of this."""
    probabilities, labels = _checked(probabilities, labels)
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(((probabilities - one_hot) ** 2).sum(axis=1).mean())


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> ReliabilityBins:
    """Top-label confidence per bin ((m−1)/M, m/M], its accuracy and count."""
    probabilities, labels = _checked(probabilities, labels)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), mean_confidence, accuracy, count)


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017): Σ_bins (n_b / N) · |accuracy_b − confidence_b| over the
    top-label confidence in ``bins`` equal-width bins."""
    return ece_of(reliability_bins(probabilities, labels, bins))


def ece_of(binned: ReliabilityBins) -> float:
    used = binned.count > 0
    total = binned.count.sum()
    if total == 0:
        return 0.0
    gaps = np.abs(binned.accuracy[used] - binned.confidence[used])
    return float((binned.count[used] / total * gaps).sum())


def calibration_metrics(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = ECE_BINS
) -> CalibrationMetrics:
    """ECE, Brier and NLL of softmax(logits / T)."""
    probabilities = softmax(logits, temperature)
    return CalibrationMetrics(
        ece=ece(probabilities, labels, bins),
        brier=brier(probabilities, labels),
        nll=nll_logits(logits, labels, temperature),
    )


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, where: str, class_names: Sequence[str] | None = None
) -> float:
    """The one T > 0 minimising the NLL of softmax(logits / T), within the model card's range.

    Optimised over log T (bounded Brent): the NLL is convex in 1/T, hence unimodal in log T, and the
    log scale treats 0.5 and 2 alike. A minimum exists only if some tile is classified wrong: with every
    tile right the NLL falls all the way to T -> 0, which would claim an error rate of exactly 0 from a
    finite sample. Then T is the one at which the mean probability given to the wrong classes equals
    Laplace's rule of succession — n right out of n is an error rate of 1/(n+2), not 0 —: calibration in
    the large, confident, never certain. (Cross-entropy against smoothed targets was tried first and is
    wrong here: one tile with a huge margin drags T to the top of its range and every other tile to 0.5.)
    Refused with a ConfigError naming ``where``: no tiles, one class, non-finite logits.
    """
    logits, labels = _checked(logits, labels)
    check_labels(labels, where, class_names)
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        raise ConfigError(f"{where}: {int((~finite).sum())} of {len(logits)} tiles have non-finite logits")
    if all_right(logits, labels):
        return _matching_error_rate(logits, labels, 1.0 / (len(labels) + 2))
    from scipy.optimize import minimize_scalar  # half a second to import: only where a fit runs

    result = minimize_scalar(
        lambda log_t: nll_logits(logits, labels, math.exp(log_t)),
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(min(max(math.exp(result.x), MIN_TEMPERATURE), MAX_TEMPERATURE))


def calibration_report(
    logits: np.ndarray,
    labels: np.ndarray,
    where: str,
    class_names: Sequence[str] | None = None,
    bins: int = ECE_BINS,
    folds: tuple[np.ndarray, str] | None = None,
) -> CalibrationReport:
    """Fit T on these tiles and measure them before and after.

    With ``folds`` (a fold per tile and what they are, :func:`calibration_folds`) the fit is also
    cross-validated, and kept only if the held-out ECE and Brier score both fall; otherwise T = 1, and the
    report says why (an NLL fit can make calibration worse: a few confident mistakes — tiles at an
    annotation's edge — pull T up and leave every other tile under-confident). A T below 1 (sharper
    probabilities) is kept only when whole slides were held out: within one slide a model looks surer than it
    will be on the next (on a real-texture slide the validation slide's T = 0.50 raised the unseen slide's
    ECE from 0.020 to 0.024)."""
    fitted = fit_temperature(logits, labels, where, class_names)
    held_out, note = None, None
    temperature = fitted
    if folds is not None:
        held_out = held_out_temperature(logits, labels, folds[0], folds[1], where, class_names, bins)
        if held_out is None:
            temperature, note = 1.0, "not judged on held-out tiles (no fold leaves both classes to fit on): T = 1"
        elif not held_out.helps:
            temperature = 1.0
            note = (
                f"on held-out tiles ({held_out.folds} folds by {held_out.by}) T = {fitted:.3g} moved ECE "
                f"{held_out.before.ece:.4f} -> {held_out.after.ece:.4f} and Brier {held_out.before.brier:.4f} -> "
                f"{held_out.after.brier:.4f}: not both better, so T = 1"
            )
        elif fitted < 1.0 and held_out.by != "slides":
            temperature = 1.0
            note = (
                f"T = {fitted:.3g} would sharpen the probabilities, and only {held_out.by} held it out: on a slide "
                f"the model has not seen, it is at best as accurate, so sharpening needs other slides to confirm "
                f"it ({MIN_FOLD_GROUPS} or more): T = 1"
            )
    return CalibrationReport(
        temperature=temperature,
        n=len(labels),
        smoothing=1.0 / (len(labels) + 2) if all_right(logits, labels) and temperature == fitted else 0.0,
        before=calibration_metrics(logits, labels, 1.0, bins),
        after=calibration_metrics(logits, labels, temperature, bins),
        fitted=fitted if folds is not None else None,
        held_out=held_out,
        note=note,
    )


def bound_warning(temperature: float) -> str | None:
    """Why a fitted T at the top of its range is not to be trusted: the NLL kept falling as T -> infinity,
    so the logits say nothing about the labels (an untrained model, or data of another kind). None otherwise."""
    if math.isclose(temperature, MAX_TEMPERATURE, rel_tol=1e-2):
        return f"temperature {temperature:.3g} is at the top of its range: the logits carry no information"
    return None


def all_right(logits: np.ndarray, labels: np.ndarray) -> bool:
    """Every tile's true class has the largest logit (then NLL alone fits no temperature)."""
    return bool((_margins(np.asarray(logits, dtype=np.float64), np.asarray(labels)) > 0).all())


def _matching_error_rate(logits: np.ndarray, labels: np.ndarray, error_rate: float) -> float:
    """The T at which the mean of 1 − p(true class) equals ``error_rate`` (bisection on log T: that mean
    rises monotonically with T), clipped to the model card's range."""

    def wrong(temperature: float) -> float:
        scaled = logits / temperature
        log_p = scaled - scaled.max(axis=1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        return float(1.0 - np.exp(log_p[np.arange(len(labels)), labels]).mean())

    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    if wrong(math.exp(high)) <= error_rate:
        return MAX_TEMPERATURE
    if wrong(math.exp(low)) >= error_rate:
        return MIN_TEMPERATURE
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if wrong(math.exp(middle)) < error_rate else (low, middle)
    return float(math.exp((low + high) / 2))


def _margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each tile's true-class logit minus the largest other logit: > 0 where the tile is classified right."""
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - others.max(axis=1)


def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if scores.ndim != 2 or labels.ndim != 1 or len(scores) != len(labels):
        raise ValueError(f"scores [N, C] and labels [N] expected, got {scores.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels outside 0..{scores.shape[1] - 1}")
    return scores, labels


MAX_FOLDS = 5  # cross-validation folds at most (slides are merged into this many folds beyond it)
SPATIAL_BLOCKS = 4  # with fewer than 3 slides, each slide is cut into 2 x 2 blocks at its median x and y
MIN_FOLD_GROUPS = 3  # slides needed to cross-validate across slides


@dataclass(frozen=True)
class HeldOut:
    """A temperature judged on tiles it was not fitted on: each fold's T is fitted on the other folds and
    applied to it; the pooled held-out tiles are measured at T = 1 (before) and at their fold's T (after)."""

    folds: int
    by: str  # "slides", "spatial blocks within slides" or "random folds"
    before: CalibrationMetrics
    after: CalibrationMetrics
    temperatures: list[float]  # per fold
    n: int  # held-out tiles pooled

    @property
    def helps(self) -> bool:
        """Scaling lowered both the held-out ECE and the held-out Brier score."""
        return self.after.ece < self.before.ece and self.after.brier < self.before.brier

    def to_dict(self) -> dict[str, object]:
        return {
            "folds": self.folds,
            "by": self.by,
            "n_tiles": self.n,
            "fold_temperatures": [round(t, 4) for t in self.temperatures],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "helps": self.helps,
        }


def calibration_folds(
    labels: np.ndarray, groups: Sequence[str] | None, positions: np.ndarray | None, seed: int = 0
) -> tuple[np.ndarray, str]:
    """A fold per tile, and what the folds are: whole slides with at least MIN_FOLD_GROUPS slides (a
    temperature must hold on a slide it has not seen); else spatial blocks within each slide (neighbouring
    tiles are alike, so a random split would flatter the fit); else, without positions, random folds."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    names = np.asarray(groups) if groups is not None else np.zeros(n, dtype=str)
    unique = sorted(set(names.tolist()))
    if len(unique) >= MIN_FOLD_GROUPS:
        order = rng.permutation(len(unique))
        fold_of = {unique[i]: int(k % MAX_FOLDS) for k, i in enumerate(order)}
        return np.array([fold_of[g] for g in names.tolist()], dtype=np.int64), "slides"
    if positions is not None and np.isfinite(positions).all():
        folds = np.zeros(n, dtype=np.int64)
        for name in unique:
            members = names == name
            x, y = positions[members, 0], positions[members, 1]
            folds[members] = (x > np.median(x)).astype(np.int64) + 2 * (y > np.median(y)).astype(np.int64)
        return folds, "spatial blocks within slides"
    return rng.permutation(n) % MAX_FOLDS, "random folds"


def held_out_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    by: str,
    where: str,
    class_names: Sequence[str] | None = None,
    bins: int = ECE_BINS,
) -> HeldOut | None:
    """Cross-validated temperature scaling (see :class:`HeldOut`); None when no fold can be held out (every
    fold's complement must hold both classes)."""
    logits, labels = _checked(logits, labels)
    scaled_t1, scaled_t, held_labels, temperatures = [], [], [], []
    for fold in np.unique(folds):
        held, rest = folds == fold, folds != fold
        if len(np.unique(labels[rest])) < 2 or not held.any():
            continue
        temperature = fit_temperature(logits[rest], labels[rest], f"{where} (fold {fold})", class_names)
        temperatures.append(temperature)
        scaled_t1.append(logits[held])
        scaled_t.append(logits[held] / temperature)
        held_labels.append(labels[held])
    if not temperatures:
        return None
    pooled_labels = np.concatenate(held_labels)
    return HeldOut(
        folds=len(temperatures),
        by=by,
        before=calibration_metrics(np.concatenate(scaled_t1), pooled_labels, 1.0, bins),
        after=calibration_metrics(np.concatenate(scaled_t), pooled_labels, 1.0, bins),
        temperatures=temperatures,
        n=len(pooled_labels),
    )
