"""CLI verb for archives: ``batch``."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_dala.cli.common import (
    Verb,
    add_dicom_option,
    add_engine_options,
    add_mil_option,
    add_qc_option,
    add_stain_option,
    add_uncertainty_options,
    deprecated_flag,
    existing_dir,
)
from wsi_dala.core.layout import BatchLayout

EXIT_TERMINATED = 143  # 128 + SIGTERM, as the shell reports a process it ended


def _configure_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "archive",
        help="folder searched recursively for slides (svs, tif, ndpi, mrxs, scn, bif, vms, DICOM folders, ...)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="one sub-folder per slide, batch.json, report.md")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML (see pipelines/default.yaml)")
    parser.add_argument(
        "--model",
        metavar="PATH|NAME",
        help="checkpoint, WSInfer model folder, WSInfer-zoo name or hf:ORG/REPO[@REVISION], resolved once for "
        "the whole batch (default: `model:` in --config)",
    )
    parser.add_argument("--positive-class", metavar="NAME", help="for a WSInfer model: the class the heatmap shows")
    add_mil_option(parser)
    add_dicom_option(parser)
    parser.add_argument("--pattern", default="*", metavar="GLOB", help="only file names matching this glob")
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="spread slides over an existing dask.distributed cluster (tcp://host:8786)",
    )
    parser.add_argument(
        "--dask-workers",
        type=int,
        default=1,
        metavar="N",
        help="slides processed at once by a local Dask cluster of this many worker processes",
    )
    deprecated_flag(parser, "--workers", "--dask-workers", dest="dask_workers", type=int)
    add_qc_option(parser, default=None)
    add_stain_option(parser)
    add_uncertainty_options(parser)
    add_engine_options(parser)
    parser.add_argument("--retries", type=int, default=2, help="extra attempts for failures not caused by the input")
    parser.add_argument(
        "--stale-lock-hours",
        type=float,
        default=24.0,
        help="a lock left by another host is stale after this long (same host: when its pid is gone)",
    )


def _batch(args: argparse.Namespace) -> int:
    from wsi_dala.core.config import BatchConfig, build, load_config, with_overrides
    from wsi_dala.core.errors import CheckpointError

    config = with_overrides(
        load_config(args.config),
        model=args.model,
        positive_class=args.positive_class,
        mil=args.mil,
        tiling={"qc": {"mode": args.qc}},
        scoring={
            "stain_normalise": args.stain_normalise,
            "tta": args.tta,
            "mc_dropout": args.mc_dropout,
            "precision": args.precision,
            "backend": args.backend,
            "devices": args.devices,
        },
        export={"dicom": args.dicom},
    )
    batch = build(
        BatchConfig,
        {
            "pattern": args.pattern,
            "retries": args.retries,
            "stale_lock_s": args.stale_lock_hours * 3600,
            "dask_workers": args.dask_workers,
            "scheduler": args.scheduler,
        },
        "command line",
    )
    if not config.model:
        raise CheckpointError("no model: give --model CKPT or set `model:` in the pipeline config")
    if batch.scheduler:
        from wsi_dala.inference.cluster import check_address

        check_address(batch.scheduler)
    archive = existing_dir(args.archive, "archive folder")
    if config.export.dicom:
        from wsi_dala.runs.dicom_results import require_dicom_packages

        require_dicom_packages()  # before any slide
    from wsi_dala.model import read_card
    from wsi_dala.runs.archive import run_batch
    from wsi_dala.runs.pipeline import resolve_model

    checkpoint = resolve_model(config.model, config.positive_class)  # fetched and imported once, not per slide
    read_card(checkpoint)  # a bad model stops the batch before any slide
    config = config.model_copy(update={"model": str(checkpoint), "positive_class": None})
    result = run_batch(archive, args.out, config, batch, progress=not args.quiet)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts().items())) or "no slides found"
    print(f"{len(result.outcomes)} slides in {result.seconds:.1f} s: {counts}")
    for outcome in result.failed:
        print(f"  FAILED {outcome.path}: {outcome.error}")
    print(f"report: {BatchLayout(Path(args.out)).report_md}")
    if result.interrupted:
        print("stopped by SIGTERM: the report lists what finished; run the same command to go on")
        return EXIT_TERMINATED
    return 1 if result.failed else 0


VERBS = (
    Verb(
        "batch",
        "run every slide of an archive: skip what is done, resume, isolate bad slides, report",
        _configure_batch,
        _batch,
    ),
)
