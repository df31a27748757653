"""The features store's schema (``features.zarr``, written by ``wsi_dala.inference.features``): its array and
attribute names, and reads that need no torch (training looks rows up here by their tiles' coordinates).

Beside a slide's ``tiles.zarr``, one row per tile in its order: ``embedding`` (the model's own tile
embedding), ``token_mean`` (the mean of the last block's patch tokens: what a preset's linear head pools),
``coords`` (level-0), optionally ``patch_tokens``, and ``chunks_done``. Attributes: ``features_key``,
``encoder`` (the encoder's card), ``tiling`` (the tile store's record), ``tiles_key``, ``complete``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_dala.core.errors import OutputError
from wsi_dala.core.layout import FEATURES_STORE_NAME
from wsi_dala.tiling.store_records import TilingRecord

FEATURES_FORMAT = 1
EMBEDDING = "embedding"
TOKEN_MEAN = "token_mean"
COORDS = "coords"
PATCH_TOKENS = "patch_tokens"
CHUNKS_DONE = "chunks_done"


@dataclass(frozen=True)
class FeaturesStore:
    """A complete features store, opened for reading."""

    path: Path
    group: zarr.Group
    attrs: dict[str, Any]

    @classmethod
    def open(cls, path: Path) -> FeaturesStore:
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
        except Exception as exc:  # missing or damaged: named, never guessed at
            raise OutputError(f"{path}: not a readable features store ({exc})") from exc
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            raise OutputError(f"{path}: unfinished features store; rerun `wsi-dala features` to complete it")
        return cls(path, group, attrs)

    def array(self, name: str) -> np.ndarray:
        found = self.group.get(name)
        if not isinstance(found, zarr.Array):
            raise OutputError(f"{self.path}: holds no {name}")
        return np.asarray(found[:])

    @property
    def encoder(self) -> dict[str, Any]:
        card = self.attrs.get("encoder")
        return card if isinstance(card, dict) else {}

    @property
    def tiling(self) -> TilingRecord:
        """The tile store's record the rows were computed from (its slide, fingerprint included)."""
        record = self.attrs.get("tiling")
        if not isinstance(record, dict):
            raise OutputError(f"{self.path}: no tiling record")
        return TilingRecord.from_attrs(record)

    def rows_at(self, coords: np.ndarray) -> np.ndarray | None:
        """The row of each level-0 coordinate [N, 2]; None when any is not one of this store's tiles."""
        index = {(int(x), int(y)): row for row, (x, y) in enumerate(self.array(COORDS))}
        rows = [index.get((int(x), int(y))) for x, y in coords]
        if any(row is None for row in rows):
            return None
        return np.asarray(rows, dtype=np.int64)


def find_stores(places: list[str]) -> list[Path]:
    """Every ``features.zarr`` in or below the given folders (or the stores named directly)."""
    found: list[Path] = []
    for place in places:
        path = Path(place)
        if path.name.endswith(".zarr"):
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob(FEATURES_STORE_NAME) if p.is_dir())
        else:
            raise OutputError(f"{path}: no such folder or features store (--features)")
    return found
