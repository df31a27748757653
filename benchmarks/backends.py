"""The backbone's engines side by side: torch, ONNX Runtime, OpenVINO (and torch.compile) × fp32, bf16, int8.

    python benchmarks/backends.py [--model CKPT] [--tiles 128] [--batch 32] [--compile] [--demo DIR]

On the same tiles, in one process, for each engine × precision this CPU can run:
- **bare**: backbone only, on batches already in memory (no slide reads, no CAM);
- **scoring**: ``wsi_dala.inference.scoring.score_tiles`` — what each Dask task runs: normalisation, backbone,
  head, DT Grad-CAM for every tile — on the same in-memory tiles;
- the first-use cost (export, quantisation, compile) and the difference from torch fp32 (max |Δp|,
  CAM error relative to the largest CAM value, class flips).
``--compile`` adds torch.compile (inductor), with its compile time. ``--demo DIR`` (after ``wsi-dala
demo DIR``) instead runs ``run_slide`` on the demo's case slide with its trained model for each engine ×
precision and reports tiles/s of scoring, max |Δp|, flips, tile accuracy and region IoU against the
planted truth — the int8 accuracy cost. Without --model, an untrained 224-px DALAResNet50 (speed does
not depend on the weights) on random tiles. Prints the CPU flags: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tissue import cpu_flags  # benchmarks/ is on sys.path when this runs as a script

COMBINATIONS = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("torch", "bf16"),
    ("openvino", "bf16"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)


def _available(combinations: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    from wsi_dala.model.devices import cpu_supports_bf16

    return [(e, p) for e, p in combinations if p != "bf16" or cpu_supports_bf16()]


def engines_on_tiles(args: argparse.Namespace) -> None:
    import torch

    from wsi_dala.inference.engines.plan import BackboneRequest, plan_backbone
    from wsi_dala.inference.engines.runtimes import build_backbone
    from wsi_dala.inference.scoring import prepared_images, score_tiles
    from wsi_dala.model import load_checkpoint, write_untrained_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("WSI_DALA_ENGINE_CACHE", str(Path(folder) / "engines"))
        checkpoint = args.model or write_untrained_checkpoint(Path(folder) / "dala.safetensors", tile_size_px=args.size)
        model, card = load_checkpoint(checkpoint)
        size = card.tile_size_px
        tiles = np.random.default_rng(0).integers(0, 256, size=(args.tiles, size, size, 3), dtype=np.uint8)
        batches = [prepared_images(tiles[s : s + args.batch], card, "cpu") for s in range(0, args.tiles, args.batch)]
        sha = "b" * 64
        print(
            f"{'engine':12s} {'precision':9s} {'first use s':>11s} {'bare t/s':>9s} {'scoring t/s':>11s} "
            f"{'max|dp|':>8s} {'CAM err':>8s} {'flips':>5s}"
        )
        reference = None
        for engine, precision in _available(COMBINATIONS):
            started = time.perf_counter()
            request = BackboneRequest(
                str(checkpoint), sha, model, size, "cpu", engine, precision, batches[0], lambda: torch.cat(batches)
            )
            plan = plan_backbone(request).plan
            first_use = time.perf_counter() - started
            backbone = build_backbone(plan, model, "cpu")
            backbone(batches[0])
            started = time.perf_counter()
            for batch in batches:
                backbone(batch)
            bare = args.tiles / (time.perf_counter() - started)
            score_tiles(tiles[: args.batch], str(checkpoint), "cpu", plan, args.batch)  # warm
            started = time.perf_counter()
            packed = score_tiles(tiles, str(checkpoint), "cpu", plan, args.batch)
            scoring = args.tiles / (time.perf_counter() - started)
            reference = packed if reference is None else reference
            _row(engine, precision, first_use, bare, scoring, packed, reference, card.positive_index)
        if args.compile:
            for precision in [p for p in ("fp32", "bf16") if ("torch", p) in _available(COMBINATIONS)]:
                from wsi_dala.model.devices import autocast
                from wsi_dala.model.interface import as_split

                compiled = torch.compile(as_split(model).forward_features)
                started = time.perf_counter()
                with torch.no_grad(), autocast(precision, "cpu"):
                    compiled(batches[0].contiguous(memory_format=torch.channels_last))
                    first_use = time.perf_counter() - started
                    started = time.perf_counter()
                    for batch in batches:
                        compiled(batch.contiguous(memory_format=torch.channels_last))
                bare = args.tiles / (time.perf_counter() - started)
                print(f"{'torch.compile':12s} {precision:9s} {first_use:11.1f} {bare:9.1f} {'-':>11s}")


def _row(engine, precision, first_use, bare, scoring, packed, reference, positive):
    p, p0 = packed[:, positive], reference[:, positive]
    cams, cams0 = packed[:, 3:], reference[:, 3:]
    cam_error = float(np.abs(cams - cams0).max() / max(float(cams0.max()), 1e-12))
    flips = int(((p >= 0.5) != (p0 >= 0.5)).sum())
    print(
        f"{engine:12s} {precision:9s} {first_use:11.1f} {bare:9.1f} {scoring:11.1f} "
        f"{np.abs(p - p0).max():8.4f} {cam_error:8.4f} {flips:5d}"
    )


def engines_on_demo(args: argparse.Namespace) -> None:
    from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig
    from wsi_dala.core.layout import DemoLayout
    from wsi_dala.runs.demo import DemoSettings
    from wsi_dala.runs.pipeline import run_slide
    from wsi_dala.runs.truth import tumour_iou
    from wsi_dala.slides.synthetic import TUMOUR, SyntheticSlideSpec, write_synthetic_slide
    from wsi_dala.tiling.store import TileStore

    layout = DemoLayout(Path(args.demo))
    settings = DemoSettings()
    checkpoint = layout.model.best_checkpoint
    with tempfile.TemporaryDirectory() as folder:
        spec = SyntheticSlideSpec(
            width=settings.case_size_px[0], height=settings.case_size_px[1], mpp=0.25, seed=settings.seed
        )
        truth = write_synthetic_slide(Path(folder) / "case.svs", spec)  # the demo's case slide again, with its truth
        print(
            f"{'engine':12s} {'precision':9s} {'tiles':>5s} {'score s':>7s} {'tiles/s':>7s} {'max|dp|':>8s} "
            f"{'flips':>5s} {'tile acc':>8s} {'IoU':>6s}"
        )
        reference = None
        for engine, precision in _available(COMBINATIONS):
            config = PipelineConfig(
                model=str(checkpoint),
                tiling=TilingConfig(min_tissue=0.25),
                scoring=ScoringConfig(backend=engine, precision=precision, overlap_tiling=False),
            )
            summary = run_slide(truth.path, Path(folder) / f"{engine}-{precision}", config, progress=False)
            store = TileStore(summary.layout.tiles_store)
            p = store.positive_scores()
            reference = p if reference is None else reference
            label = _tile_truth(store, truth.labels, truth.label_px, TUMOUR)
            accuracy = float(((p >= 0.5) == label).mean())
            iou = tumour_iou(truth, summary.layout.tumour_geojson())
            seconds = summary.record.timings_s["score"]
            print(
                f"{engine:12s} {precision:9s} {len(p):5d} {seconds:7.1f} {len(p) / seconds:7.1f} "
                f"{np.abs(p - reference).max():8.4f} {int(((p >= 0.5) != (reference >= 0.5)).sum()):5d} "
                f"{accuracy:8.3f} {iou:6.3f}"
            )


def _tile_truth(store, labels: np.ndarray, label_px: int, tumour: int) -> np.ndarray:
    """Per tile: is most of its footprint planted tumour?"""
    size = store.info.tile_size_l0
    result = []
    for x, y in store.coords():
        x0, y0 = int(x // label_px), int(y // label_px)
        x1, y1 = int(np.ceil((x + size) / label_px)), int(np.ceil((y + size) / label_px))
        result.append((labels[y0:y1, x0:x1] == tumour).mean() >= 0.5)
    return np.array(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: untrained DALAResNet50)")
    parser.add_argument("--size", type=int, default=224, help="tile side without --model (default: 224)")
    parser.add_argument("--tiles", type=int, default=128, help="tiles per measurement (default: 128)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor), compile time counted")
    parser.add_argument("--demo", type=Path, default=None, help="a `wsi-dala demo` folder: accuracy per engine")
    args = parser.parse_args()
    import torch

    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.demo:
        engines_on_demo(args)
    else:
        engines_on_tiles(args)


if __name__ == "__main__":
    main()
