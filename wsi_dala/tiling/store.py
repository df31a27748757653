"""The tile store's schema: every array name and attribute key of ``tiles.zarr``, defined here once.

```
tiles.zarr/                      (Zarr v3)
  tiles              [N, T, T, 3] uint8    chunked by ``chunk_tiles``, zstd
  coords             [N, 2]       int64    level-0 top-left (x, y), QuPath's frame
  tissue_fraction    [N]          float32
  tissue_mask        [h, w]       bool     ``mask_downsample`` level-0 px per pixel
  ink_mask           [h, w]       bool     marker ink (margin included), same grid as tissue_mask
  fold_mask          [h, w]       bool     folded (double-layer) tissue
  qc_ink             [N]          float32  fraction of the tile covered by ink
  qc_fold            [N]          float32  fraction of the tile covered by folded tissue
  qc_edge_blur_um    [N, b, b]    float32  edge blur σ (µm) of each part of the tile (NaN: too few edges, not measured)
  qc_blur            [N]          float32  share of the tile's judged parts out of focus (at completion)
  qc_flags           [N]          uint8    wsi_dala.tissue.qc bits: 1 blur, 2 fold, 4 ink (at completion)
  tile_chunks_done   [n_chunks]   bool     which tile chunks are fully written (the resume point)
  scores             [N, C]       float32  class probabilities          (written by scoring)
  cams               [N, g, g]    float32  raw Grad-CAM of the positive class (written by scoring)
  score_chunks_done  [n_chunks]   bool
  attrs: format, complete, chunk_tiles, the ``TilingRecord`` fields, ``qc`` (a ``QCRecord``, at
         completion), ``stain`` (the slide's measured stain, or null), and once scored the
         ``ScoringRecord`` fields plus scoring_key / scores_complete
```
A store is usable only when ``complete`` is true; zarr writes each chunk atomically and a chunk is
marked done only after it is written, so an interrupted run resumes at the first missing chunk.

Stages never spell a name or key: they hold a ``TileStore`` and read its ``StoreInfo`` (read once from
the attributes) and its arrays through typed methods.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from wsi_dala.core.errors import OutputError
from wsi_dala.core.layout import building_path
from wsi_dala.tiling.store_records import (
    QC_ATTRIBUTE as _QC,
)
from wsi_dala.tiling.store_records import (
    QCMasks,
    QCRecord,
    ScoringRecord,
    StoreInfo,
    TilingRecord,
    n_chunks_of,
)
from wsi_dala.tissue.qc import QC_PARTS  # qc_edge_blur_um holds QC_PARTS x QC_PARTS parts of each tile

if TYPE_CHECKING:
    import dask.array

log = logging.getLogger(__name__)
STORE_FORMAT = "wsi-dala.tiles/1"

# Array names.
TILES, COORDS, TISSUE_FRACTION, TISSUE_MASK = "tiles", "coords", "tissue_fraction", "tissue_mask"
TILE_CHUNKS_DONE = "tile_chunks_done"
INK_MASK, FOLD_MASK = "ink_mask", "fold_mask"
QC_INK, QC_FOLD, QC_EDGE_BLUR, QC_BLUR, QC_FLAGS = "qc_ink", "qc_fold", "qc_edge_blur_um", "qc_blur", "qc_flags"
SCORES, CAMS, SCORE_CHUNKS_DONE = "scores", "cams", "score_chunks_done"
SCORE_SD = "score_sd"  # per tile: SD of the positive probability over TTA views / MC-dropout passes (NaN: not measured)
_SCORE_ARRAYS = (SCORES, CAMS, SCORE_SD, SCORE_CHUNKS_DONE)

# Attribute keys that are not fields of the records below.
_FORMAT, _COMPLETE, _CHUNK_TILES = "format", "complete", "chunk_tiles"
_SCORING_KEY, _SCORES_COMPLETE = "scoring_key", "scores_complete"
_STAIN = "stain"
_PER_TILE_QC = (QC_INK, QC_FOLD)
_TILING_KEY = "tiling_key"  # the TilingRecord field that says which slide and settings a store was cut with

StoreState = Literal["new", "done", "resume", "replace"]


def _compressor() -> BloscCodec:
    # zstd level 1: lossless, and fast enough not to be the bottleneck of tiling (level 3 is 2x slower).
    return BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")


class TileStore:
    """A tile store on disk: typed reads and writes of its arrays and attributes."""

    def __init__(self, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r") -> None:
        self.path = Path(path)
        self.group: zarr.Group = zarr.open_group(self.path, mode=mode, zarr_format=3)
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """An array of the store, opened once (opening reads its metadata from disk)."""
        if name not in self._arrays:
            array = self.group[name]
            assert isinstance(array, zarr.Array), f"{self.path}/{name} is not an array"
            self._arrays[name] = array
        return self._arrays[name]

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        coords: np.ndarray,
        tissue_fraction: np.ndarray,
        tiling: TilingRecord,
        chunk_tiles: int,
        tissue_mask: np.ndarray | None = None,
        qc: QCMasks | None = None,
    ) -> TileStore:
        """An empty store with its geometry written and no tile chunk done.

        Built under a temporary name and renamed into place, so a crash while creating it never leaves a
        half-made store at ``path`` (which would look like someone else's folder).
        """
        final = Path(path)
        building = building_path(final)
        if building.exists():
            shutil.rmtree(building)
        group = zarr.open_group(building, mode="w", zarr_format=3)
        n, side, chunk = len(coords), tiling.tile_size_px, max(1, chunk_tiles)
        group.create_array(
            TILES,
            shape=(n, side, side, 3),
            chunks=(chunk, side, side, 3),
            dtype="uint8",
            compressors=_compressor(),
            fill_value=255,
        )
        group.create_array(COORDS, data=np.asarray(coords, dtype=np.int64).reshape(n, 2), chunks=(max(1, n), 2))
        group.create_array(TISSUE_FRACTION, data=np.asarray(tissue_fraction, dtype=np.float32), chunks=(max(1, n),))
        if tissue_mask is not None:
            group.create_array(TISSUE_MASK, data=np.asarray(tissue_mask, dtype=bool))
        if qc is not None:
            group.create_array(INK_MASK, data=np.asarray(qc.ink_mask, dtype=bool))
            group.create_array(FOLD_MASK, data=np.asarray(qc.fold_mask, dtype=bool))
        per_tile = (max(1, n),)
        ink = qc.ink_fraction if qc is not None else np.zeros(n)
        fold = qc.fold_fraction if qc is not None else np.zeros(n)
        group.create_array(QC_INK, data=np.asarray(ink, dtype=np.float32), chunks=per_tile)
        group.create_array(QC_FOLD, data=np.asarray(fold, dtype=np.float32), chunks=per_tile)
        parts = QC_PARTS
        group.create_array(
            QC_EDGE_BLUR, shape=(n, parts, parts), chunks=(chunk, parts, parts), dtype="float32", fill_value=np.nan
        )
        n_chunks = n_chunks_of(n, chunk)
        group.create_array(TILE_CHUNKS_DONE, data=np.zeros(n_chunks, dtype=bool), chunks=(max(1, n_chunks),))
        group.update_attributes(
            {_FORMAT: STORE_FORMAT, _COMPLETE: False, _CHUNK_TILES: chunk, _STAIN: None, **tiling.to_attrs()}
        )
        building.rename(final)
        return cls(final, mode="r+")

    # ------------------------------------------------------------------ attributes

    def _update_attrs(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the group's attributes as they are on disk now. zarr merges into the copy
        it read when the group was opened, so another handle's update (the scorer's, while the tiler
        still writes) would otherwise be overwritten with stale values."""
        fresh = zarr.open_group(self.path, mode="r+", zarr_format=3)
        fresh.update_attributes(values)  # one atomic write of zarr.json (attrs.update writes once per key)
        self.group = fresh
        self.__dict__.pop("info", None)

    @cached_property
    def info(self) -> StoreInfo:
        attrs: dict[str, Any] = dict(self.group.attrs)
        scoring = None
        if attrs.get(_SCORES_COMPLETE):
            names = {f.name for f in fields(ScoringRecord)}
            scoring = ScoringRecord(**{k: attrs[k] for k in names if k in attrs})
        return StoreInfo(
            n_tiles=int(self._array(COORDS).shape[0]),
            chunk_tiles=int(attrs[_CHUNK_TILES]),
            complete=bool(attrs.get(_COMPLETE, False)),
            tiling=TilingRecord.from_attrs(attrs),
            scoring=scoring,
            qc=QCRecord.from_attrs(attrs, str(self.path)),
            stain=attrs.get(_STAIN) if isinstance(attrs.get(_STAIN), dict) else None,
        )

    def mark_complete(
        self, blur: np.ndarray, flags: np.ndarray, qc: QCRecord, stain: dict[str, Any] | None = None
    ) -> None:
        """Write the per-tile QC verdicts, their record and the slide's stain, then mark the store usable."""
        n = self.info.n_tiles
        with self._naming_failures():
            for name, data, dtype in ((QC_BLUR, blur, np.float32), (QC_FLAGS, flags, np.uint8)):
                if name in self.group:
                    del self.group[name]
                self._arrays.pop(name, None)
                self.group.create_array(name, data=np.asarray(data, dtype=dtype).reshape(n), chunks=(max(1, n),))
            self._update_attrs({_QC: asdict(qc), _STAIN: stain, _COMPLETE: True})
        self.__dict__.pop("info", None)

    # ------------------------------------------------------------------ tiles

    def coords(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(COORDS)[rows])

    def tissue_fraction(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(TISSUE_FRACTION)[rows])

    def tiles(self, rows: slice | int = slice(None)) -> np.ndarray:
        return np.asarray(self._array(TILES)[rows])

    def tiles_at(self, rows: np.ndarray) -> np.ndarray:
        """Tiles at scattered rows (a sample spread over the slide), one read per chunk touched."""
        return np.asarray(self._array(TILES).oindex[np.asarray(rows, dtype=np.int64)])

    def tissue_mask(self) -> np.ndarray | None:
        return np.asarray(self._array(TISSUE_MASK)[:]) if TISSUE_MASK in self.group else None

    def ink_mask(self) -> np.ndarray | None:
        return np.asarray(self._array(INK_MASK)[:]) if INK_MASK in self.group else None

    def fold_mask(self) -> np.ndarray | None:
        return np.asarray(self._array(FOLD_MASK)[:]) if FOLD_MASK in self.group else None

    def qc_ink(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(QC_INK)[rows])

    def qc_fold(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(QC_FOLD)[rows])

    def qc_edge_blur_um(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(QC_EDGE_BLUR)[rows])

    def qc_blur(self, rows: slice = slice(None)) -> np.ndarray:
        """Share of each tile's tissue out of focus (zeros before the store is complete)."""
        return np.asarray(self._array(QC_BLUR)[rows]) if QC_BLUR in self.group else self._zeros(rows, np.float32)

    def qc_flags(self, rows: slice = slice(None)) -> np.ndarray:
        """wsi_dala.tissue.qc flag bits per tile (zeros before the store is complete)."""
        return np.asarray(self._array(QC_FLAGS)[rows]) if QC_FLAGS in self.group else self._zeros(rows, np.uint8)

    def usable_tiles(self, rows: slice = slice(None)) -> np.ndarray:
        """Tiles the later stages use: all, except QC-flagged tiles when QC ran in ``exclude`` mode."""
        flags = self.qc_flags(rows)
        qc = self.info.qc
        return flags == 0 if qc is not None and qc.mode == "exclude" else np.ones(len(flags), dtype=bool)

    def _zeros(self, rows: slice, dtype: type) -> np.ndarray:
        return np.zeros(len(range(*rows.indices(self.info.n_tiles))), dtype=dtype)

    def tiles_dask(self) -> dask.array.Array:
        """The tiles as a Dask array, one block per Zarr chunk (what scoring maps over)."""
        import dask.array as da

        return da.from_zarr(str(self.path), component=TILES)

    def write_tiles(self, start: int, data: np.ndarray, edge_blur_um: np.ndarray | None = None) -> None:
        """Tiles from row ``start`` on, with their edge blur per part (wsi_dala.tissue.qc) when it was measured."""
        with self._naming_failures():
            self._array(TILES)[start : start + len(data)] = data
            if edge_blur_um is not None:
                parts = np.full((len(edge_blur_um), QC_PARTS, QC_PARTS), np.nan, dtype=np.float32)
                parts[:, : edge_blur_um.shape[1], : edge_blur_um.shape[2]] = edge_blur_um[:, :QC_PARTS, :QC_PARTS]
                self._array(QC_EDGE_BLUR)[start : start + len(edge_blur_um)] = parts

    @contextmanager
    def _naming_failures(self) -> Iterator[None]:
        """Disk full or permission lost mid-write: the OS names no file, so we name the store."""
        try:
            yield
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot be written ({exc.strerror or exc})") from exc

    def tile_chunks_done(self) -> np.ndarray:
        return np.asarray(self._array(TILE_CHUNKS_DONE)[:], dtype=bool)

    def mark_tile_chunk_done(self, index: int, done: np.ndarray) -> None:
        """Record one chunk as written. One thread only; the whole small array is rewritten."""
        done[index] = True
        self._array(TILE_CHUNKS_DONE)[:] = done

    # ------------------------------------------------------------------ scores

    def scores(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(SCORES)[rows])

    def cams(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._array(CAMS)[rows])

    def score_sd(self, rows: slice = slice(None)) -> np.ndarray:
        """Per tile: SD of the positive probability over TTA views and MC-dropout passes; NaN where not
        measured (and for a store scored before uncertainty existed)."""
        if SCORE_SD not in self.group:
            return np.full(len(range(*rows.indices(self.info.n_tiles))), np.nan, dtype=np.float32)
        return np.asarray(self._array(SCORE_SD)[rows])

    def positive_scores(self, rows: slice = slice(None)) -> np.ndarray:
        """The positive class's probability per tile."""
        record = self.info.require_scores(str(self.path))
        return self.scores(rows)[:, record.positive_index]

    def prepare_scores(self, n_classes: int, cam_grid: int, scoring_key: str) -> np.ndarray:
        """Create (or reset, when the model or precision changed) the score arrays; returns the done flags."""
        group = self.group
        n, chunk = self.info.n_tiles, self.info.chunk_tiles
        expected = {
            SCORES: (n, n_classes),
            CAMS: (n, cam_grid, cam_grid),
            SCORE_SD: (n,),
            SCORE_CHUNKS_DONE: (n_chunks_of(n, chunk),),
        }
        if group.attrs.get(_SCORING_KEY) == scoring_key and self._shapes_are(expected):
            return np.asarray(self._array(SCORE_CHUNKS_DONE)[:], dtype=bool)
        # Forget the old key first: a crash below must not leave new arrays under an old key, or the reverse.
        self._update_attrs({_SCORING_KEY: None, _SCORES_COMPLETE: False})
        for name in _SCORE_ARRAYS:
            self._arrays.pop(name, None)
            if name in group:
                del group[name]
        group.create_array(SCORES, shape=(n, n_classes), chunks=(chunk, n_classes), dtype="float32", fill_value=np.nan)
        group.create_array(
            CAMS, shape=(n, cam_grid, cam_grid), chunks=(chunk, cam_grid, cam_grid), dtype="float32", fill_value=np.nan
        )
        group.create_array(SCORE_SD, shape=(n,), chunks=(chunk,), dtype="float32", fill_value=np.nan)
        done = np.zeros(n_chunks_of(n, chunk), dtype=bool)
        group.create_array(SCORE_CHUNKS_DONE, data=done, chunks=(max(1, len(done)),))
        self._update_attrs({_SCORING_KEY: scoring_key, _SCORES_COMPLETE: False})
        self.__dict__.pop("info", None)
        return done

    def _shapes_are(self, expected: dict[str, tuple[int, ...]]) -> bool:
        """All these arrays exist with these shapes (an interrupted or foreign write may have left less)."""
        try:
            return all(tuple(self._array(name).shape) == shape for name, shape in expected.items())
        except (KeyError, AssertionError):
            return False

    def write_scores(
        self, chunk_index: int, probabilities: np.ndarray, cams: np.ndarray, sd: np.ndarray | None = None
    ) -> None:
        """One chunk's rows (runs where the task ran, e.g. on a Dask worker); ``sd``: None when not measured."""
        start = chunk_index * self.info.chunk_tiles
        with self._naming_failures():
            self._array(CAMS)[start : start + len(cams)] = cams
            if sd is not None:
                self._array(SCORE_SD)[start : start + len(sd)] = sd
            self._array(SCORES)[start : start + len(probabilities)] = probabilities

    def mark_score_chunk_done(self, index: int, done: np.ndarray) -> None:
        done[index] = True
        self._array(SCORE_CHUNKS_DONE)[:] = done

    def mark_scores_complete(self, record: ScoringRecord) -> None:
        self._update_attrs({_SCORES_COMPLETE: True, **asdict(record)})
        self.__dict__.pop("info", None)


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when a store exists and its writer finished."""
    try:
        return bool(zarr.open_group(Path(path), mode="r", zarr_format=3).attrs.get(_COMPLETE, False))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False


def existing_store_state(path: Path, tiling_key: str) -> StoreState:
    """'new', 'done', 'resume' or 'replace' (ours, but the slide or settings changed, or it is damaged).

    Reads only. A folder that is not a tile store is refused, never removed.
    """
    if not path.exists():
        return "new"
    try:
        attrs = dict(zarr.open_group(path, mode="r", zarr_format=3).attrs)
    except Exception:
        attrs = {}
    if attrs.get(_FORMAT) != STORE_FORMAT:
        raise OutputError(f"{path}: exists and is not a wsi-dala tile store; choose another --out")
    if attrs.get(_TILING_KEY) != tiling_key:
        return "replace"
    problem = store_damage(path)
    if problem:
        log.warning("%s: damaged (%s); tiling again", path, problem)
        return "replace"
    return "done" if attrs.get(_COMPLETE) else "resume"


def store_damage(path: Path) -> str | None:
    """What is wrong with a store's arrays against its attributes (None: consistent). Cheap: metadata only."""
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
        attrs: dict[str, Any] = dict(group.attrs)
        chunk, side = int(attrs[_CHUNK_TILES]), int(attrs["tile_size_px"])
        names = (TILES, COORDS, TISSUE_FRACTION, *_PER_TILE_QC, QC_EDGE_BLUR, TILE_CHUNKS_DONE)
        arrays = {name: group[name] for name in names}
        shapes = {name: tuple(node.shape) for name, node in arrays.items() if isinstance(node, zarr.Array)}
    except (KeyError, ValueError, TypeError, OSError, zarr.errors.BaseZarrError) as exc:
        return f"missing {exc}"
    if len(shapes) < len(arrays):
        return "an array is a group"
    n = shapes[COORDS][0]
    expected = {
        TILES: (n, side, side, 3),
        COORDS: (n, 2),
        TISSUE_FRACTION: (n,),
        **{name: (n,) for name in _PER_TILE_QC},
        QC_EDGE_BLUR: (n, QC_PARTS, QC_PARTS),
        TILE_CHUNKS_DONE: (n_chunks_of(n, max(1, chunk)),),
    }
    for name, shape in expected.items():
        if shapes[name] != shape:
            return f"{name} has shape {shapes[name]}, expected {shape}"
    return None
