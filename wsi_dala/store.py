"""The Zarr (v3) layout of a slide's tile store, in one place.

```
tiles.zarr/
  tiles             [N, T, T, 3] uint8   chunked by batch, zstd
  coords            [N, 2]       int64   level-0 top-left (x, y), QuPath's frame
  tissue_fraction   [N]          float32
  tissue_mask       [h, w]       bool    the tissue mask, attrs["mask_downsample"] level-0 px per pixel
  tile_chunks_done  [n_chunks]   bool    which tile chunks are fully written (resume point)
  (later stages add scores, cams and their own *_chunks_done)
  attrs: slide, reader, µm/px and its source, level, resize, tile size, stride, tissue settings,
         software version, "complete"
```
A store is usable only when ``attrs["complete"]`` is true; zarr writes each chunk atomically, and a
chunk is marked done only after it is written, so an interrupted run resumes at the first missing chunk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

STORE_FORMAT = "wsi-dala.tiles/1"
TILES, COORDS, TISSUE_FRACTION, TILE_CHUNKS_DONE = "tiles", "coords", "tissue_fraction", "tile_chunks_done"
TISSUE_MASK = "tissue_mask"  # [h, w] bool at attrs["mask_downsample"] level-0 px per pixel


def _compressor() -> BloscCodec:
    # zstd level 1: lossless, and fast enough not to be the bottleneck of tiling (level 3 is 2x slower).
    return BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")


def create_tile_store(
    path: str | os.PathLike,
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    tile_size_px: int,
    chunk_tiles: int,
    attrs: dict[str, Any],
    tissue_mask: np.ndarray | None = None,
) -> zarr.Group:
    """Create an empty store with its geometry written and no tile chunk done.

    Built under a temporary name and renamed into place, so a crash while creating it never leaves a
    half-made store at ``path`` (which would look like someone else's folder).
    """
    final = Path(path)
    building = final.with_name(f".{final.name}.partial")
    if building.exists():
        shutil.rmtree(building)
    group = zarr.open_group(building, mode="w", zarr_format=3)
    n = len(coords)
    chunk = max(1, chunk_tiles)
    group.create_array(
        TILES,
        shape=(n, tile_size_px, tile_size_px, 3),
        chunks=(chunk, tile_size_px, tile_size_px, 3),
        dtype="uint8",
        compressors=_compressor(),
        fill_value=255,
    )
    group.create_array(COORDS, data=np.asarray(coords, dtype=np.int64).reshape(n, 2), chunks=(max(1, n), 2))
    group.create_array(TISSUE_FRACTION, data=np.asarray(tissue_fraction, dtype=np.float32), chunks=(max(1, n),))
    if tissue_mask is not None:
        group.create_array(TISSUE_MASK, data=np.asarray(tissue_mask, dtype=bool))
    n_chunks = n_chunks_of(n, chunk)
    group.create_array(TILE_CHUNKS_DONE, data=np.zeros(n_chunks, dtype=bool), chunks=(max(1, n_chunks),))
    group.attrs.update({"format": STORE_FORMAT, "complete": False, "chunk_tiles": chunk, **attrs})
    building.rename(final)
    return open_store(final, mode="r+")


def n_chunks_of(n: int, chunk: int) -> int:
    return (n + chunk - 1) // chunk


def open_store(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    return zarr.open_group(Path(path), mode=mode, zarr_format=3)


def is_complete(path: str | os.PathLike) -> bool:
    """True when a store exists and its writer finished."""
    try:
        return bool(open_store(path).attrs.get("complete", False))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False


def chunks_done(group: zarr.Group, name: str = TILE_CHUNKS_DONE) -> np.ndarray:
    return np.asarray(group[name][:], dtype=bool)


def mark_chunk_done(group: zarr.Group, index: int, done: np.ndarray, name: str = TILE_CHUNKS_DONE) -> None:
    """Record one chunk as written. Called from one thread only; the whole small array is rewritten."""
    done[index] = True
    group[name][:] = done
