"""One slide, end to end: tile → score → stitch → export, with ``run.json`` and resume.

Every stage leaves its result on disk (tile store, scores in the store, heatmap.zarr, GeoJSON), and
each resumes or skips by itself. A run is keyed by the slide's fingerprint, the configuration and the
checkpoint's hash: an unchanged slide with unchanged settings and model does no work at all.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala import __version__
from wsi_dala.config import PipelineConfig
from wsi_dala.errors import CheckpointError, ConfigError
from wsi_dala.export import export_qupath
from wsi_dala.fileio import ensure_writable_dir, write_json_atomic
from wsi_dala.heatmap import render_overlay, stitch, write_heatmap
from wsi_dala.identity import config_hash, slide_fingerprint
from wsi_dala.layout import RunLayout
from wsi_dala.model import read_card
from wsi_dala.scoring import file_sha256, score_store
from wsi_dala.tiling import TilingConfig, tile_slide

log = logging.getLogger(__name__)
RUN_FORMAT = "wsi-dala.run/1"


@dataclass
class RunSummary:
    layout: RunLayout
    record: dict[str, Any]
    skipped: bool


def tiling_config(config: PipelineConfig, card: Any) -> TilingConfig:
    """The model card fixes µm/px and tile size unless the configuration overrides them."""
    mpp = config.tiling.mpp or card.mpp
    if mpp is None:
        raise ConfigError("the model card records no µm/px; give the tile resolution with --mpp")
    return TilingConfig(
        target_mpp=mpp,
        tile_size_px=config.tiling.tile_size or card.tile_size_px,
        stride_px=config.tiling.stride,
        min_tissue=config.tiling.min_tissue,
        allow_upsample=config.tiling.allow_upsample,
        workers=config.tiling.workers,
    )


def run_key(slide_path: Path, config: PipelineConfig, checkpoint_sha: str) -> str:
    settings = dataclasses.replace(config, model=None).to_dict()
    settings["scoring"].pop("scheduler", None)  # where it runs does not change the result
    return config_hash(
        {"slide": slide_fingerprint(slide_path), "config": settings, "model": checkpoint_sha, "version": __version__}
    )


def previous_run(layout: RunLayout) -> dict[str, Any]:
    import json

    try:
        return json.loads(layout.run_json.read_text())
    except (OSError, ValueError):
        return {}


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
    progress: bool = True,
    client: Any = None,
) -> RunSummary:
    """Run the whole pipeline on one slide (or do nothing if an identical run is complete)."""
    slide_path = Path(slide_path)
    if not config.model:
        raise CheckpointError(
            "no model: give --model CKPT, set `model:` in the pipeline config, or run "
            "`wsi-dala demo` once to train a small one"
        )
    checkpoint = Path(config.model)
    card = read_card(checkpoint)
    tiling = tiling_config(config, card)
    layout = RunLayout.for_slide(out_dir, slide_path)
    if not slide_path.exists():
        from wsi_dala.errors import SlideOpenError

        raise SlideOpenError(f"{slide_path}: file not found")
    ensure_writable_dir(layout.root)
    checkpoint_sha = file_sha256(checkpoint)
    key = run_key(slide_path, config, checkpoint_sha)
    previous = previous_run(layout)
    if previous.get("run_key") == key and previous.get("status") == "complete":
        return RunSummary(layout, previous, skipped=True)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    write_json_atomic(
        layout.run_json, {"format": RUN_FORMAT, "status": "running", "run_key": key, "slide": str(slide_path)}
    )
    tiled = tile_slide(
        slide_path,
        layout.root,
        tiling,
        reader=config.tiling.reader,
        slide_mpp=config.tiling.slide_mpp,
        progress=progress,
    )
    timings["tile"] = tiled.seconds
    scored = score_store(tiled.store, checkpoint, config.scoring, progress=progress, client=client)
    timings["score"] = scored.seconds

    t = time.perf_counter()
    heatmap = stitch(tiled.store, config.heatmap)
    write_heatmap(heatmap, layout.heatmap_store, config.heatmap, {"slide": str(slide_path), "run_key": key})
    _render(layout, heatmap)
    timings["stitch"] = time.perf_counter() - t

    t = time.perf_counter()
    exported = export_qupath(
        tiled.store,
        heatmap,
        layout.tiles_geojson(config.export.gzip),
        layout.tumour_geojson(config.export.gzip),
        config.export,
    )
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    record = {
        "format": RUN_FORMAT,
        "status": "complete",
        "run_key": key,
        "slide": {"path": str(slide_path.resolve()), **slide_fingerprint(slide_path)},
        "model": {
            "path": str(checkpoint.resolve()),
            "sha256": checkpoint_sha,
            "architecture": card.architecture,
            "class_names": card.class_names,
            "positive_class": card.positive_class,
            "tile_size_px": card.tile_size_px,
            "mpp": card.mpp,
        },
        "resolution": {
            "slide_mpp": tiled.slide_mpp,
            "slide_mpp_source": tiled.mpp_source,
            "tile_mpp": tiled.effective_mpp,
            "level": tiled.level,
            "resize_factor": tiled.resize_factor,
            "heatmap_cell_mpp": heatmap.cell_mpp,
        },
        "counts": {
            "tiles": tiled.n_tiles,
            "grid_tiles": tiled.grid_tiles,
            "tumour_tiles": _count_positive(tiled.store, config.export.tile_threshold),
            "regions": exported.n_regions,
        },
        "regions": exported.regions,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "tiles_per_s": round(tiled.n_tiles / timings["total"], 2) if timings["total"] > 0 else None,
        "scoring": {"precision": scored.precision, "device": scored.device, "chunks_resumed": scored.chunks_resumed},
        "settings": config.to_dict(),
        "outputs": {name: str(path) for name, path in _outputs(layout, config).items()},
        "versions": _versions(),
    }
    write_json_atomic(layout.run_json, record)
    return RunSummary(layout, record, skipped=False)


def _count_positive(store_path: Path, threshold: float) -> int:
    from wsi_dala.store import open_store

    store = open_store(store_path)
    if store["coords"].shape[0] == 0:
        return 0
    index = list(store.attrs["class_names"]).index(store.attrs["positive_class"])
    return int((np.asarray(store["scores"][:, index]) >= threshold).sum())


def _render(layout: RunLayout, heatmap: Any) -> None:
    from PIL import Image

    from wsi_dala.fileio import save_png_atomic

    thumbnail = np.asarray(Image.open(layout.thumbnail_png).convert("RGB"))
    save_png_atomic(layout.overview_png, Image.fromarray(thumbnail))
    render_overlay(
        thumbnail,
        heatmap.tumour,
        layout.overlay_png,
        f"{layout.slide_stem}: tumour probability (cell {heatmap.cell_mpp:.1f} µm)",
    )


def _outputs(layout: RunLayout, config: PipelineConfig) -> dict[str, Path]:
    return {
        "tiles_store": layout.tiles_store,
        "heatmap": layout.heatmap_store,
        "overview": layout.overview_png,
        "overlay": layout.overlay_png,
        "tiles_geojson": layout.tiles_geojson(config.export.gzip),
        "tumour_geojson": layout.tumour_geojson(config.export.gzip),
        "tissue_mask": layout.tissue_mask_png,
        "run_json": layout.run_json,
    }


def _versions() -> dict[str, str]:
    import dask
    import openslide
    import tiffslide
    import torch
    import zarr

    return {
        "wsi_dala": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "openslide": openslide.__library_version__,
        "tiffslide": tiffslide.__version__,
    }
