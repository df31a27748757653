"""Splits by patient or slide, never by image: image-level splits leak a patient into both sides and
inflate accuracy."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from wsi_dala.core.errors import ConfigError


def group_split(
    labels: Sequence[int], groups: Sequence[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices with every group on one side only, classes balanced across sides."""
    label_array = np.asarray(labels)
    group_array = np.asarray(groups)
    unique = np.unique(group_array)
    if len(unique) < 2:
        raise ConfigError(f"need at least 2 patients/slides to split, found {len(unique)}")
    n_splits = max(2, min(len(unique), round(1 / max(1e-6, val_fraction))))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(label_array)), label_array, group_array))
    return np.sort(train), np.sort(val)


def read_breakhis_fold(path: str | Path) -> dict[str, str]:
    """BreakHis ``dsfoldN.txt``: lines ``<image file>|<magnification>|<fold>|<train|test>`` → {file: split}."""
    splits: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split("|")
        if len(parts) != 4 or parts[3] not in ("train", "test"):
            raise ConfigError(f"{path}:{number}: expected 'file|magnification|fold|train-or-test', got {line!r}")
        splits[Path(parts[0]).name] = parts[3]
    return splits


def group_from_name(path: str | Path, pattern: str) -> str:
    """The group key (slide or patient) of an image file, from a regex's first group on its name."""
    match = re.search(pattern, Path(path).name)
    if not match:
        raise ConfigError(f"{path}: file name does not match the group pattern {pattern!r}")
    return match.group(1) if match.groups() else match.group(0)
