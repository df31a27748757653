"""CLI verbs on slides: ``info``, ``tile``, ``synthesize``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_dala.cli.common import Verb, add_slide_options, add_tiling_options, number_in, tiling_from_flags
from wsi_dala.core.formats import slide_argument

# Spelled out here so that building the parser does not import the generator (scipy, tifffile);
# tests/test_synthetic.py checks they match wsi_dala.slides.synthetic.MARKER_NAMES and STAIN_NAMES.
_MARKERS_HELP = "green, blue, black, dark-grey, red"
_STAINS_HELP = "default, pale, dark"


def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slide",
        type=slide_argument,
        help="slide file (SVS, pyramidal TIFF, NDPI, MRXS, ...) or DICOM WSI folder (or any of its .dcm files)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_slide_options(parser)


def _info(args: argparse.Namespace) -> int:
    from wsi_dala.slides.reader import Slide

    with Slide(args.slide, reader=args.reader, slide_mpp=args.slide_mpp) as slide:
        info = slide.info.to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:>20}: {value}")
    return 0


def _configure_tile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", type=slide_argument, help="slide file, or DICOM WSI folder (or any of its .dcm files)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (tiles.zarr is written here)")
    add_tiling_options(parser)


def _tile(args: argparse.Namespace) -> int:
    config = tiling_from_flags(args)  # settings are checked before the slide is opened
    from wsi_dala.tiling.tiler import qc_words, tile_slide

    result = tile_slide(args.slide, args.out, config, progress=not args.quiet)
    what = "already complete, nothing to do" if result.skipped else f"{result.seconds:.1f} s"
    cut = result.record
    print(f"tiles kept:   {result.n_tiles} of {cut.grid_tiles} in the grid ({what})")
    print(f"slide:        {cut.slide_mpp:.4g} µm/px (source: {cut.mpp_source})")
    print(
        f"read:         level {cut.level} at {cut.level_mpp:.4g} µm/px, "
        f"resize factor {cut.resize_factor:.4g} -> {cut.effective_mpp:.4g} µm/px tiles"
    )
    if result.chunks_resumed:
        print(f"resumed:      {result.chunks_resumed} chunks were already written")
    from wsi_dala.core.layout import RunLayout
    from wsi_dala.tiling.store import TileStore

    qc = TileStore(result.store).info.qc
    if qc is not None:
        print(
            f"QC:           {qc_words(qc)}; ink {qc.areas_um2['ink'] / 1e6:.2f} mm², "
            f"folds {qc.areas_um2['fold'] / 1e6:.2f} mm² (see {RunLayout(Path(args.out)).qc_png})"
        )
    if not result.skipped and result.seconds > 0:
        print(f"speed:        {result.n_tiles / result.seconds:.1f} tiles/s")
    print(f"store:        {result.store}")
    from wsi_dala.runs.pipeline import check_quality

    # A slide with no tissue is bad input for `tile` as for `run` (exit 2, one line); the empty store and the
    # pictures that show why stay on disk.
    check_quality(TileStore(result.store), Path(args.slide), RunLayout.for_slide(Path(args.out), args.slide))
    return 0


def _configure_synthesize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="file to write (.svs for Aperio layout, .tif for generic pyramidal TIFF)")
    parser.add_argument("--width", type=int, default=16384, help="level-0 width in pixels")
    parser.add_argument("--height", type=int, default=12288, help="level-0 height in pixels")
    parser.add_argument("--slide-mpp", type=float, default=0.25, metavar="UM", help="level-0 µm/px to record")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the tissue layout (default: 0)")
    parser.add_argument(
        "--markers",
        type=_marker_list,
        default="green,blue,black",
        metavar="LIST",
        help=f"comma-separated marker inks drawn over glass and tissue, from {_MARKERS_HELP}; "
        "none for a clean slide (default: green,blue,black)",
    )
    parser.add_argument(
        "--folds",
        type=number_in(0, 50, integer=True),
        default=0,
        metavar="N",
        help="tissue folds (darker, doubled bands) to plant (default: 0)",
    )
    parser.add_argument(
        "--blur-patches",
        type=number_in(0, 50, integer=True),
        default=0,
        metavar="N",
        help="out-of-focus patches of tissue to plant (default: 0)",
    )
    parser.add_argument(
        "--stain",
        type=_stain_name,
        default="default",
        metavar="NAME",
        help=f"H&E palette: {_STAINS_HELP} (default: default)",
    )


def _marker_list(text: str) -> tuple[str, ...]:
    """An argparse type: marker names, comma-separated, or none."""
    from wsi_dala.slides.synthetic import MARKER_NAMES

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if names == ("none",):
        return ()
    unknown = [name for name in names if name not in MARKER_NAMES[1:]]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: markers are none or a comma list of {_MARKERS_HELP}")
    return names


def _stain_name(text: str) -> str:
    """An argparse type: one of the generator's H&E palettes."""
    from wsi_dala.slides.synthetic import STAIN_NAMES

    if text not in STAIN_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: one of {_STAINS_HELP}")
    return text


def _synthesize(args: argparse.Namespace) -> int:
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = Path(args.path)
    layout = "svs" if path.suffix.lower() == ".svs" else "tiff"
    spec = SyntheticSlideSpec(
        width=args.width,
        height=args.height,
        mpp=args.slide_mpp,
        layout=layout,
        seed=args.seed,
        markers=args.markers,
        folds=args.folds,
        blur_patches=args.blur_patches,
        stain=args.stain,
        app_mag=round(10 / args.slide_mpp, 1) if args.slide_mpp > 0 else None,
    )
    slide = write_synthetic_slide(path, spec)
    print(f"wrote {slide.path} ({args.width}x{args.height} px at {args.slide_mpp} µm/px, {layout})")
    return 0


VERBS = (
    Verb("info", "print what the reader knows about a slide", _configure_info, _info),
    Verb("tile", "cut a slide into µm/px-matched tiles stored in Zarr", _configure_tile, _tile),
    Verb(
        "synthesize",
        "write a synthetic H&E-like slide with planted tumour (for trying the pipeline)",
        _configure_synthesize,
        _synthesize,
    ),
)
