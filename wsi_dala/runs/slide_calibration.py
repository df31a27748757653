"""``wsi-dala calibrate --slide-labels CSV --runs DIR``: slide-level thresholds from slide labels and the runs a
model made on those slides (a ``batch`` output, or run folders).

Each run's ``run.json`` already holds its slide answer (top-k mean probability, tumour area); with a label per
slide, ``wsi_dala.model.slide_thresholds`` picks the measure that separates them best and its two thresholds,
and a copy of the checkpoint gets them in its card (the weights' bytes unchanged). Runs made with another
checkpoint are refused: their probabilities are not this model's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.core.errors import ConfigError, OutputError
from wsi_dala.core.fileio import ensure_writable_dir, write_json_atomic
from wsi_dala.core.layout import CalibrateLayout, RunLayout
from wsi_dala.model.card import KnownCheckpoint, write_with_card
from wsi_dala.model.slide_thresholds import (
    MEASURE_WORDS,
    RUN_MEASURES,
    SlideThresholds,
    best_measure,
    fit_slide_thresholds,
    rank_auc,
    slide_call,
)
from wsi_dala.training.slide_labels import SlideLabel, read_slide_labels, slide_key


@dataclass(frozen=True)
class LabelledSlide:
    label: SlideLabel
    tumour: bool
    run_json: Path
    answer: dict[str, Any]


def tumour_flags(labels: list[SlideLabel], class_names: list[str], positive: str, source: str) -> list[bool]:
    """Whether each labelled slide is a tumour slide, by the model's own class names."""
    unknown = sorted({entry.label for entry in labels} - set(class_names))
    if unknown:
        raise ConfigError(f"{source}: label {unknown[0]!r} is not one of the model's classes {class_names}")
    return [entry.label == positive for entry in labels]


def find_runs(places: list[str]) -> dict[str, Path]:
    """Every complete run's run.json in or below ``places``, by slide key (file name without suffixes)."""
    name = RunLayout(Path(".")).run_json.name
    found: dict[str, Path] = {}
    for place in places:
        root = Path(place)
        if not root.is_dir():
            raise OutputError(f"{root}: no such folder of runs (--runs)")
        for path in sorted(root.rglob(name)):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("status") == "complete":
                key = slide_key(str(record.get("slide", {}).get("path", "")))
                if key in found:
                    raise ConfigError(f"{path}: slide {key!r} has two runs here (also {found[key]}); keep one")
                found[key] = path
    return found


def labelled_runs(checkpoint: KnownCheckpoint, labels_csv: Path, places: list[str]) -> list[LabelledSlide]:
    labels = read_slide_labels(labels_csv)
    card = checkpoint.card
    tumour = tumour_flags(labels, card.class_names, card.positive_class, str(labels_csv))
    runs = find_runs(places)
    missing = [entry.slide for entry in labels if entry.key not in runs]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{labels_csv}: no run of slide(s) {', '.join(missing[:3])}{more} in {', '.join(places)}")
    slides = []
    for entry, is_tumour in zip(labels, tumour, strict=True):
        path = runs[entry.key]
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("model", {}).get("sha256") != checkpoint.sha256:
            raise ConfigError(f"{path}: made with another checkpoint than {checkpoint.path}; run the slide with it")
        answer = record.get("slide_answer")
        if not isinstance(answer, dict) or not answer:
            raise ConfigError(f"{path}: no slide answer (a run of an older release); run the slide again")
        slides.append(LabelledSlide(entry, is_tumour, path, answer))
    return slides


def calibrate_slides(
    checkpoint_path: str | Path, labels_csv: str | Path, places: list[str], out_dir: str | Path, measure: str = "auto"
) -> dict[str, Any]:
    """Fit the slide thresholds and write the calibrated checkpoint, the record and its picture (record last)."""
    checkpoint = KnownCheckpoint.read(checkpoint_path)
    layout = CalibrateLayout(Path(out_dir))
    if layout.checkpoint.resolve() == Path(checkpoint_path).resolve():
        raise OutputError(f"{layout.checkpoint}: is the input checkpoint; give calibrate another --out")
    slides = labelled_runs(checkpoint, Path(labels_csv), places)
    tumour = np.array([s.tumour for s in slides])
    columns = {name: np.array([_number(s.answer.get(name)) for s in slides], dtype=np.float64) for name in RUN_MEASURES}
    if measure == "auto":
        measure = best_measure({k: v for k, v in columns.items() if np.isfinite(v).all()} or columns, tumour)
    fitted_on = f"{len(slides)} labelled slides of {Path(labels_csv).name}"
    record = fit_slide_thresholds(columns[measure], tumour, measure, fitted_on)
    record["auc_by_measure"] = {
        name: round(rank_auc(values, tumour), 4) for name, values in columns.items() if np.isfinite(values).all()
    }
    ensure_writable_dir(layout.root)
    card = dataclasses.replace(checkpoint.card, slide_thresholds=record)
    write_with_card(checkpoint.path, layout.checkpoint, card)
    thresholds = SlideThresholds.from_card(record)
    rows = []
    for slide, value in zip(slides, columns[measure], strict=True):
        call, reason = slide_call(float(value), thresholds, slide.answer.get("warnings") or [])
        rows.append(
            {
                "slide": slide.label.slide,
                "label": slide.label.label,
                measure: float(value),
                "call": call,
                "reason": reason,
                "run": str(slide.run_json),
            }
        )
    _plot(layout.slide_thresholds_png, columns[measure], tumour, record, checkpoint.card.positive_class)
    write_json_atomic(
        layout.slide_thresholds_json,
        {
            "checkpoint": str(checkpoint.path),
            "calibrated_checkpoint": str(layout.checkpoint),
            "slide_thresholds": record,
            "slides": rows,
        },
    )
    return record


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _plot(path: Path, values: np.ndarray, tumour: np.ndarray, record: dict[str, Any], positive: str) -> None:
    """Each labelled slide as a dot on the measure's axis, tumour and tumour-free in two rows, with the two
    thresholds and the three calls' bands: how well the slides separate, at a glance."""
    from matplotlib.figure import Figure

    from wsi_dala.training.plots import save_figure

    fig = Figure(figsize=(7, 2.8))
    axis = fig.subplots()
    low, high = record["no_tumour_below"], record["tumour_at"]
    span = max(float(values.max() - values.min()), 1e-6)
    left, right = float(values.min()) - 0.05 * span, float(values.max()) + 0.05 * span
    axis.axvspan(left, low, color="#d9ead3", label="no tumour")
    axis.axvspan(low, high, color="#fff2cc", label="indeterminate")
    axis.axvspan(high, right, color="#f4cccc", label="tumour")
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(values))
    axis.scatter(values[~tumour], jitter[~tumour], color="#38761d", s=22, zorder=3)
    axis.scatter(values[tumour], 1 + jitter[tumour], color="#990000", s=22, zorder=3)
    axis.set(xlim=(left, right), ylim=(-0.5, 1.5), yticks=[0, 1], yticklabels=["tumour-free", positive])
    axis.set_xlabel(f"{MEASURE_WORDS[record['measure']]} (slide AUC {record['auc']:.3f})")
    axis.set_title(f"Slide thresholds from {record['slides']} labelled slides", fontsize=10)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
