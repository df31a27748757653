"""The ``wsi-dala`` command line: thin verbs over the stages.

Errors that are the input's fault print one line, ``wsi-dala: error: <file>: <problem>``, and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from wsi_dala import __version__
from wsi_dala.errors import WsiDalaError

log = logging.getLogger("wsi_dala")

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help_text: str) -> Callable:
    """Register a verb: ``configure(parser)`` adds its options, the decorated function runs it."""

    def register(configure: Callable[[argparse.ArgumentParser], None]) -> Callable:
        def with_handler(handler: Handler) -> Handler:
            _COMMANDS[name] = (configure, handler, help_text)
            return handler

        return with_handler

    return register


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, except where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_slide_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reader",
        choices=("auto", "openslide", "tiffslide"),
        default="auto",
        help="slide library; auto: tiffslide first for .svs/.tif/.tiff (fast parallel decoding), "
        "openslide first otherwise",
    )
    parser.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        metavar="UM",
        help="the slide's level-0 µm/px, overriding (or standing in for) its metadata",
    )


def _add_tiling_options(parser: argparse.ArgumentParser, with_geometry: bool = True) -> None:
    if with_geometry:
        target = parser.add_mutually_exclusive_group()
        target.add_argument(
            "--mpp",
            type=float,
            default=None,
            metavar="UM",
            help="target µm/px of the tiles (default 0.5 when neither this nor --magnification is given)",
        )
        target.add_argument(
            "--magnification",
            type=float,
            default=None,
            metavar="X",
            help="target magnification, converted as 10 µm / X (20 -> 0.5 µm/px)",
        )
        parser.add_argument("--tile-size", type=int, default=224, metavar="PX", help="tile side in pixels")
        parser.add_argument(
            "--stride",
            type=int,
            default=None,
            metavar="PX",
            help="step between tiles in tile pixels (default: the tile size, no overlap)",
        )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        metavar="F",
        help="keep tiles with at least this fraction of tissue (0-1)",
    )
    parser.add_argument(
        "--allow-upsample",
        action="store_true",
        help="upsample when the target is finer than the finest level (otherwise an error)",
    )
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    _add_slide_options(parser)


def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", help="slide file (SVS, pyramidal TIFF, NDPI, MRXS, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_slide_options(parser)


@command("info", "print what the reader knows about a slide")(_configure_info)
def _info(args: argparse.Namespace) -> int:
    from wsi_dala.slide import Slide

    with Slide(args.slide, reader=args.reader, slide_mpp=args.slide_mpp) as slide:
        info = slide.info.to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:>20}: {value}")
    return 0


def _configure_tile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", help="slide file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (tiles.zarr is written here)")
    _add_tiling_options(parser)


def tiling_config_from_args(args: argparse.Namespace, default_mpp: float = 0.5, default_tile: int = 224):
    from wsi_dala.slide import magnification_to_mpp
    from wsi_dala.tiling import TilingConfig

    mpp = getattr(args, "mpp", None)
    if getattr(args, "magnification", None) is not None:
        mpp = magnification_to_mpp(args.magnification)
    tile = getattr(args, "tile_size", None) or default_tile
    if tile < 8:
        raise WsiDalaError(f"--tile-size must be at least 8 pixels, got {tile}")
    if not 0 <= args.min_tissue <= 1:
        raise WsiDalaError(f"--min-tissue must be between 0 and 1, got {args.min_tissue}")
    return TilingConfig(
        target_mpp=mpp or default_mpp,
        tile_size_px=tile,
        stride_px=getattr(args, "stride", None),
        min_tissue=args.min_tissue,
        allow_upsample=args.allow_upsample,
        workers=max(1, args.workers),
    )


@command("tile", "cut a slide into µm/px-matched tiles stored in Zarr")(_configure_tile)
def _tile(args: argparse.Namespace) -> int:
    from wsi_dala.tiling import tile_slide

    config = tiling_config_from_args(args)
    result = tile_slide(
        args.slide, args.out, config, reader=args.reader, slide_mpp=args.slide_mpp, progress=not args.quiet
    )
    what = "already complete, nothing to do" if result.skipped else f"{result.seconds:.1f} s"
    print(f"tiles kept:   {result.n_tiles} of {result.grid_tiles} in the grid ({what})")
    print(f"slide:        {result.slide_mpp:.4g} µm/px (source: {result.mpp_source})")
    print(
        f"read:         level {result.level} at {result.level_mpp:.4g} µm/px, "
        f"resize factor {result.resize_factor:.4g} -> {result.effective_mpp:.4g} µm/px tiles"
    )
    if result.chunks_resumed:
        print(f"resumed:      {result.chunks_resumed} chunks were already written")
    if not result.skipped and result.seconds > 0:
        print(f"speed:        {result.n_tiles / result.seconds:.1f} tiles/s")
    print(f"store:        {result.store}")
    return 0


def _configure_synthesize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="file to write (.svs for Aperio layout, .tif for generic pyramidal TIFF)")
    parser.add_argument("--width", type=int, default=16384, help="level-0 width in pixels")
    parser.add_argument("--height", type=int, default=12288, help="level-0 height in pixels")
    parser.add_argument("--slide-mpp", type=float, default=0.25, metavar="UM", help="level-0 µm/px to record")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the tissue layout")


@command("synthesize", "write a synthetic H&E-like slide with planted tumour (for trying the pipeline)")(
    _configure_synthesize
)
def _synthesize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wsi_dala.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = Path(args.path)
    layout = "svs" if path.suffix.lower() == ".svs" else "tiff"
    spec = SyntheticSlideSpec(
        width=args.width,
        height=args.height,
        mpp=args.slide_mpp,
        layout=layout,
        seed=args.seed,
        app_mag=round(10 / args.slide_mpp, 1),
    )
    slide = write_synthetic_slide(path, spec)
    print(f"wrote {slide.path} ({args.width}x{args.height} px at {args.slide_mpp} µm/px, {layout})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from wsi_dala import cli_pipeline, cli_training  # noqa: F401  (register run, demo, train, evaluate, cam)

    parser = argparse.ArgumentParser(
        prog="wsi-dala",
        description="Whole-slide tumour-probability heatmaps with DALAResNet50 and DT Grad-CAM, for QuPath.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"wsi-dala {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (configure, handler, help_text) in _COMMANDS.items():
        verb = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        verb.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
        verb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        configure(verb)
        verb.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if args.verbose
        else "wsi-dala: %(levelname)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("wsi_dala").setLevel(logging.WARNING)
    else:
        for noisy in ("PIL", "matplotlib", "distributed", "fsspec", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except WsiDalaError as exc:
        print(f"wsi-dala: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named is missing or cannot be read/written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"wsi-dala: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsi-dala: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
