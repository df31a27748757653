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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsi_dala import __version__
from wsi_dala.core.config import TilingConfig
from wsi_dala.core.fileio import ensure_writable_dir, save_png_atomic
from wsi_dala.core.identity import config_hash, slide_fingerprint
from wsi_dala.core.layout import RunLayout
from wsi_dala.core.memory import release_freed_memory
from wsi_dala.core.step_times import step
from wsi_dala.slides.reader import Resolution, Slide
from wsi_dala.tiling.grid import LevelChoice, block_order, choose_level, grid_origins, tissue_fractions
from wsi_dala.tiling.store import TileStore, existing_store_state
from wsi_dala.tiling.store_records import QCMasks, QCRecord, SlideRecord, TilingRecord
from wsi_dala.tissue.detect import TissueAnalysis, analyse_tissue
from wsi_dala.tissue.qc import BLUR, FOLD, INK, judge, tile_edge_blur_um
from wsi_dala.tissue.qc_figure import QCPicture, blurred_tiles_mask, render_qc

log = logging.getLogger(__name__)
FINEST_TISSUE_MPP = 4.0  # µm/px: the finest the tissue analysis runs at by default (see plan_tiles)
GREY_CHROMA = 8  # max - min over RGB below this for 99 % of the thumbnail: the slide has no colour


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one slide are, before any pixel of them is read."""

    choice: LevelChoice
    stride_l0: float
    origins: np.ndarray  # [N, 2] kept tiles, in reading order
    tissue_fraction: np.ndarray  # [N]
    ink_fraction: np.ndarray  # [N]
    fold_fraction: np.ndarray  # [N]
    grid_tiles: int  # tiles in the full grid, before the tissue filter
    analysis: TissueAnalysis
    mask_downsample: float
    mask_mpp: float
    thumbnail: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.analysis.tissue


@dataclass(frozen=True)
class TilingResult:
    """What `tile_slide` did; how the tiles were cut is the store's own record."""

    store: Path
    n_tiles: int
    record: TilingRecord
    seconds: float
    chunks_resumed: int
    skipped: bool


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


def choose_tile_level(slide: Slide, config: TilingConfig) -> LevelChoice:
    """The level to read and the resize that serve the target µm/px (errors if the slide cannot)."""
    info = slide.info
    mpp0 = slide.require_mpp().mpp
    return choose_level(
        [mpp0 * d for d in info.level_downsamples],
        info.level_downsamples,
        config.target_mpp,
        config.tile_px,
        config.tolerance,
        config.allow_upsample,
        slide_name=str(slide.path),
    )


def check_slide(slide_path: str | Path, config: TilingConfig) -> LevelChoice:
    """Open the slide and check it can serve ``config`` (readable, µm/px known, level available): cheap,
    so a run can refuse a bad slide before it touches its output folder. The level chosen is handed on
    to :func:`tile_slide`, which does not choose again."""
    with Slide(slide_path, reader=config.reader, slide_mpp=config.slide_mpp) as slide:
        return choose_tile_level(slide, config)


def plan_tiles(slide: Slide, config: TilingConfig, level: LevelChoice | None = None) -> TilePlan:
    """Choose the level (unless the caller has: ``level``), lay the grid, find tissue, ink and folds, and keep
    tiles with enough tissue."""
    info = slide.info
    mpp0 = slide.require_mpp().mpp
    choice = level if level is not None else choose_tile_level(slide, config)
    stride_l0 = choice.tile_size_l0 * config.stride / config.tile_px
    # The mask must resolve a tile: at least ~16 mask pixels along a tile side, but no finer than
    # FINEST_TISSUE_MPP unless asked: at cell resolution pale pixels inside tissue pass for glass and raise
    # the glass-noise threshold above all tissue (0 % tissue found at 0.5-1.5 µm/px on slides where 2-8 µm/px
    # find 42 %), so tiles under ~64 µm get fewer mask pixels, not an empty slide.
    tile_um = choice.tile_size_l0 * mpp0
    mask_mpp = max(mpp0, min(config.tissue.mask_mpp, max(tile_um / 16, FINEST_TISSUE_MPP)))
    with step("tiling: thumbnail read"):
        thumbnail, mask_downsample = slide.read_downsampled(mask_mpp)
    with step("tiling: tissue, ink and fold masks"):
        analysis = analyse_tissue(thumbnail, mpp0 * mask_downsample, config.tissue)
    origins = grid_origins(info.width, info.height, choice.tile_size_l0, stride_l0)

    def covered(mask: np.ndarray) -> np.ndarray:
        return tissue_fractions(mask, mask_downsample, origins, choice.tile_size_l0)

    fractions = covered(analysis.tissue)
    keep = fractions >= max(config.min_tissue, 1e-9)
    ink, fold = covered(analysis.ink), covered(analysis.fold)
    # Every mode tiles (and scores) every tissue tile: `exclude` leaves flagged tiles out of the later stages,
    # so run.json can say how much tumour that removed.
    origins, fractions, ink, fold = origins[keep], fractions[keep], ink[keep], fold[keep]
    block_l0 = max(1, config.region_level_px // max(1, choice.read_size_level_px)) * stride_l0
    order = block_order(origins, block_l0)
    return TilePlan(
        choice=choice,
        stride_l0=stride_l0,
        origins=origins[order],
        tissue_fraction=fractions[order],
        ink_fraction=ink[order],
        fold_fraction=fold[order],
        grid_tiles=int(keep.size),
        analysis=analysis,
        mask_downsample=mask_downsample,
        mask_mpp=mpp0 * mask_downsample,
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
        with step("tiling: region reads and JPEG decode", len(members)):
            region = slide.read_region(int(x0), int(y0), choice.level, int(width), int(height))
        with step("tiling: cut and resize", len(members)):
            for index, (ox, oy) in zip(members, offsets, strict=False):
                out[index] = resize_tile(region[oy : oy + read_px, ox : ox + read_px], tile_size_px)
    return out


def _tiling_key(fingerprint: dict[str, Any], config: TilingConfig) -> str:
    # Reader threads change how fast tiles are cut, never which: they are not part of the key. Every QC
    # setting is (every one changes a verdict; off measures no edge blur).
    settings = config.model_dump(mode="json", exclude={"reader_threads"})
    return config_hash({"slide": fingerprint, "config": settings})


def tiling_key_for(slide_path: str | Path, config: TilingConfig) -> str:
    """The key a store of ``slide_path`` cut with ``config`` gets (reads only the slide's fingerprint)."""
    return _tiling_key(slide_fingerprint(Path(slide_path)), config)


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    config: TilingConfig,
    progress: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
    layout: RunLayout | None = None,
    level: LevelChoice | None = None,
) -> TilingResult:
    """Tile one slide into ``<out_dir>/tiles.zarr`` (resuming or skipping when it can).

    ``config`` must have its target set (``TilingConfig.resolved``). ``on_chunk_written(chunk_index)``
    is called after each chunk is durably written. ``layout`` and ``level``: the run's, when it has them
    (``layout.root`` is then ``out_dir``), so neither is made twice.
    """
    started = time.perf_counter()
    slide = Slide(slide_path, reader=config.reader, slide_mpp=config.slide_mpp)
    try:
        resolution = slide.require_mpp()
        layout = layout or RunLayout.for_slide(out_dir, slide_path)
        fingerprint = slide_fingerprint(slide.path)
        key = _tiling_key(fingerprint, config)
        state = existing_store_state(layout.tiles_store, key)
        if state == "done":  # nothing to read, not even the thumbnail
            store = TileStore(layout.tiles_store)
            if not layout.qc_png.exists() and layout.thumbnail_png.exists():
                write_qc_png(layout, store)
            return _result(store, started, resumed=0, skipped=True)
        plan = plan_tiles(slide, config, level)  # validates the target before anything is written or removed
        release_freed_memory()  # the tissue analysis briefly needs ~100 bytes a thumbnail pixel
        ensure_writable_dir(layout.root)
        if state == "replace":
            log.info("%s: slide or settings changed since it was written; tiling again", layout.tiles_store)
            shutil.rmtree(layout.tiles_store)
            state = "new"
        if state == "new" or not layout.thumbnail_png.exists() or not layout.tissue_mask_png.exists():
            save_png_atomic(layout.thumbnail_png, Image.fromarray(plan.thumbnail))
            save_png_atomic(layout.tissue_mask_png, Image.fromarray(plan.mask.astype(np.uint8) * 255))
        if state == "new":
            record = _tiling_record(slide, plan, config, fingerprint, key, resolution)
            masks = QCMasks(plan.ink_fraction, plan.fold_fraction, plan.analysis.ink, plan.analysis.fold)
            store = TileStore.create(
                layout.tiles_store,
                plan.origins,
                plan.tissue_fraction,
                record,
                config.chunk_tiles,
                plan.mask,
                qc=masks,
            )
        else:
            store = TileStore(layout.tiles_store, mode="r+")
        if store.info.n_tiles == 0:
            log.warning(
                "%s: no tissue found%s; writing an empty tile store (mask: %s, QC picture: %s)",
                slide.path,
                _why_no_tissue(plan),
                layout.tissue_mask_png,
                layout.qc_png,
            )
        done = store.tile_chunks_done()
        resumed = int(done.sum())
        _write_chunks(slide, store, plan, config, done, progress, on_chunk_written)
        _complete(store, plan, config)
        write_qc_png(layout, store)
        release_freed_memory()
        return _result(store, started, resumed=resumed, skipped=False)
    finally:
        slide.close()


def _write_chunks(
    slide: Slide,
    store: TileStore,
    plan: TilePlan,
    config: TilingConfig,
    done: np.ndarray,
    progress: bool,
    on_chunk_written: Callable[[int], None] | None,
) -> None:
    origins = store.coords()
    rows = store.info.chunk_rows()
    todo = [i for i in range(len(done)) if not done[i]]
    block_l0 = max(1, config.region_level_px // max(1, plan.choice.read_size_level_px)) * plan.stride_l0
    bar = tqdm(
        total=len(origins),
        initial=sum(rows[i].stop - rows[i].start for i in range(len(done)) if done[i]),
        unit="tile",
        desc="tiling",
        disable=not progress,
        leave=False,
    )

    measure_blur = config.qc.mode != "off"

    def job(index: int) -> tuple[np.ndarray, np.ndarray | None]:
        tiles = read_tiles(slide, origins[rows[index]], plan.choice, config.tile_px, block_l0)
        if not measure_blur:
            return tiles, None
        with step("tiling: QC edge blur", len(tiles)):
            return tiles, tile_edge_blur_um(tiles, plan.choice.effective_mpp, plan.analysis.glass_rgb[1])

    in_flight: dict[Future[tuple[np.ndarray, np.ndarray | None]], int] = {}
    threads = config.reader_threads
    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            queue = iter(todo)
            for index in queue:
                in_flight[pool.submit(job, index)] = index
                if len(in_flight) >= 2 * threads:
                    break
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = in_flight.pop(future)
                    data, edge_blur = future.result()
                    with step("tiling: store writes", len(data)):
                        store.write_tiles(rows[index].start, data, edge_blur)
                        store.mark_tile_chunk_done(index, done)
                    bar.update(len(data))
                    if on_chunk_written is not None:
                        with step("tiling: hand-off to scoring (waits while the scorer is behind)", len(data)):
                            on_chunk_written(index)
                    next_index = next(queue, None)
                    if next_index is not None:
                        in_flight[pool.submit(job, next_index)] = next_index
        finally:
            for future in in_flight:
                future.cancel()
            bar.close()


def _why_no_tissue(plan: TilePlan) -> str:
    """A hint when the cause is plain to see: a slide without colour is not stained brightfield tissue."""
    rgb = plan.thumbnail.reshape(-1, 3).astype(np.int16)
    if len(rgb) and np.percentile(rgb.max(axis=1) - rgb.min(axis=1), 99) < GREY_CHROMA:
        return " (the slide has no colour: greyscale or fluorescence? tissue detection expects stained brightfield)"
    return ""


def _tiling_record(
    slide: Slide,
    plan: TilePlan,
    config: TilingConfig,
    fingerprint: dict[str, Any],
    key: str,
    resolution: Resolution,
) -> TilingRecord:
    info = slide.info
    return TilingRecord(
        slide=SlideRecord(
            path=str(slide.path.resolve()),
            name=slide.path.name,
            width=info.width,
            height=info.height,
            vendor=info.vendor,
            objective_power=info.objective_power,
            bounds_offset=info.bounds_offset,
            fingerprint=fingerprint,
        ),
        reader=slide.reader,
        slide_mpp=resolution.mpp,
        mpp_source=resolution.source,
        target_mpp=config.target_mpp,
        effective_mpp=plan.choice.effective_mpp,
        level=plan.choice.level,
        level_mpp=plan.choice.level_mpp,
        level_downsample=info.level_downsamples[plan.choice.level],
        read_size_level_px=plan.choice.read_size_level_px,
        resize_factor=plan.choice.resize_factor,
        tile_size_px=config.tile_px,
        tile_size_l0=plan.choice.tile_size_l0,
        stride_px=config.stride,
        stride_l0=plan.stride_l0,
        min_tissue=config.min_tissue,
        tissue=config.tissue.to_dict(),
        mask_downsample=plan.mask_downsample,
        grid_tiles=plan.grid_tiles,
        tiling_key=key,
        software={"wsi_dala": __version__},
    )


MOSTLY_FLAGGED = 0.9  # QC flags this share of the tiles: the slide itself needs a look (a warning, not a failure)


def _complete(store: TileStore, plan: TilePlan, config: TilingConfig) -> None:
    """Judge every tile's quality from its own measurements, record it, and mark the store usable."""
    qc = config.qc
    verdict = judge(store.qc_edge_blur_um(), fold_fraction=store.qc_fold(), ink_fraction=store.qc_ink(), config=qc)
    flags = verdict.flags if qc.mode != "off" else np.zeros_like(verdict.flags)
    info = store.info
    mask_pixel_um2 = plan.mask_mpp**2
    tile_area_um2 = (min(info.tiling.tile_size_l0, info.tiling.stride_l0) * info.tiling.slide_mpp) ** 2
    counts = flag_counts(flags)
    counts["blur_not_judged"] = int((~verdict.judged).sum()) if qc.mode != "off" else 0
    blurred = (flags & BLUR) > 0
    record = QCRecord(
        mode=qc.mode,
        counts=counts,
        areas_um2={
            "tissue": round(float(plan.analysis.tissue.sum()) * mask_pixel_um2, 1),
            "ink": round(float(plan.analysis.ink.sum()) * mask_pixel_um2, 1),
            "fold": round(float(plan.analysis.fold.sum()) * mask_pixel_um2, 1),
            "blur": round(float((store.tissue_fraction() * verdict.blur)[blurred].sum()) * tile_area_um2, 1),
        },
        excluded_tiles=flag_counts(flags) if qc.mode == "exclude" else {},
        glass_rgb=[round(v, 1) for v in plan.analysis.glass_rgb],
        settings=qc.to_dict(),
        median_edge_blur_um=None
        if qc.mode == "off" or not np.isfinite(verdict.median_edge_blur_um)
        else round(verdict.median_edge_blur_um, 4),
        warning=_mostly_flagged(counts, info.n_tiles),
    )
    if record.warning:
        log.warning("%s: %s", info.tiling.slide.path, record.warning)
    # The stain is measured without inked or folded tiles, in every mode (off stops flagging, not ink being
    # ink); blur is not left out, as it barely moves the stain vectors and `off` does not measure it, so a
    # stain-normalised run scores alike in every mode.
    with step("tiling: slide stain"):
        stain = measure_slide_stain(store, verdict.flags & (FOLD | INK), plan.analysis.glass_rgb)
    store.mark_complete(verdict.blur, flags, record, stain=stain)


def flag_counts(flags: np.ndarray) -> dict[str, int]:
    """Tiles with each QC flag, and with any."""
    return {
        "blur": int(((flags & BLUR) > 0).sum()),
        "fold": int(((flags & FOLD) > 0).sum()),
        "ink": int(((flags & INK) > 0).sum()),
        "any": int((flags > 0).sum()),
    }


def _mostly_flagged(counts: dict[str, int], n_tiles: int) -> str | None:
    """A warning when QC flags almost every tile (the slide needs a look, or a rescan); None otherwise."""
    if n_tiles == 0 or counts["any"] < MOSTLY_FLAGGED * n_tiles:
        return None
    reasons = ", ".join(
        f"{counts[k]} {word}"
        for k, word in (("blur", "out of focus"), ("fold", "folded"), ("ink", "inked"))
        if counts[k]
    )
    return (
        f"QC flagged {counts['any']} of {n_tiles} tiles ({100 * counts['any'] / n_tiles:.0f} %: {reasons}); "
        "they are scored and marked: look at qc.png, and rescan the slide if it is out of focus"
    )


STAIN_SAMPLE_TILES = 64  # tiles the slide's stain is measured on, spread evenly over the slide


def measure_slide_stain(
    store: TileStore, flags: np.ndarray, glass_rgb: tuple[float, float, float]
) -> dict[str, Any] | None:
    """The slide's H&E stain, measured on a sample of its tiles at the tiles' own µm/px (the resolution
    the model's reference is measured at, on its training tiles: a thumbnail reads 10° and 1.8x off on
    CMU-1). Tiles with a flag in ``flags`` are left out. None when there is too little stain to measure."""
    from wsi_dala.tissue.stain import StainError, measure_tiles

    usable = np.flatnonzero(flags == 0)
    if usable.size == 0:
        return None
    picks = np.unique(usable[np.linspace(0, usable.size - 1, min(STAIN_SAMPLE_TILES, usable.size)).round().astype(int)])
    tiles = []
    for rows in store.info.chunk_rows():  # one read (one decompression) per chunk that holds picks
        inside = picks[(picks >= rows.start) & (picks < rows.stop)]
        if inside.size:
            tiles.extend(store.tiles(slice(int(inside[0]), int(inside[-1]) + 1))[inside - inside[0]])
    try:
        return measure_tiles(tiles, glass_rgb).to_dict()
    except StainError as exc:
        log.info("%s: stain not measured (%s)", store.path, exc)
        return None


def write_qc_png(layout: RunLayout, store: TileStore) -> None:
    """``qc.png`` from the thumbnail and what the store recorded."""
    thumbnail = np.asarray(Image.open(layout.thumbnail_png).convert("RGB"))
    info = store.info
    tissue, ink, fold = store.tissue_mask(), store.ink_mask(), store.fold_mask()
    if tissue is None or ink is None or fold is None or tissue.shape != thumbnail.shape[:2]:
        return
    flags = store.qc_flags()
    blurred = store.coords()[(flags & BLUR) > 0]
    blur = blurred_tiles_mask(tissue.shape, blurred, info.tiling.tile_size_l0, info.tiling.mask_downsample)
    areas = info.qc.areas_um2 if info.qc is not None else {}
    picture = QCPicture(
        thumbnail=thumbnail,
        tissue=tissue,
        ink=ink,
        fold=fold,
        blur=blur & tissue,
        areas_mm2={name: areas.get(name, 0.0) / 1e6 for name in ("tissue", "ink", "fold", "blur")},
    )
    title = f"{layout.slide_stem}: {info.n_tiles} tiles; {qc_words(info.qc)}"
    render_qc(picture, layout.qc_png, title)


def qc_words(qc: QCRecord | None) -> str:
    """What QC did, in the words of its mode (for qc.png, `tile` and `run`)."""
    if qc is None or qc.mode == "off":
        return "QC off (blur not measured, nothing flagged)"
    counts = qc.counts
    words = f"flagged: {counts['blur']} out of focus, {counts['fold']} folded, {counts['ink']} inked"
    if counts.get("blur_not_judged"):
        words += f" ({counts['blur_not_judged']} too smooth to judge focus)"
    if qc.mode == "exclude":
        words += f"; left out of heatmap and regions: {qc.excluded_tiles.get('any', 0)}"
    return words


def _result(store: TileStore, started: float, resumed: int, skipped: bool) -> TilingResult:
    return TilingResult(
        store=store.path,
        n_tiles=store.info.n_tiles,
        record=store.info.tiling,
        seconds=time.perf_counter() - started,
        chunks_resumed=resumed,
        skipped=skipped,
    )
