"""`train --synthetic DIR[:RATIO]`: generated tiles (e.g. `wsi-dala gan sample`) mixed into the training
split of their class, never into validation or test.

A folder of generated tiles is only usable with the card that says what they are (``synthetic.json``:
the class, the tile size, the µm/px, what made them): tiles of another scale would teach the model
another magnification, so a folder whose µm/px differs from the training tiles' by more than 2 %, or
whose tiles are smaller than the input, is refused. Larger tiles at the same µm/px are cropped like
any training image (at native scale), never resized.

How many are added: until the class reaches ``RATIO`` x the largest class's training count (default
0.5: the minority up to half the majority), never more than the folder holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import SYNTHETIC_CARD_NAME
from wsi_dala.training.datasets import IMAGE_SUFFIXES, Sample
from wsi_dala.training.unlabelled import MPP_TOLERANCE

DEFAULT_RATIO = 0.5


@dataclass(frozen=True)
class SyntheticSource:
    """One ``--synthetic DIR[:RATIO]`` argument."""

    folder: Path
    ratio: float = DEFAULT_RATIO


def parse_synthetic_argument(text: str) -> SyntheticSource:
    """``DIR`` or ``DIR:RATIO`` (RATIO in (0, 10]). A ':' belongs to the path only when the whole text is an
    existing path; ``DIR:abc`` with DIR a folder is a bad RATIO, not a folder named ``DIR:abc``."""
    folder, sep, ratio_text = text.rpartition(":")
    if not sep or not folder or Path(text).exists():
        return SyntheticSource(Path(text))
    try:
        ratio = float(ratio_text)
    except ValueError:
        if Path(folder).exists():
            raise ConfigError(f"--synthetic {text}: RATIO must be a number in (0, 10], got {ratio_text!r}") from None
        return SyntheticSource(Path(text))  # neither exists: let the folder check name it
    if not 0 < ratio <= 10:
        raise ConfigError(f"--synthetic {text}: RATIO must be in (0, 10], got {ratio_text}")
    return SyntheticSource(Path(folder), ratio)


def read_synthetic_card(folder: Path) -> dict[str, Any]:
    card_path = folder / SYNTHETIC_CARD_NAME
    if not folder.is_dir():
        raise ConfigError(f"{folder}: --synthetic is not a folder")
    if not card_path.is_file():
        raise ConfigError(
            f"{folder}: no {SYNTHETIC_CARD_NAME} (what the tiles are: class, tile_size_px, mpp); "
            "`wsi-dala gan sample` writes one"
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{card_path}: unreadable ({' '.join(str(exc).split())[:120]})") from exc
    missing = [k for k in ("class", "tile_size_px", "mpp") if not isinstance(card, dict) or k not in card]
    if missing:
        raise ConfigError(f"{card_path}: lacks {', '.join(missing)}")
    return card


def mix_synthetic(
    train: list[Sample],
    names: list[str],
    sources: list[SyntheticSource],
    mpp: float | None,
    input_size: int,
    seed: int,
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """``train`` with generated tiles added for their class, and what the model card records of each folder."""
    if not sources:
        return train, []
    counts = np.bincount([s.label for s in train], minlength=len(names))
    rng = np.random.default_rng(seed)
    added: list[Sample] = []
    record = []
    for source in sources:
        card = read_synthetic_card(source.folder)
        label = _class_index(card, names, source.folder)
        _check_scale(card, mpp, input_size, source.folder)
        files = _listed_files(card, source.folder)
        if not files:
            raise ConfigError(f"{source.folder}: no images beside its {SYNTHETIC_CARD_NAME}")
        wanted = max(0, round(source.ratio * counts.max()) - int(counts[label]))
        chosen = sorted(rng.choice(len(files), size=min(wanted, len(files)), replace=False).tolist())
        group = f"synthetic:{source.folder.name}"
        added += [Sample(str(files[i]), label, group) for i in chosen]
        counts[label] += len(chosen)
        record.append(
            {
                "folder": source.folder.name,
                "class": names[label],
                "ratio": source.ratio,
                "available": len(files),
                "added": len(chosen),
                "generator": card.get("generator"),
            }
        )
    return train + added, record


def _listed_files(card: dict[str, Any], folder: Path) -> list[Path]:
    """The images the card lists (plain names inside the folder), or every image there when it lists none."""
    listed = card.get("files")
    if listed is None:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    files = []
    for name in listed:
        if not isinstance(name, str) or Path(name).name != name or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"{folder / SYNTHETIC_CARD_NAME}: {name!r} is not an image file name in this folder")
        if not (folder / name).is_file():
            raise ConfigError(f"{folder / name}: listed in {SYNTHETIC_CARD_NAME} but missing")
        files.append(folder / name)
    return files


def _class_index(card: dict[str, Any], names: list[str], folder: Path) -> int:
    name = str(card["class"])
    if name not in names:
        raise ConfigError(f"{folder}: its tiles are of class {name!r}, which is not in the data ({', '.join(names)})")
    return names.index(name)


def _check_scale(card: dict[str, Any], mpp: float | None, input_size: int, folder: Path) -> None:
    size, tile_mpp = card["tile_size_px"], card["mpp"]
    if not isinstance(size, int) or size < input_size:
        raise ConfigError(f"{folder}: tiles are {size} px, smaller than the {input_size} px input")
    if mpp is None:
        raise ConfigError(f"{folder}: training tiles of unknown µm/px: the scale is unchecked; give --mpp")
    if not isinstance(tile_mpp, int | float) or abs(tile_mpp - mpp) > MPP_TOLERANCE * mpp:
        raise ConfigError(f"{folder}: tiles are at {tile_mpp} µm/px, the training tiles at {mpp:.3g} µm/px")
