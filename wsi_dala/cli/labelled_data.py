"""The labelled-data options that `train`, `evaluate` and `gan train` share (BreakHis, an image folder, or
slides with QuPath annotations), and reading them into samples."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_dala.cli.common import add_min_tissue_option, deprecated_flag, number_in, tiling_from_flags
from wsi_dala.core.config import DEFAULT_TILE_MPP
from wsi_dala.core.errors import ConfigError

if TYPE_CHECKING:
    from wsi_dala.training.datasets import Sample

BREAKHIS_MAGNIFICATIONS = ("40X", "100X", "200X", "400X")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("data (give exactly one source)")
    source.add_argument("--breakhis", metavar="ROOT", help="a BreakHis tree (BreaKHis_v1/...)")
    source.add_argument(
        "--breakhis-magnification",
        metavar="MAG",
        choices=BREAKHIS_MAGNIFICATIONS,
        help="BreakHis magnification to use (default: all four)",
    )
    deprecated_flag(
        source,
        "--magnification",
        "--breakhis-magnification",
        dest="breakhis_magnification",
        choices=BREAKHIS_MAGNIFICATIONS,
    )
    source.add_argument("--folder", metavar="ROOT", help="image-folder tree: ROOT/<class>/[<group>/]<image>")
    source.add_argument(
        "--group-pattern",
        type=regex_with_a_group,
        default=r"^(.+?)_",
        metavar="REGEX",
        help="--folder: regex whose first group is the slide/patient of a file name "
        "(used when images are not in per-group sub-folders)",
    )
    source.add_argument(
        "--slide",
        action="append",
        default=[],
        metavar="SLIDE[=GEOJSON]",
        help="a slide with QuPath annotations (GEOJSON, when left out: beside the slide, same stem); "
        "repeat for several slides",
    )
    source.add_argument(
        "--unannotated-class",
        metavar="NAME",
        help="--slide: class for tissue tiles outside every annotation (default: drop them)",
    )
    source.add_argument(
        "--min-cover",
        type=number_in(0, 1, low_open=True),
        default=0.5,
        metavar="F",
        help="--slide: fraction of a tile an annotation must cover to label it",
    )
    source.add_argument(
        "--mpp",
        type=number_in(0.01, 100),
        default=None,
        metavar="UM",
        help=f"µm/px of the training tiles: --slide cuts them at it ({DEFAULT_TILE_MPP} if not given) and the model "
        "card records what the tiler measured; for --folder and --breakhis it is the images' own, recorded in the "
        "model card (default: read from the images or the slides)",
    )
    deprecated_flag(source, "--tile-mpp", "--mpp", dest="mpp", type=number_in(0.01, 100))
    deprecated_flag(source, "--train-mpp", "--mpp", dest="mpp", type=number_in(0.01, 100))
    add_min_tissue_option(source, "--slide: tissue fraction to keep a tile, as in run")


def regex_with_a_group(text: str) -> str:
    try:
        groups = re.compile(text).groups
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({exc})") from None
    if groups < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has no group: its first group names the slide/patient")
    return text


def load_samples(
    args: argparse.Namespace, tiles_dir: Path, input_size: int
) -> tuple[list[Sample], list[str], float | None, str, str]:
    """(samples, class names, µm/px or None, note, source description)."""
    from wsi_dala.training import datasets

    given = [bool(args.breakhis), bool(args.folder), bool(args.slide)]
    if sum(given) != 1:
        raise ConfigError("give exactly one data source: --breakhis, --folder or --slide")
    if args.breakhis:
        magnification = args.breakhis_magnification
        samples = datasets.breakhis_samples(args.breakhis, magnification)
        mpp = datasets.BREAKHIS_MPP.get(magnification) if magnification else None
        note = datasets.BREAKHIS_MPP_NOTE if mpp else "BreakHis, mixed magnifications: no single µm/px"
        return samples, list(datasets.BREAKHIS_CLASSES), mpp, note, f"BreakHis {args.breakhis}"
    if args.folder:
        samples, names = datasets.image_folder_samples(args.folder, args.group_pattern)
        return samples, names, None, "image folder: µm/px unknown (give --mpp)", f"image folder {args.folder}"
    from wsi_dala.training.slide_tiles import annotated_slide_samples, parse_slide_argument

    tiling = tiling_from_flags(args, default_tile_px=input_size)
    slides = [parse_slide_argument(text) for text in args.slide]
    samples, names, slide_mpp = annotated_slide_samples(
        slides, tiles_dir, tiling, args.min_cover, args.unannotated_class, progress=not args.quiet
    )
    return samples, names, slide_mpp, "measured by the wsi-dala tiler", f"{len(slides)} annotated slides"
