"""One slide, end to end: tile → score → stitch → export, with ``run.json`` and resume.

Every stage leaves its result on disk (tile store, scores in the store, heatmap.zarr, GeoJSON), and
each resumes or skips by itself. A run is keyed by the slide's fingerprint, the configuration and the
checkpoint's hash: an unchanged slide with unchanged settings and model does no work at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_dala import __version__
from wsi_dala.core.config import PipelineConfig, TilingConfig
from wsi_dala.core.errors import CheckpointError, ConfigError, OutputError, QualityError
from wsi_dala.core.fileio import (
    ensure_writable_dir,
    naming_failures,
    read_json_object,
    save_png_atomic,
    settle_store_writes,
    write_json_atomic,
)
from wsi_dala.core.identity import config_hash, slide_fingerprint
from wsi_dala.core.layout import DEFAULT_DEMO_DIR, RUN_FORMAT, DemoLayout, RunLayout, remove_partials
from wsi_dala.core.locks import exclusive_lock
from wsi_dala.core.memory import limit_malloc_arenas, release_freed_memory
from wsi_dala.inference.cluster import check_address, scoring_client
from wsi_dala.inference.streaming import StreamingScorer, can_overlap
from wsi_dala.model import ModelCard, read_card
from wsi_dala.model.card import KnownCheckpoint
from wsi_dala.model.registry import FOUNDATION_PRESETS
from wsi_dala.outputs.geojson import export_qupath
from wsi_dala.outputs.heatmap import Heatmap, paint_tiles, stitch, write_heatmap
from wsi_dala.outputs.ngff import write_heatmap_ngff
from wsi_dala.outputs.overlay import render_overlay
from wsi_dala.runs.model_preparation import ModelPreparation
from wsi_dala.runs.run_record import RunRecord, RunStages, build_record
from wsi_dala.runs.slide_mil import ATTENTION_MEASUREMENT, MilPlan, apply_mil, attention_per_tile, plan_mil
from wsi_dala.tiling.grid import LevelChoice
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import check_slide, tile_slide

if TYPE_CHECKING:
    from distributed import Client

    from wsi_dala.inference.scoring import ScoringResult
    from wsi_dala.runs.dicom_results import DicomResults

log = logging.getLogger(__name__)
RUN_LOCK_STALE_S = 24 * 3600.0  # a lock left by another host is stale after this long (same host: pid gone)


@dataclass(frozen=True)
class RunSummary:
    layout: RunLayout
    record: RunRecord
    skipped: bool
    dicom: DicomResults | None = None  # export.dicom: the results as DICOM


def tiling_for_model(config: PipelineConfig, card: ModelCard) -> TilingConfig:
    """The model card fixes µm/px and tile size unless the configuration overrides them."""
    return config.tiling.resolved(card.mpp, card.tile_size_px)


def run_key(slide_path: Path, config: PipelineConfig, checkpoint_sha: str, mil_sha: str | None = None) -> str:
    # Where and how fast it runs does not change the result: scheduler and reader threads are not part of it.
    # Nor do stored features (the scores are the encoder pass's), which also keeps the keys of earlier releases,
    # nor the DICOM copy of the results (written after, for a finished run too).
    # A MIL model counts by its content, not its path; without one the key is an earlier release's.
    settings = config.model_dump(
        mode="json",
        exclude={
            "model": True,
            "features": True,
            "mil": True,
            "scoring": {"scheduler"},
            "tiling": {"reader_threads"},
            "export": {"dicom"},
        },
    )
    identity = {"slide": slide_fingerprint(slide_path), "config": settings, "model": checkpoint_sha}
    return config_hash({**identity, **({"mil": mil_sha} if mil_sha else {}), "version": __version__})


def _require_model(config: PipelineConfig) -> Path:
    if not config.model:
        demo = DemoLayout(Path(DEFAULT_DEMO_DIR)).model.best_checkpoint
        if demo.is_file():  # the demo was run here: its model is one flag away (trained on generated slides)
            raise CheckpointError(
                f"no model: give --model CKPT or set `model:` in the pipeline config; the demo's model is "
                f"--model {demo} (trained on generated slides, not for real tissue)"
            )
        raise CheckpointError(
            "no model: give --model CKPT, set `model:` in the pipeline config, or run "
            "`wsi-dala demo` once to train a small one"
        )
    return resolve_model(config.model, config.positive_class)


def resolve_model(model: str, positive_class: str | None = None) -> Path:
    """A checkpoint file as is; a WSInfer model folder as its imported checkpoint (made on first use); a
    WSInfer-zoo name or ``hf:ORG/REPO[@REV]`` fetched into the Hugging Face cache, then imported."""
    from wsi_dala.interop.model_hub import fetch, named_model

    hub = named_model(model)
    if hub is None and not Path(model).is_dir():  # a checkpoint file: no import, so no torch yet
        if positive_class is not None:
            log.warning("--positive-class applies to WSInfer model folders; %s has its own in its card", model)
        return Path(model)
    from wsi_dala.interop.model_import import imported_checkpoint, is_wsinfer_folder  # imports torch

    if hub is not None:
        fetched = fetch(hub)
        checkpoint = imported_checkpoint(fetched.folder, positive_class, fetched.origin)
        log.info("%s: %s@%s, imported as %s", model, hub.repo_id, fetched.origin["hf_revision"], checkpoint)
        return checkpoint
    if is_wsinfer_folder(model):
        checkpoint = imported_checkpoint(model, positive_class)
        log.info("%s: WSInfer model folder, imported as %s", model, checkpoint)
        return checkpoint
    if positive_class is not None:
        log.warning("--positive-class applies to WSInfer model folders; %s has its own in its card", model)
    return Path(model)


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
    progress: bool = True,
    client: Client | None = None,
) -> RunSummary:
    """Run the whole pipeline on one slide (or do nothing if an identical run is complete).

    Inputs are checked before the output folder is touched: the checkpoint (card and weights against
    the architecture) and the slide (readable, µm/px known, the target level available). The folder is
    then locked for the run; a second run on it is refused at once, naming the holder.
    """
    limit_malloc_arenas()  # before the tiler's and the scorer's threads start (see wsi_dala.core.memory)
    slide_path = Path(slide_path)
    if config.scoring.scheduler:
        check_address(config.scoring.scheduler)  # a bad scheme fails now, not after tiling
    if config.export.dicom:
        from wsi_dala.runs.dicom_results import require_dicom_packages

        require_dicom_packages()  # a missing extra is said now, not after the run
    checkpoint = _require_model(config)
    card = read_card(checkpoint)
    tiling = tiling_for_model(config, card)
    level = check_slide(slide_path, tiling)
    known = KnownCheckpoint.read(checkpoint, card)  # hashed once, for the run key and the scoring key
    model = ModelPreparation(known, config.scoring)  # torch loads while tiles are read (new weights: checked now)
    # --features serves the head (a foundation model's) or, for another head, the MIL model alone.
    head_reads_features = config.features and not (config.mil and card.architecture not in FOUNDATION_PRESETS)
    given = _given_features(config, slide_path, tiling, model) if head_reads_features else None
    layout = RunLayout.for_slide(out_dir, slide_path)
    mil = plan_mil(config, slide_path, layout, known, tiling) if config.mil else None
    ensure_writable_dir(layout.root)
    with exclusive_lock(layout.lock, RUN_LOCK_STALE_S) as holder:
        if holder is not None:
            raise OutputError(f"{layout.root}: in use by {holder.describe()}; wait for it or choose another --out")
        try:
            with scoring_client(config.scoring, client) as run_client:  # the run's one Dask client (or None)
                summary = _run_locked(
                    slide_path, layout, config, model, tiling, level, progress, run_client, given, mil
                )
            if config.export.dicom:  # also for a finished run: a batch resumed with DICOM asked for writes them
                from wsi_dala.runs.dicom_results import ensure_dicom

                summary = replace(summary, dicom=ensure_dicom(layout.root))
            return summary
        except BaseException:
            # An error, or an interrupt (SIGTERM in a batch, Ctrl-C) landing mid-write: what was half written
            # goes now, while we hold the lock, once zarr's writes still in flight have finished.
            settle_store_writes()
            remove_partials(layout.root)
            raise


def _run_locked(
    slide_path: Path,
    layout: RunLayout,
    config: PipelineConfig,
    model: ModelPreparation,
    tiling: TilingConfig,
    level: LevelChoice,
    progress: bool,
    client: Client | None,
    given_features: Path | None = None,
    mil: MilPlan | None = None,
) -> RunSummary:
    known = model.known
    checkpoint, card, checkpoint_sha = known.path, known.card, known.sha256
    previous = read_json_object(layout.run_json)
    _refuse_another_slide(layout, previous)
    removed = remove_partials(layout.root)  # left by a run killed while writing (we hold the lock)
    if removed:
        log.info("%s: removed %d unfinished file(s) of an interrupted run", layout.root, removed)
    key = run_key(slide_path, config, checkpoint_sha, mil.sha256 if mil else None)
    done = RunRecord.read_complete(layout.run_json)
    if done is not None and done.run_key == key:
        return RunSummary(layout, done, skipped=True)
    write_json_atomic(
        layout.run_json,
        {"format": RUN_FORMAT, "status": "running", "run_key": key, "slide_stem": layout.slide_stem},
    )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    streaming = StreamingScorer(str(layout.tiles_store), str(checkpoint), config.scoring, progress, known)
    overlap = can_overlap(config.scoring, client) and given_features is None  # given tokens: no encoder pass
    with streaming:
        callback = streaming.chunk_written if overlap else None
        tiled = tile_slide(
            slide_path, layout.root, tiling, progress=progress, on_chunk_written=callback, layout=layout, level=level
        )
        timings["tile"] = tiled.seconds
        check_quality(TileStore(tiled.store), slide_path, layout)
        setup = streaming.finish()
    model.wait()
    scored = None
    if given_features is not None:  # checked before the folder was touched
        from wsi_dala.inference.stored_features import score_from_features

        scored = score_from_features(tiled.store, given_features, known, progress)
    elif setup is None:
        scored = _stored_features_scores(layout, tiled.store, known, config, progress)
    if scored is None:
        from wsi_dala.inference.scoring import score_store  # imported by now (ModelPreparation)

        scored = score_store(
            tiled.store, checkpoint, config.scoring, progress=progress, client=client, setup=setup, known=known
        )
    timings["score"] = scored.seconds  # with overlap: only what was left once tiling ended
    timings["tile_and_score"] = time.perf_counter() - started  # less than tile + score when they overlapped
    mil_answer = apply_mil(mil, layout, known, progress) if mil else None
    t = time.perf_counter()
    heatmap = stitch(tiled.store, config.heatmap, card_profile(card))
    if mil_answer is not None:
        heatmap.attention = paint_tiles(
            heatmap, mil_answer.coords_l0, mil_answer.tile_size_l0, mil_answer.relative_attention
        )
    with naming_failures(layout.heatmap_store):  # a full disk names the store, not just "No space left"
        write_heatmap(heatmap, layout.heatmap_store, config.heatmap, {"slide": str(slide_path), "run_key": key})
    with naming_failures(layout.heatmap_ngff):
        write_heatmap_ngff(heatmap, layout.heatmap_ngff, config.heatmap.min_level_px)
    _render(layout, heatmap)
    release_freed_memory()
    timings["stitch"] = time.perf_counter() - t
    t = time.perf_counter()
    gzip = config.export.gzip
    tile_extra = (
        {ATTENTION_MEASUREMENT: attention_per_tile(mil_answer, TileStore(tiled.store).coords())} if mil_answer else None
    )
    exported = export_qupath(
        tiled.store, heatmap, layout.tiles_geojson(gzip), layout.tumour_geojson(gzip), config.export, tile_extra
    )
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    stages = RunStages(tiled, scored, heatmap, exported, streaming.scored_chunks, mil, mil_answer)
    record = build_record(slide_path, checkpoint, checkpoint_sha, card, key, config, layout, stages, timings)
    write_json_atomic(layout.run_json, record.to_dict())
    _remove_outputs_no_longer_written(layout, previous, record)
    return RunSummary(layout, record, skipped=False)


def _given_features(config: PipelineConfig, slide_path: Path, tiling: TilingConfig, model: ModelPreparation) -> Path:
    """``--features``: the store, checked against this slide's tiles and this head's encoder before any output."""
    from wsi_dala.inference.stored_features import why_not_stored
    from wsi_dala.tiling.tiler import tiling_key_for

    assert config.features is not None
    path = Path(config.features)
    path = path if path.name.endswith(".zarr") else RunLayout(path).features_store
    if not path.exists():
        raise ConfigError(f"{path}: features store not found (--features)")
    model.wait()  # its encoder's hash is compared with the store's
    reason = why_not_stored(path, tiling_key_for(slide_path, tiling), model.known, config.scoring)
    if reason is not None:
        raise ConfigError(f"{path}: {reason} (--features)")
    return path


def _stored_features_scores(
    layout: RunLayout, tiles_store: Path, known: KnownCheckpoint, config: PipelineConfig, progress: bool
) -> ScoringResult | None:
    """A foundation-model head scored from the patch tokens ``wsi-dala features`` stored in this folder (no
    encoder pass), when they fit it; None otherwise (the encoder runs; the log says why)."""
    if not layout.features_store.exists():
        return None
    from wsi_dala.inference.stored_features import score_from_features, why_not_stored

    tiling_key = TileStore(tiles_store).info.tiling.tiling_key
    reason = why_not_stored(layout.features_store, tiling_key, known, config.scoring)
    if reason is not None:
        log.info("%s not used: %s; the encoder runs", layout.features_store, reason)
        return None
    return score_from_features(tiles_store, layout.features_store, known, progress)


def check_quality(store: TileStore, slide_path: Path, layout: RunLayout) -> None:
    """Refuse a slide with no tissue, in one line naming the pictures that show why (they are written before
    this is called). Quality control never refuses a slide: it marks tiles, and warns when it marks most."""
    info, qc = store.info, store.info.qc
    if info.n_tiles == 0:
        pictures = f"mask written to {layout.tissue_mask_png}, QC picture to {layout.qc_png}"
        why = ""
        if qc is not None and qc.areas_um2.get("ink", 0.0) > qc.areas_um2.get("tissue", 0.0):
            why = f" (marker ink covers {qc.areas_um2['ink'] / 1e6:.2f} mm², more than any tissue)"
        raise QualityError(f"{slide_path}: no tissue found{why}; {pictures}")


def card_profile(card: ModelCard) -> np.ndarray | None:
    """The model card's CAM border profile (the stitch's prior), if the card has one."""
    return np.asarray(card.cam_profile, dtype=np.float64) if card.cam_profile is not None else None


def _refuse_another_slide(layout: RunLayout, previous: dict[str, Any]) -> None:
    """One folder, one slide: outputs are named by the slide, and QuPath imports what the folder lists."""
    stem = previous.get("slide_stem")
    if isinstance(stem, str) and stem != layout.slide_stem:
        raise OutputError(
            f"{layout.root}: holds the run of another slide ({stem}); choose another --out for {layout.slide_stem}"
        )


def _remove_outputs_no_longer_written(layout: RunLayout, previous: dict[str, Any], record: RunRecord) -> None:
    """Files the previous run listed that this one does not write (e.g. ``.geojson`` after ``--gzip``)."""
    old = previous.get("outputs")
    if not isinstance(old, dict):
        return
    for name in set(map(str, old.values())) - set(record.outputs.values()):
        path = layout.root / Path(name).name  # never trust a path read from a file: stay in this folder
        if path.is_file():
            log.info("%s: removing %s, written by an earlier run with other settings", layout.root, path.name)
            path.unlink()


def _render(layout: RunLayout, heatmap: Heatmap) -> None:
    from PIL import Image

    thumbnail = np.asarray(Image.open(layout.thumbnail_png).convert("RGB"))
    save_png_atomic(layout.overview_png, Image.fromarray(thumbnail))
    render_overlay(
        thumbnail,
        heatmap.tumour,
        layout.overlay_png,
        f"{layout.slide_stem}: tumour probability (cell {heatmap.cell_mpp:.1f} µm)",
        flagged=heatmap.qc_flagged,
    )
    if heatmap.attention is not None:
        finite = heatmap.attention[np.isfinite(heatmap.attention)]
        render_overlay(
            thumbnail,
            heatmap.attention,
            layout.attention_png,
            f"{layout.slide_stem}: attention-MIL attention per tile (x an even share)",
            flagged=heatmap.qc_flagged,
            label="attention x even share",
            top=max(2.0, float(np.percentile(finite, 99))) if finite.size else 2.0,
            colour_map="viridis",
        )
    if heatmap.uncertainty is not None:
        top = (
            max(0.05, float(np.nanpercentile(heatmap.uncertainty, 99)))
            if np.isfinite(heatmap.uncertainty).any()
            else 0.5
        )
        render_overlay(
            thumbnail,
            heatmap.uncertainty,
            layout.uncertainty_png,
            f"{layout.slide_stem}: SD of the tumour probability per tile",
            flagged=heatmap.qc_flagged,
            label="probability SD",
            top=top,
            colour_map="viridis",
        )
