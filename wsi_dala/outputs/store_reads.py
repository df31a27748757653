"""Reading a scored tile store for stitching: each value read once, CAMs a block of whole chunks at a time.

Stitching passes over the tiles several times (the reference tiles, then every layer); Zarr would decode
a chunk on each pass. These readers keep what was read, so the stitch costs one decode per chunk and a
few MB of memory whatever the slide's size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi_dala.tiling.store import TileStore

STITCH_BLOCK_TILES = 16384  # tiles stitched (and whose CAMs are read) at once: a few MB


def row_blocks(n: int, step: int) -> list[slice]:
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


class ReadOnceStore(TileStore):
    """The store (read only), with its per-tile scores, coordinates and flags read whole the first time
    they are asked for: every read of a chunked array costs ~0.3 ms a chunk (5 s for the scores of 10^6
    tiles), and the stitch asks for them several times. A few bytes a tile."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._whole: dict[str, np.ndarray] = {}

    def _once(self, read: Callable[[slice], np.ndarray], rows: slice) -> np.ndarray:
        if read.__name__ not in self._whole:
            self._whole[read.__name__] = read(slice(None))
        return self._whole[read.__name__][rows].copy()

    def scores(self, rows: slice = slice(None)) -> np.ndarray:
        return self._once(super().scores, rows)

    def coords(self, rows: slice = slice(None)) -> np.ndarray:
        return self._once(super().coords, rows)

    def qc_flags(self, rows: slice = slice(None)) -> np.ndarray:
        return self._once(super().qc_flags, rows)

    def score_sd(self, rows: slice = slice(None)) -> np.ndarray:
        return self._once(super().score_sd, rows)


class ChunkCams:
    """``store.cams(rows)`` for the rows of one chunk, read a block of whole chunks at a time."""

    def __init__(self, store: TileStore) -> None:
        self._store = store
        self._rows = slice(0, 0)
        self._cams = np.zeros(0)

    def __call__(self, rows: slice) -> np.ndarray:
        if not (self._rows.start <= rows.start and rows.stop <= self._rows.stop):
            info = self._store.info
            step = info.chunk_tiles * max(1, STITCH_BLOCK_TILES // info.chunk_tiles)
            self._rows = slice(rows.start, max(rows.stop, min(info.n_tiles, rows.start + step)))
            self._cams = self._store.cams(self._rows)
        return self._cams[rows.start - self._rows.start : rows.stop - self._rows.start]
