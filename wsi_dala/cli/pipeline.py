"""CLI verbs for the main job: ``run`` (one slide) and ``demo`` (everything on generated data)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_dala.cli.common import (
    Verb,
    add_dicom_option,
    add_engine_options,
    add_mil_option,
    add_qc_option,
    add_slide_options,
    add_stain_option,
    add_uncertainty_options,
    number_in,
)
from wsi_dala.core.formats import slide_argument
from wsi_dala.core.layout import DEFAULT_DEMO_DIR, default_run_dir

if TYPE_CHECKING:
    from wsi_dala.runs.dicom_results import DicomResults
    from wsi_dala.runs.pipeline import RunSummary


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slide",
        type=slide_argument,
        help="slide file (SVS, pyramidal TIFF, NDPI, MRXS, ...) or DICOM WSI folder (or any of its .dcm files)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH|NAME",
        help="a .safetensors checkpoint, a WSInfer model folder (config.json + TorchScript), a WSInfer-zoo name "
        "(e.g. breast-tumor-resnet34.tcga-brca; `wsi-dala models` lists them) or hf:ORG/REPO[@REVISION], "
        "fetched once into the Hugging Face cache (default: `model:` in --config)",
    )
    parser.add_argument(
        "--positive-class",
        metavar="NAME",
        help="for a WSInfer model whose class names do not make it obvious: the class the heatmap shows",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default: ./wsi-dala-runs/<slide name>)")
    parser.add_argument(
        "--features",
        metavar="DIR",
        help="a foundation-model head: read the patch tokens `wsi-dala features --patch-tokens` stored in DIR for "
        "this slide instead of running the encoder; refused unless they are of this slide's tiles and this head's "
        "encoder. Without it the output folder's own store is used when it fits (default: none)",
    )
    add_mil_option(parser)
    add_dicom_option(parser)
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML (see pipelines/default.yaml); flags win")
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a dask.distributed scheduler, e.g. tcp://host:8786 (default: local threads)",
    )
    parser.add_argument("--batch-size", type=int, metavar="N", help="tiles per model batch (default: 32)")
    add_engine_options(parser)
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--mpp", type=float, metavar="UM", help="tile µm/px (default: the model card's)")
    parser.add_argument("--min-tissue", type=float, metavar="F", help="tissue fraction to keep a tile (default: 0.25)")
    parser.add_argument("--reader-threads", type=int, metavar="N", help="slide reader threads (default: 2)")
    parser.add_argument(
        "--tile-threshold",
        type=float,
        metavar="P",
        help="tiles at or above this probability are classed Tumor (default: 0.5)",
    )
    parser.add_argument("--gzip", action="store_true", default=None, help="write .geojson.gz (QuPath reads it)")
    add_qc_option(parser, default=None)
    add_stain_option(parser)
    add_uncertainty_options(parser)
    add_slide_options(parser, defaults=False)
    parser.add_argument(
        "--allow-upsample",
        action="store_true",
        default=None,
        help="upsample when the model wants finer tiles than the slide has",
    )


def _run(args: argparse.Namespace) -> int:
    from wsi_dala.core.config import load_config, with_overrides

    # Every setting is checked here, before the slide, the model or torch is touched.
    config = with_overrides(
        load_config(args.config),
        model=args.model,
        positive_class=args.positive_class,
        features=args.features,
        mil=args.mil,
        tiling={
            "mpp": args.mpp,
            "min_tissue": args.min_tissue,
            "reader": args.reader,
            "slide_mpp": args.slide_mpp,
            "allow_upsample": args.allow_upsample,
            "reader_threads": args.reader_threads,
            "qc": {"mode": args.qc},
        },
        scoring={
            "stain_normalise": args.stain_normalise,
            "tta": args.tta,
            "mc_dropout": args.mc_dropout,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "backend": args.backend,
            "devices": args.devices,
            "device": args.device,
            "scheduler": args.scheduler,
        },
        export={"tile_threshold": args.tile_threshold, "gzip": args.gzip, "dicom": args.dicom},
    )
    from wsi_dala.runs.pipeline import run_slide

    out = Path(args.out) if args.out else default_run_dir(args.slide)
    summary = run_slide(args.slide, out, config, progress=not args.quiet)
    print_summary(summary)
    if summary.dicom is not None:
        print_dicom(summary.dicom)
    return 0


def print_dicom(results: DicomResults) -> None:
    written = "written as DICOM first, in " + str(results.source.parent) if results.converted else "referenced as is"
    print(f"dicom:       the slide {written}; study {results.study_uid}")
    print(f"  segmentation    {results.segmentation}")
    if results.annotations is not None:
        print(f"  annotations     {results.annotations}")


def print_summary(summary: RunSummary) -> None:
    record = summary.record
    if summary.skipped:
        print(f"unchanged slide, settings and model: nothing to do (see {summary.layout.run_json})")
    counts, res = record.counts, record.resolution
    print(f"tiles:       {counts.tiles} scored, {counts.tumour_tiles} classed Tumor; {counts.regions} tumour region(s)")
    if record.slide_answer:
        from wsi_dala.outputs.slide_answer import SlideAnswer

        print(f"slide:       {SlideAnswer(**record.slide_answer).words()}")
    print(
        f"resolution:  slide {res.slide_mpp:.4g} µm/px ({res.slide_mpp_source}), tiles "
        f"{res.tile_mpp:.4g} µm/px, heatmap cell {res.heatmap_cell_mpp:.3g} µm"
    )
    calibration, heatmap = record.calibration, record.heatmap
    if calibration.get("status") == "calibrated":
        print(f"model:       calibrated, temperature {calibration['temperature']:.3g}")
    elif calibration:
        print("model:       uncalibrated (no temperature in the model card; `wsi-dala calibrate` fits one)")
    grid = []
    if heatmap.get("seam_index") is not None:
        grid.append(f"seam index {heatmap['seam_index']:.3f}")
    if heatmap.get("tile_period_power") is not None:
        grid.append(f"tile-period power {heatmap['tile_period_power']:.2f}")
    if grid:
        print(f"heatmap:     {', '.join(grid)} (the tile grid in the tumour layer; 1: none)")
    qc = record.qc
    if qc and qc["mode"] == "off":
        print("QC:          off (blur not measured, nothing flagged)")
    elif qc:
        for line in qc_lines(qc):
            print(line)
    if record.stain.get("out_of_distribution"):
        print(f"stain:       out of distribution ({record.stain['summary']}); consider --stain-normalise macenko")
    if not summary.skipped:
        times = dict(record.timings_s)
        overlapped = record.scoring.get("chunks_scored_while_tiling", 0)
        if overlapped:  # tiling and scoring ran together: their sum would count the same seconds twice
            both = times.pop("tile_and_score")
            times.pop("tile"), times.pop("score")
            chunks = "1 chunk" if overlapped == 1 else f"{overlapped} chunks"
            times = {f"tile + score ({chunks} scored while tiling)": both, **times}
        else:
            times.pop("tile_and_score", None)
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        backend = record.scoring.get("backend") or {}
        if backend:
            print(f"backbone:    {backend['engine']} {backend['precision']} ({backend['reason']})")
        print(f"time:        {timings} ({record.tiles_per_s} tiles/s)")
    print("outputs:")
    for name, file_name in record.outputs.items():
        print(f"  {name:<15} {summary.layout.root / file_name}")


def qc_lines(qc: dict[str, Any]) -> list[str]:
    """What QC found and did, for the summary: flagged tiles are marked; under exclude, what was left out."""
    percent, flagged = qc["percent_of_tissue"], qc["tiles_flagged"]
    lines = [
        f"QC:          {flagged['any']} tiles flagged ({flagged['blur']} out of focus, {flagged['fold']} folded, "
        f"{flagged['ink']} inked); of the tissue {percent['blur']:.0f} % out of focus, {percent['fold']:.0f} % "
        f"folded; marker ink {qc['ink_mm2']:.2f} mm²"
    ]
    if qc["mode"] == "flag" and flagged["any"]:
        lines.append(
            "             flagged tiles are scored and marked (hatched); regions and probabilities are unchanged"
        )
    tumour = qc.get("tumour_excluded")
    if qc["mode"] == "exclude" and tumour is not None:
        left_out = qc["tiles_excluded"].get("any", 0)
        lines.append(
            f"             --qc exclude left out {left_out} tiles, {tumour['tumour_tiles']} of the "
            f"{tumour['of_tumour_tiles']} tiles called tumour ({tumour['tissue_mm2']:.2f} mm² of tissue)"
        )
        if tumour["tumour_tiles"] and tumour["tumour_tiles"] == tumour["of_tumour_tiles"]:
            lines.append(
                "warning:     every tile called tumour was flagged and left out: no tumour region is exported; "
                "run with --qc flag to see them marked"
            )
    if qc.get("warning"):
        lines.append(f"warning:     {qc['warning']}")
    return lines


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=DEFAULT_DEMO_DIR, help="folder for everything the demo writes")
    parser.add_argument("--epochs", type=number_in(1, 1000, integer=True), default=3, help="training epochs")
    parser.add_argument(
        "--seed",
        type=number_in(0, 2**32 - 1, integer=True),
        default=20,
        help="seed of the generated slides and of training",
    )


def _demo(args: argparse.Namespace) -> int:
    from wsi_dala.runs.demo import DemoSettings, run_demo

    summary, iou = run_demo(args.dir, DemoSettings(epochs=args.epochs, seed=args.seed), progress=not args.quiet)
    print_summary(summary)
    print(f"tumour IoU vs planted truth: {iou:.3f}")
    print(
        f"open {summary.record.slide['path']} in QuPath, run qupath_export/import_wsi_dala.groovy and choose "
        f"the run folder {summary.layout.root.resolve()}"
    )
    return 0


def _configure_export_dicom(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder")


def _export_dicom(args: argparse.Namespace) -> int:
    from wsi_dala.runs.dicom_results import export_dicom

    print_dicom(export_dicom(Path(args.run_dir)))
    return 0


VERBS = (
    Verb("run", "tile -> score (+DT Grad-CAM) -> heatmap -> QuPath GeoJSON, for one slide", _configure_run, _run),
    Verb(
        "export-dicom",
        "a finished run's results as DICOM: Segmentation (tumour probability) and Bulk Simple Annotations (regions)",
        _configure_export_dicom,
        _export_dicom,
    ),
    Verb(
        "demo",
        "generate slides, train a small DALAResNet50, run the pipeline, report IoU vs the truth",
        _configure_demo,
        _demo,
    ),
)
