"""Slide labels: a CSV of ``slide,label[,split]``, one row per slide, as labs keep diagnoses.

Used by ``calibrate --slide-labels`` (slide thresholds from runs) and ``mil train`` / ``mil evaluate``. A slide
is named by its file name or its stem (``case-01.svs`` or ``case-01``); either finds its run or its features
store. Torch-free.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from wsi_dala.core.errors import ConfigError

SPLITS = ("train", "validation", "test", "")


@dataclass(frozen=True)
class SlideLabel:
    slide: str  # as written in the CSV
    label: str
    split: str = ""  # train | validation | test | "" (cross-validation decides)

    @property
    def key(self) -> str:
        return slide_key(self.slide)


def slide_key(name: str) -> str:
    """What matches a CSV row to a slide: the file name without its suffixes (``a.ome.tiff`` -> ``a``)."""
    base = Path(name.strip()).name
    return base.split(".")[0] if "." in base else base


def read_slide_labels(path: str | Path) -> list[SlideLabel]:
    """The rows of a slide-labels CSV; refused in one line naming the file and the problem."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read slide labels ({exc})") from exc
    if not rows:
        raise ConfigError(f"{path}: no slide labels (a CSV with columns slide,label[,split])")
    if "slide" not in columns or "label" not in columns:
        raise ConfigError(f"{path}: needs columns slide and label (found {', '.join(columns) or 'none'})")
    labels: list[SlideLabel] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        cells = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        slide, label, split = cells.get("slide", ""), cells.get("label", ""), cells.get("split", "").lower()
        if not slide or not label:
            raise ConfigError(f"{path}: line {line} has no slide or no label")
        if split not in SPLITS:
            raise ConfigError(f"{path}: line {line}: split {split!r} is not one of train, validation, test")
        entry = SlideLabel(slide, label, split)
        if entry.key in seen:
            raise ConfigError(f"{path}: slide {slide!r} is listed twice (lines {seen[entry.key]} and {line})")
        seen[entry.key] = line
        labels.append(entry)
    return labels
