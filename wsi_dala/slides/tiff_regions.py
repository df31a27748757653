"""Fast region reads from tiled TIFF levels: decode each tile a region touches exactly once.

Why: per output tile, OpenSlide spends most of its time outside JPEG decoding (colour conversion,
premultiplied alpha, cache bookkeeping), and tiffslide's reads hold the GIL in Python code, so neither
scales over threads. Here the compressed bytes are read with ``os.pread`` and decoded by tifffile's
own per-segment decoder (``TiffPage.decode``, backed by imagecodecs, which releases the GIL), so reader
threads run in parallel. Only simple layouts take this path (tiled, contiguous samples, uint8
RGB/RGBA, one plane); everything else goes through tiffslide unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def supports(page: Any) -> bool:
    """Whether ``page`` (a tifffile TiffPage) is a layout this reader decodes correctly."""
    try:
        return bool(
            page.is_tiled
            and page.tiledepth == 1
            and page.imagedepth == 1
            and page.planarconfig == 1  # contiguous samples
            and page.samplesperpixel in (3, 4)
            and np.dtype(page.dtype) == np.uint8
            and len(page.dataoffsets) == len(page.databytecounts)
        )
    except (AttributeError, TypeError, ValueError):
        return False


class TiledLevelReader:
    """Region reader for one tiled TIFF page. Thread-safe: no shared file position, no shared buffers."""

    def __init__(self, path: str | os.PathLike, page: Any):
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.tiles_across = -(-self.width // self.tile_w)
        self.tiles_down = -(-self.height // self.tile_h)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.jpegtables = getattr(page, "jpegtables", None)
        self.decode = page.decode
        self.fd = os.open(os.fspath(path), os.O_RDONLY)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] of a region that lies inside this level."""
        if x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            raise ValueError(f"region ({x}, {y}, {width}, {height}) outside level {self.width}x{self.height}")
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(y // self.tile_h, (y + height - 1) // self.tile_h + 1):
            for tx in range(x // self.tile_w, (x + width - 1) // self.tile_w + 1):
                tile = self._tile(ty * self.tiles_across + tx)
                tile_x, tile_y = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x, tile_x), max(y, tile_y)
                sx1 = min(x + width, tile_x + self.tile_w)
                sy1 = min(y + height, tile_y + self.tile_h)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - tile_y : sy1 - tile_y, sx0 - tile_x : sx1 - tile_x, :3
                ]
        return out

    def _tile(self, index: int) -> np.ndarray:
        count = int(self.counts[index])
        data: bytes | None = None
        if count:
            data = os.pread(self.fd, count, int(self.offsets[index]))
            if len(data) != count:
                raise OSError(f"short read of tile {index} ({len(data)} of {count} bytes)")
        segment, _, shape = self.decode(data, index, jpegtables=self.jpegtables)
        if segment is None:  # empty tile: background
            return np.full((self.tile_h, self.tile_w, 3), 255, dtype=np.uint8)
        segment = np.asarray(segment).reshape(shape[-3:])
        return segment

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def level_readers(path: str | os.PathLike, tiffslide_handle: Any) -> dict[int, TiledLevelReader]:
    """Fast readers for the levels of a tiffslide handle whose pages allow it (may be empty)."""
    readers: dict[int, TiledLevelReader] = {}
    try:
        levels = tiffslide_handle.ts_tifffile.series[0].levels
    except (AttributeError, IndexError):
        return readers
    dims = list(tiffslide_handle.level_dimensions)
    for index, series in enumerate(levels):
        page = series.pages[0] if series.pages else None
        if page is None or index >= len(dims) or not supports(page):
            continue
        if (int(page.imagewidth), int(page.imagelength)) != tuple(dims[index]):
            continue
        readers[index] = TiledLevelReader(path, page)
    return readers
