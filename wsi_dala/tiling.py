"""Cut a slide into magnification-matched tiles and write them to a Zarr store.

Speed with bounded memory: tiles are grouped into blocks; each block is one large aligned region
read (one decode of each JPEG tile of the slide instead of several), cut into tiles and resized.
Chunks of tiles are read by a small thread pool (OpenSlide and imagecodecs release the GIL) and
written as they finish; at most a few chunks are in memory at once, never a whole level.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsi_dala import __version__
from wsi_dala.errors import OutputError
from wsi_dala.fileio import ensure_writable_dir, save_png_atomic
from wsi_dala.grid import LevelChoice, block_order, choose_level, grid_origins, tissue_fractions
from wsi_dala.identity import config_hash, slide_fingerprint
from wsi_dala.layout import RunLayout
from wsi_dala.slide import Slide
from wsi_dala.store import (
    COORDS,
    STORE_FORMAT,
    TILE_CHUNKS_DONE,
    TILES,
    chunks_done,
    create_tile_store,
    mark_chunk_done,
    open_store,
)
from wsi_dala.tissue import TissueSettings, detect_tissue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingConfig:
    """How tiles are cut. Sizes in pixels of the stored tiles unless named otherwise."""

    target_mpp: float = 0.5
    tile_size_px: int = 224
    stride_px: int | None = None  # None: equal to the tile size (no overlap)
    min_tissue: float = 0.25  # keep tiles with at least this fraction of tissue
    tolerance: float = 0.05  # within ±5 % of the target no resize is done
    allow_upsample: bool = False
    chunk_tiles: int = 64  # tiles per Zarr chunk (the unit of writing and resuming)
    workers: int = 2  # reader threads
    region_level_px: int = 2048  # side of the large region reads, in pixels of the read level
    tissue: TissueSettings = field(default_factory=TissueSettings)

    @property
    def stride(self) -> int:
        return self.stride_px or self.tile_size_px

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one slide are, before any pixel of them is read."""

    choice: LevelChoice
    stride_l0: float
    origins: np.ndarray  # [N, 2] kept tiles, in reading order
    tissue_fraction: np.ndarray  # [N]
    grid_tiles: int  # tiles in the full grid, before the tissue filter
    mask: np.ndarray
    mask_downsample: float
    thumbnail: np.ndarray


@dataclass(frozen=True)
class TilingResult:
    store: Path
    n_tiles: int
    grid_tiles: int
    level: int
    level_mpp: float
    resize_factor: float
    effective_mpp: float
    slide_mpp: float
    mpp_source: str
    seconds: float
    chunks_resumed: int
    skipped: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def resize_tile(region: np.ndarray, tile_size_px: int) -> np.ndarray:
    """Resize a square read to the tile size, with antialiasing when shrinking.

    An integer factor (the common case: 40x slide, 20x model) is an exact area average (box filter,
    ``Image.reduce``); other factors use Lanczos, whose kernel Pillow widens by the factor.
    """
    side = region.shape[0]
    if side == tile_size_px and region.shape[1] == tile_size_px:
        return region
    image = Image.fromarray(region)
    if side > tile_size_px and side % tile_size_px == 0:
        return np.asarray(image.reduce(side // tile_size_px))
    method = Image.Resampling.LANCZOS if side > tile_size_px else Image.Resampling.BICUBIC
    return np.asarray(image.resize((tile_size_px, tile_size_px), method))


def plan_tiles(slide: Slide, config: TilingConfig) -> TilePlan:
    """Choose the level, lay the grid, detect tissue and keep tiles with enough of it."""
    info = slide.info
    mpp0 = slide.require_mpp().mpp
    level_mpps = [mpp0 * d for d in info.level_downsamples]
    choice = choose_level(
        level_mpps,
        info.level_downsamples,
        config.target_mpp,
        config.tile_size_px,
        config.tolerance,
        config.allow_upsample,
        slide_name=str(slide.path),
    )
    stride_l0 = choice.tile_size_l0 * config.stride / config.tile_size_px
    # The mask must resolve a tile: at least ~16 mask pixels along a tile side.
    tile_um = choice.tile_size_l0 * mpp0
    mask_mpp = max(mpp0, min(config.tissue.mask_mpp, tile_um / 16))
    thumbnail, mask_downsample = slide.read_downsampled(mask_mpp)
    mask = detect_tissue(thumbnail, mpp0 * mask_downsample, config.tissue)
    origins = grid_origins(info.width, info.height, choice.tile_size_l0, stride_l0)
    fractions = tissue_fractions(mask, mask_downsample, origins, choice.tile_size_l0)
    keep = fractions >= max(config.min_tissue, 1e-9)
    origins, fractions = origins[keep], fractions[keep]
    block_l0 = max(1, config.region_level_px // max(1, choice.read_size_level_px)) * stride_l0
    order = block_order(origins, block_l0)
    return TilePlan(
        choice=choice,
        stride_l0=stride_l0,
        origins=origins[order],
        tissue_fraction=fractions[order],
        grid_tiles=int(keep.size),
        mask=mask,
        mask_downsample=mask_downsample,
        thumbnail=thumbnail,
    )


def read_tiles(
    slide: Slide, origins: np.ndarray, choice: LevelChoice, tile_size_px: int, block_l0: float
) -> np.ndarray:
    """Read tiles [n, T, T, 3]: one region read per block of neighbouring tiles, then cut and resize."""
    out = np.empty((len(origins), tile_size_px, tile_size_px, 3), dtype=np.uint8)
    downsample = choice.tile_size_l0 / choice.read_size_level_px
    read_px = choice.read_size_level_px
    keys = (origins // block_l0).astype(np.int64)
    for key in np.unique(keys, axis=0):
        members = np.flatnonzero((keys == key).all(axis=1))
        x0, y0 = origins[members].min(axis=0)
        # Offsets of each tile inside the region, in pixels of the read level.
        offsets = np.round((origins[members] - (x0, y0)) / downsample).astype(np.int64)
        width, height = offsets.max(axis=0) + read_px
        region = slide.read_region(int(x0), int(y0), choice.level, int(width), int(height))
        for index, (ox, oy) in zip(members, offsets, strict=False):
            out[index] = resize_tile(region[oy : oy + read_px, ox : ox + read_px], tile_size_px)
    return out


def _tiling_key(fingerprint: dict, config: TilingConfig, reader: str, slide_mpp: float | None) -> str:
    return config_hash({"slide": fingerprint, "config": config.to_dict(), "reader": reader, "slide_mpp": slide_mpp})


def _store_state(store_path: Path, key: str) -> str:
    """'new', 'done', 'resume' or 'replace' (ours, but the slide or settings changed). Reads only."""
    if not store_path.exists():
        return "new"
    try:
        attrs = dict(open_store(store_path).attrs)
    except Exception:
        attrs = {}
    if attrs.get("format") != STORE_FORMAT:
        raise OutputError(f"{store_path}: exists and is not a wsi-dala tile store; choose another --out")
    if attrs.get("tiling_key") == key:
        return "done" if attrs.get("complete") else "resume"
    return "replace"


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    config: TilingConfig | None = None,
    reader: str = "auto",
    slide_mpp: float | None = None,
    progress: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
) -> TilingResult:
    """Tile one slide into ``<out_dir>/tiles.zarr`` (resuming or skipping when it can).

    ``on_chunk_written(chunk_index)`` is called after each chunk is durably written.
    """
    config = config or TilingConfig()
    started = time.perf_counter()
    slide = Slide(slide_path, reader=reader, slide_mpp=slide_mpp)
    try:
        resolution = slide.require_mpp()
        layout = RunLayout.for_slide(out_dir, slide_path)
        fingerprint = slide_fingerprint(slide.path)
        key = _tiling_key(fingerprint, config, slide.reader, slide_mpp)
        state = _store_state(layout.tiles_store, key)
        if state == "done":  # nothing to read, not even the thumbnail
            return _result(layout, open_store(layout.tiles_store), started, resumed=0, skipped=True)
        plan = plan_tiles(slide, config)  # validates the target before anything is written or removed
        ensure_writable_dir(layout.root)
        if state == "replace":
            log.info("%s: slide or settings changed since it was written; tiling again", layout.tiles_store)
            shutil.rmtree(layout.tiles_store)
            state = "new"
        if state == "new" or not layout.thumbnail_png.exists() or not layout.tissue_mask_png.exists():
            save_png_atomic(layout.thumbnail_png, Image.fromarray(plan.thumbnail))
            save_png_atomic(layout.tissue_mask_png, Image.fromarray(plan.mask.astype(np.uint8) * 255))
        if state == "new":
            attrs = _store_attrs(slide, plan, config, fingerprint, key, resolution)
            group = create_tile_store(
                layout.tiles_store,
                plan.origins,
                plan.tissue_fraction,
                config.tile_size_px,
                config.chunk_tiles,
                attrs,
                tissue_mask=plan.mask,
            )
        else:
            group = open_store(layout.tiles_store, mode="r+")
        origins = np.asarray(group[COORDS][:])
        if len(origins) == 0:
            log.warning("%s: no tissue found; writing an empty tile store", slide.path)
        done = chunks_done(group, TILE_CHUNKS_DONE)
        resumed = int(done.sum())
        _write_chunks(slide, group, origins, plan, config, done, progress, on_chunk_written)
        group.attrs["complete"] = True
        return _result(layout, group, started, resumed=resumed, skipped=False)
    finally:
        slide.close()


def _write_chunks(
    slide: Slide,
    group: Any,
    origins: np.ndarray,
    plan: TilePlan,
    config: TilingConfig,
    done: np.ndarray,
    progress: bool,
    on_chunk_written: Callable[[int], None] | None,
) -> None:
    chunk = int(group.attrs["chunk_tiles"])
    todo = [i for i in range(len(done)) if not done[i]]
    block_l0 = max(1, config.region_level_px // max(1, plan.choice.read_size_level_px)) * plan.stride_l0
    tiles = group[TILES]
    bar = tqdm(
        total=len(origins),
        initial=int(done.sum()) * chunk if todo else len(origins),
        unit="tile",
        desc="tiling",
        disable=not progress,
        leave=False,
    )

    def job(index: int) -> np.ndarray:
        sl = slice(index * chunk, min(len(origins), (index + 1) * chunk))
        return read_tiles(slide, origins[sl], plan.choice, config.tile_size_px, block_l0)

    in_flight: dict[Future, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        try:
            queue = iter(todo)
            for index in queue:
                in_flight[pool.submit(job, index)] = index
                if len(in_flight) >= 2 * max(1, config.workers):
                    break
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = in_flight.pop(future)
                    data = future.result()
                    start = index * chunk
                    tiles[start : start + len(data)] = data
                    mark_chunk_done(group, index, done)
                    bar.update(len(data))
                    if on_chunk_written is not None:
                        on_chunk_written(index)
                    next_index = next(queue, None)
                    if next_index is not None:
                        in_flight[pool.submit(job, next_index)] = next_index
        finally:
            for future in in_flight:
                future.cancel()
            bar.close()


def _store_attrs(
    slide: Slide, plan: TilePlan, config: TilingConfig, fingerprint: dict, key: str, resolution: Any
) -> dict[str, Any]:
    info = slide.info
    return {
        "slide": {
            "path": str(slide.path.resolve()),
            "name": slide.path.name,
            **fingerprint,
            "width": info.width,
            "height": info.height,
            "vendor": info.vendor,
            "objective_power": info.objective_power,
            "bounds_offset": list(info.bounds_offset),
        },
        "reader": slide.reader,
        "slide_mpp": resolution.mpp,
        "mpp_source": resolution.source,
        "target_mpp": config.target_mpp,
        "effective_mpp": plan.choice.effective_mpp,
        "level": plan.choice.level,
        "level_mpp": plan.choice.level_mpp,
        "level_downsample": info.level_downsamples[plan.choice.level],
        "read_size_level_px": plan.choice.read_size_level_px,
        "resize_factor": plan.choice.resize_factor,
        "tile_size_px": config.tile_size_px,
        "tile_size_l0": plan.choice.tile_size_l0,
        "stride_px": config.stride,
        "stride_l0": plan.stride_l0,
        "min_tissue": config.min_tissue,
        "tissue": config.tissue.to_dict(),
        "mask_downsample": plan.mask_downsample,
        "grid_tiles": plan.grid_tiles,
        "tiling_key": key,
        "software": {"wsi_dala": __version__},
    }


def _result(layout: RunLayout, group: Any, started: float, resumed: int, skipped: bool) -> TilingResult:
    """The summary, read from the store's attributes (the one record of how it was cut)."""
    attrs = group.attrs
    return TilingResult(
        store=layout.tiles_store,
        n_tiles=int(group[COORDS].shape[0]),
        grid_tiles=int(attrs["grid_tiles"]),
        level=int(attrs["level"]),
        level_mpp=float(attrs["level_mpp"]),
        resize_factor=float(attrs["resize_factor"]),
        effective_mpp=float(attrs["effective_mpp"]),
        slide_mpp=float(attrs["slide_mpp"]),
        mpp_source=str(attrs["mpp_source"]),
        seconds=time.perf_counter() - started,
        chunks_resumed=resumed,
        skipped=skipped,
    )
