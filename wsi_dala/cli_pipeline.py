"""CLI verbs for the main job: ``run`` (one slide) and ``demo`` (everything on generated data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_dala.cli import command


def _configure_run(parser: argparse.ArgumentParser) -> None:
    from wsi_dala.scoring import PRECISIONS

    parser.add_argument("slide", help="slide file (SVS, pyramidal TIFF, NDPI, MRXS, ...)")
    parser.add_argument("--model", metavar="CKPT", help="a .safetensors checkpoint (default: `model:` in --config)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: ./wsi-dala-runs/<slide name>)")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML (see pipelines/default.yaml); flags win")
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a dask.distributed scheduler, e.g. tcp://host:8786 (default: local threads)",
    )
    parser.add_argument("--batch-size", type=int, metavar="N", help="tiles per model batch (config default: 32)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (config default: auto)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config default: auto)")
    parser.add_argument("--mpp", type=float, metavar="UM", help="tile µm/px (default: the model card's)")
    parser.add_argument("--min-tissue", type=float, metavar="F", help="tissue fraction to keep a tile (default 0.25)")
    parser.add_argument(
        "--tile-threshold",
        type=float,
        metavar="P",
        help="tiles at or above this probability are classed Tumor (default 0.5)",
    )
    parser.add_argument("--gzip", action="store_true", default=None, help="write .geojson.gz (QuPath reads it)")
    parser.add_argument("--reader", choices=("auto", "openslide", "tiffslide"), help="slide library (default auto)")
    parser.add_argument("--slide-mpp", type=float, metavar="UM", help="the slide's level-0 µm/px, if unknown")
    parser.add_argument(
        "--allow-upsample",
        action="store_true",
        default=None,
        help="upsample when the model wants finer tiles than the slide has",
    )


@command("run", "tile -> score (+DT Grad-CAM) -> heatmap -> QuPath GeoJSON, for one slide")(_configure_run)
def _run(args: argparse.Namespace) -> int:
    from wsi_dala.config import load_config, with_overrides
    from wsi_dala.layout import safe_stem
    from wsi_dala.pipeline import run_slide

    config = load_config(args.config)
    config = with_overrides(
        config,
        model={"path": args.model},
        tiling={
            "mpp": args.mpp,
            "min_tissue": args.min_tissue,
            "reader": args.reader,
            "slide_mpp": args.slide_mpp,
            "allow_upsample": args.allow_upsample,
        },
        scoring={
            "batch_size": args.batch_size,
            "precision": args.precision,
            "device": args.device,
            "scheduler": args.scheduler,
        },
        export={"tile_threshold": args.tile_threshold, "gzip": args.gzip},
    )
    out = Path(args.out) if args.out else Path("wsi-dala-runs") / safe_stem(args.slide)
    summary = run_slide(args.slide, out, config, progress=not args.quiet)
    _print_summary(summary)
    return 0


def _print_summary(summary) -> None:
    record = summary.record
    if summary.skipped:
        print(f"unchanged slide, settings and model: nothing to do (see {summary.layout.run_json})")
    counts, res, timings = record["counts"], record["resolution"], record["timings_s"]
    print(
        f"tiles:       {counts['tiles']} scored, {counts['tumour_tiles']} classed Tumor; "
        f"{counts['regions']} tumour region(s)"
    )
    print(
        f"resolution:  slide {res['slide_mpp']:.4g} µm/px ({res['slide_mpp_source']}), tiles "
        f"{res['tile_mpp']:.4g} µm/px, heatmap cell {res['heatmap_cell_mpp']:.3g} µm"
    )
    if not summary.skipped:
        print(
            "time:        "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
            + f" ({record['tiles_per_s']} tiles/s)"
        )
    print("outputs:")
    for name, path in record["outputs"].items():
        print(f"  {name:<15} {path}")


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default="wsi-dala-demo", help="folder for everything the demo writes")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--seed", type=int, default=20, help="seed of the generated slides and of training")


@command("demo", "generate slides, train a small DALAResNet50, run the pipeline, report IoU vs the truth")(
    _configure_demo
)
def _demo(args: argparse.Namespace) -> int:
    from wsi_dala.demo import DemoSettings, run_demo

    summary, iou = run_demo(args.dir, DemoSettings(epochs=args.epochs, seed=args.seed), progress=not args.quiet)
    _print_summary(summary)
    print(f"tumour IoU vs planted truth: {iou:.3f}")
    print(
        f"open {summary.record['slide']['path']} in QuPath and run qupath_export/import_wsi_dala.groovy "
        f"with folder = {summary.layout.root.resolve()}"
    )
    return 0


def _configure_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "archive",
        help="folder searched recursively for slides (svs, tif, ndpi, mrxs, scn, bif, vms, DICOM folders, ...)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="one sub-folder per slide, batch.json, report.md")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML (see pipelines/default.yaml)")
    parser.add_argument("--model", metavar="CKPT", help="checkpoint (default: `model:` in --config)")
    parser.add_argument("--pattern", default="*", metavar="GLOB", help="only file names matching this glob")
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="spread slides over an existing dask.distributed cluster (tcp://host:8786)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="slides processed at once by a local Dask cluster of this many processes"
    )
    parser.add_argument("--retries", type=int, default=2, help="extra attempts for failures not caused by the input")
    parser.add_argument(
        "--stale-lock-hours",
        type=float,
        default=24.0,
        help="a lock left by another host is stale after this long (same host: when its pid is gone)",
    )


@command("batch", "run every slide of an archive: skip what is done, resume, isolate bad slides, report")(
    _configure_batch
)
def _batch(args: argparse.Namespace) -> int:
    from wsi_dala.archive import BatchConfig, run_batch
    from wsi_dala.config import load_config, with_overrides

    config = with_overrides(load_config(args.config), model={"path": args.model})
    if not config.model:
        from wsi_dala.errors import CheckpointError

        raise CheckpointError("no model: give --model CKPT or set `model:` in the pipeline config")
    from wsi_dala.errors import WsiDalaError
    from wsi_dala.model import read_card

    if not Path(args.archive).is_dir():
        raise WsiDalaError(f"{args.archive}: archive folder not found")
    read_card(config.model)  # a missing or unsafe checkpoint stops the batch before any slide
    batch = BatchConfig(
        pattern=args.pattern,
        retries=max(0, args.retries),
        stale_lock_s=args.stale_lock_hours * 3600,
        workers=max(1, args.workers),
        scheduler=args.scheduler,
    )
    result = run_batch(args.archive, args.out, config, batch, progress=not args.quiet)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts().items())) or "no slides found"
    print(f"{len(result.outcomes)} slides in {result.seconds:.1f} s: {counts}")
    for outcome in result.failed:
        print(f"  FAILED {outcome.path}: {outcome.error}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 1 if result.failed else 0
