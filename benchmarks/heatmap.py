"""Heatmap quality and stitching cost: train on two annotated slides, run on others, compare with the truth.

    python benchmarks/heatmap.py                 # ~6 min on 2 cores: train, 2 cases x 3 variants, stitch scaling
    python benchmarks/heatmap.py --reuse         # keep the trained model and slides of an earlier run

What it does, as a user would:
1. writes two generated slides with QuPath annotations of their planted tumour and trains a small
   DALAResNet50 from scratch with ``wsi-dala train --slide A.svs=A.geojson --slide B.svs=B.geojson``
   (one slide trains, the other validates; the temperature and the CAM border profile are fitted on it);
2. runs ``wsi-dala run`` (Python API, default settings) on two slides it did not train on: one like the
   training slides, one with another seed, a pale stain and other marker colours (red, dark grey);
   each also without border correction, and with tiles at half stride (4x the model work);
3. prints per run: region IoU against the planted truth for regions traced on the ``tumour`` layer and on
   the ``probability`` layer (outside marker ink and 150 µm around it), tile-level ROC AUC (a tile is
   tumour when at least half of it is), the seam index (mean of the cells at tile corners / mean of the
   other cells, inside planted tumour one tile away from its edge; and the run's own estimate from
   run.json), the share of planted-tumour cells at the tumour layer's maximum, the stitch time;
4. the model's ECE / NLL / Brier on its validation tiles before and after temperature scaling (model card);
5. stitching cost against the number of tiles (stores of 10^4 and 10^5 tiles whose scores are drawn from
   a real run) and as a share of the scoring time those tiles would take at the measured scoring rate.

Timings are on this machine only: compare the ratios, not the seconds, across machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import shapely
from sklearn.metrics import roc_auc_score
from tissue import cpu_flags  # benchmarks/ is on sys.path when this runs as a script

TRAIN_SEEDS = (101, 102)
CASES = {
    "like-training": {"seed": 120, "stain": "default", "markers": ("green", "blue", "black")},
    "shifted": {"seed": 121, "stain": "pale", "markers": ("red", "dark-grey", "green")},
}


def write_training_slides(folder: Path) -> list[Path]:
    from wsi_dala.core.layout import annotations_beside
    from wsi_dala.runs.truth import write_truth_annotations
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    paths = []
    for seed in TRAIN_SEEDS:
        spec = SyntheticSlideSpec(width=8192, height=6144, mpp=0.25, seed=seed, tumour_regions=4)
        slide = write_synthetic_slide(folder / f"train-{seed}.svs", spec)
        write_truth_annotations(slide, annotations_beside(slide.path))
        paths.append(slide.path)
    return paths


def train(slides: list[Path], out: Path, epochs: int) -> Path:
    from wsi_dala.cli import main

    args = ["train", "--out", str(out), "--unannotated-class", "Non-tumor", "--mpp", "0.5", "--min-tissue", "0.25"]
    for slide in slides:
        args += ["--slide", f"{slide}={slide.with_suffix('.geojson')}"]
    args += ["--pretrained", "none", "--input-size", "128", "--epochs", str(epochs), "--batch-size", "32"]
    args += ["--lr-backbone", "1e-3", "--precise-bn-batches", "8", "--seed", "20", "--val-fraction", "0.5"]
    if main(args) != 0:
        raise SystemExit("training failed")
    return out / "best.safetensors"


def write_case(folder: Path, name: str):
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    case = CASES[name]
    spec = SyntheticSlideSpec(
        width=12288, height=9216, mpp=0.25, seed=case["seed"], stain=case["stain"], markers=case["markers"]
    )
    return write_synthetic_slide(folder / f"case-{name}.svs", spec)


def truth_cells(slide, cell_l0: float, shape: tuple[int, int]) -> np.ndarray:
    """Planted tumour on the heatmap's cell grid (a cell is tumour when at least half of it is)."""
    from PIL import Image

    from wsi_dala.slides.synthetic import TUMOUR

    tumour = (slide.labels == TUMOUR).astype(np.float32)
    scale = cell_l0 / slide.label_px
    size = (max(1, round(tumour.shape[1] / scale)), max(1, round(tumour.shape[0] / scale)))
    cells = np.asarray(Image.fromarray(tumour, mode="F").resize(size, Image.Resampling.BOX)) >= 0.5
    out = np.zeros(shape, dtype=bool)
    rows, cols = min(shape[0], cells.shape[0]), min(shape[1], cells.shape[1])
    out[:rows, :cols] = cells[:rows, :cols]
    return out


def region_iou(slide, heatmap, layer: str) -> float:
    from qupath_export.polygons import mask_to_polygons
    from wsi_dala.core.config import ExportConfig
    from wsi_dala.outputs.geojson import region_features
    from wsi_dala.runs.truth import INK_MARGIN_UM
    from wsi_dala.slides.synthetic import TUMOUR

    traced = replace(heatmap, tumour=getattr(heatmap, layer))
    features, _ = region_features(traced, ExportConfig())
    found = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in features])
    truth = mask_to_polygons(slide.labels == TUMOUR, pixel_size=slide.label_px)
    if slide.ink.any():
        ink = mask_to_polygons(slide.ink_mask(), pixel_size=slide.label_px).buffer(INK_MARGIN_UM / slide.spec.mpp)
        truth, found = shapely.difference(truth, ink), shapely.difference(found, ink)
    union = shapely.union(truth, found).area
    return float(shapely.intersection(truth, found).area / union) if union > 0 else 0.0


def tile_auc(slide, store) -> float:
    from wsi_dala.slides.synthetic import TUMOUR
    from wsi_dala.tiling.grid import tissue_fractions

    fraction = tissue_fractions(slide.labels == TUMOUR, slide.label_px, store.coords(), store.info.tile_size_l0)
    usable = store.usable_tiles() & ((fraction >= 0.5) | (fraction <= 0.1))  # ambiguous tiles left out
    labels = fraction[usable] >= 0.5
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, store.positive_scores()[usable]))


def truth_seam_index(heatmap, tumour: np.ndarray, grid: int, stride_cells: int) -> float:
    """Corner cells of the tile lattice vs the other cells, inside planted tumour one tile from its edge."""
    from scipy import ndimage

    inside = ndimage.binary_erosion(tumour, iterations=grid) & np.isfinite(heatmap.tumour)
    rows, cols = np.mgrid[0 : tumour.shape[0], 0 : tumour.shape[1]]
    on_edge_r = (rows % stride_cells == 0) | (rows % stride_cells == stride_cells - 1)
    on_edge_c = (cols % stride_cells == 0) | (cols % stride_cells == stride_cells - 1)
    corner = on_edge_r & on_edge_c
    return float(heatmap.tumour[inside & corner].mean() / heatmap.tumour[inside & ~corner].mean())


def measure_run(slide, checkpoint: Path, out: Path, variant: str) -> dict:
    from wsi_dala.core.config import HeatmapConfig, PipelineConfig, TilingConfig
    from wsi_dala.model import read_card
    from wsi_dala.outputs.heatmap import stitch
    from wsi_dala.runs.pipeline import card_profile, run_slide
    from wsi_dala.tiling.store import TileStore

    tiling = TilingConfig(min_tissue=0.25, stride_px=64 if variant == "half-stride" else None)
    heatmap_config = HeatmapConfig(border_correction=variant != "no-correction")
    config = PipelineConfig(model=str(checkpoint), tiling=tiling, heatmap=heatmap_config)
    summary = run_slide(slide.path, out, config, progress=False)
    record = json.loads(summary.layout.run_json.read_text())
    store = TileStore(summary.layout.tiles_store)
    started = time.perf_counter()
    heatmap = stitch(summary.layout.tiles_store, heatmap_config, card_profile(read_card(checkpoint)))
    stitch_s = time.perf_counter() - started
    grid = store.info.scoring.cam_grid
    tumour = truth_cells(slide, heatmap.cell_l0, heatmap.tumour.shape)
    values = heatmap.tumour[tumour & np.isfinite(heatmap.tumour)]
    stride_cells = max(1, round(store.info.tiling.stride_l0 / heatmap.cell_l0))
    return {
        "tiles": store.info.n_tiles,
        "iou_tumour": region_iou(slide, heatmap, "tumour"),
        "iou_probability": region_iou(slide, heatmap, "probability"),
        "tile_auc": tile_auc(slide, store),
        "seam_truth": truth_seam_index(heatmap, tumour, grid, stride_cells if variant != "half-stride" else grid),
        "seam_run": record["heatmap"]["seam_index"],
        "saturated": float((values >= np.nanmax(heatmap.tumour) - 1e-6).mean()) if values.size else float("nan"),
        "score_s": record["timings_s"]["score"],
        "stitch_s": stitch_s,
    }


def scaled_store(source, path: Path, n_tiles: int, rng: np.random.Generator):
    """A store of ``n_tiles`` on a square grid, scores and CAMs drawn from a real run (the stitch reads
    nothing else): what stitching costs at that size, without cutting and scoring 10^5 tiles."""
    from wsi_dala.tiling.store import TileStore
    from wsi_dala.tiling.store_records import QCRecord, ScoringRecord

    info = source.info
    side = int(np.ceil(np.sqrt(n_tiles)))
    step = info.tiling.stride_l0
    extent = int(side * step + info.tile_size_l0)
    slide = replace(info.tiling.slide, width=extent, height=extent)
    tiling = replace(info.tiling, slide=slide)
    index = np.arange(n_tiles)
    coords = np.stack([(index % side) * step, (index // side) * step], axis=1).round().astype(np.int64)
    store = TileStore.create(path, coords, np.ones(n_tiles, np.float32), tiling, chunk_tiles=256)
    qc = QCRecord("flag", None, {}, {}, {}, [255.0, 255.0, 255.0], {})
    store.mark_complete(np.zeros(n_tiles), np.zeros(n_tiles, np.uint8), qc)
    record = info.scoring
    done = store.prepare_scores(len(record.class_names), record.cam_grid, "benchmark")
    pick = rng.integers(0, info.n_tiles, n_tiles)
    scores, cams = source.scores()[pick], source.cams()[pick]
    for i, rows in enumerate(store.info.chunk_rows()):
        store.write_scores(i, scores[rows], cams[rows])
        store.mark_score_chunk_done(i, done)
    store.mark_scores_complete(replace(record))
    assert isinstance(store.info.scoring, ScoringRecord)
    return store


def stitch_scaling(source_store, score_s_per_tile: float, folder: Path) -> list[dict]:
    from wsi_dala.outputs.heatmap import stitch

    rows = []
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000):
        store = scaled_store(source_store, folder / f"scaled-{n}.zarr", n, rng)
        started = time.perf_counter()
        stitch(store.path)
        seconds = time.perf_counter() - started
        rows.append({"tiles": n, "stitch_s": seconds, "share_of_scoring": seconds / (score_s_per_tile * n)})
        shutil.rmtree(store.path)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/wsi-dala-bench-heatmap"), help="working folder")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--reuse", action="store_true", help="reuse the slides and model of an earlier run")
    args = parser.parse_args(argv)
    from wsi_dala.model import read_card

    print(f"CPU: {cpu_flags()}")
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "model" / "best.safetensors"
    if not (args.reuse and checkpoint.exists()):
        started = time.perf_counter()
        checkpoint = train(write_training_slides(args.out), args.out / "model", args.epochs)
        print(f"trained in {time.perf_counter() - started:.0f} s: {checkpoint}")
    card = read_card(checkpoint)
    calibration = card.calibration or {}
    print(f"temperature {card.temperature} (fitted on {calibration.get('n_tiles', '?')} validation tiles)")
    for when in ("before", "after"):
        fitted = calibration.get(when, {})
        print(f"  {when:6s}: " + "  ".join(f"{k} {v:.4f}" for k, v in fitted.items() if isinstance(v, float)))
    header = (
        f"{'case':14s} {'variant':14s} {'tiles':>6s} {'IoU tum':>8s} {'IoU prob':>8s} {'AUC':>6s} "
        f"{'seam':>6s} {'seam run':>8s} {'at max':>7s} {'score s':>8s} {'stitch s':>8s}"
    )
    print(header)
    results = {}
    for name in CASES:
        slide = write_case(args.out, name)
        for variant in ("default", "no-correction", "half-stride"):
            row = measure_run(slide, checkpoint, args.out / "runs" / f"{name}-{variant}", variant)
            results[(name, variant)] = row
            seam_run = f"{row['seam_run']:.3f}" if row["seam_run"] is not None else "-"
            print(
                f"{name:14s} {variant:14s} {row['tiles']:6d} {row['iou_tumour']:8.3f} {row['iou_probability']:8.3f} "
                f"{row['tile_auc']:6.3f} {row['seam_truth']:6.3f} {seam_run:>8s} {row['saturated']:7.3f} "
                f"{row['score_s']:8.1f} {row['stitch_s']:8.2f}"
            )
            sys.stdout.flush()
    from wsi_dala.tiling.store import TileStore

    default = results[("like-training", "default")]
    source = TileStore(args.out / "runs" / "like-training-default" / "tiles.zarr")
    per_tile = default["score_s"] / default["tiles"]
    print(f"scoring: {1 / per_tile:.1f} tiles/s (128 px DALAResNet50, this run)")
    for row in stitch_scaling(source, per_tile, args.out):
        print(
            f"stitch {row['tiles']:>7d} tiles: {row['stitch_s']:6.2f} s = {1e4 * row['stitch_s'] / row['tiles']:.3f} "
            f"s per 10^4 tiles, {100 * row['share_of_scoring']:.3f} % of scoring them"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
