"""``wsi-dala features``: a foundation model's tile features of a slide or an archive, stored once."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_dala.cli.architecture import add_encoder_option, timm_options
from wsi_dala.cli.common import Verb, add_min_tissue_option, add_precision_option, number_in
from wsi_dala.core.errors import ConfigError, WsiDalaError
from wsi_dala.core.formats import slide_argument
from wsi_dala.model.foundation_presets import PRESETS


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slides", type=slide_argument, metavar="SLIDE|ARCHIVE", help="a slide file, or a folder of slides"
    )
    encoder = parser.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--arch", choices=list(PRESETS), metavar="NAME", help=_arch_help())
    encoder.add_argument(
        "--model",
        metavar="CKPT",
        help="or a wsi-dala classifier (.safetensors) whose backbone is the encoder: its pooled last feature map, "
        "at its own µm/px and tile size (e.g. DALAResNet50 features for `mil train`)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: OUT/features.zarr beside OUT/tiles.zarr; for an archive OUT/<slide>-<hash>/ per slide",
    )
    parser.add_argument(
        "--weights",
        default="hub",
        metavar="FILE|hub|none",
        help="the encoder's weights: a local .safetensors or .bin/.pth file read without running code, hub (its "
        "own Hugging Face repository, fetched into the hub's cache) or none for random weights (default: hub)",
    )
    add_encoder_option(parser)
    parser.add_argument(
        "--patch-tokens",
        action="store_true",
        help="also keep the last block's patch tokens, fp16 (UNI at 224 px: 196 x 1024 values, 392 KiB a tile)",
    )
    parser.add_argument(
        "--batch-size",
        type=number_in(1, 4096, integer=True),
        default=8,
        metavar="N",
        help="tiles a forward pass (default: 8)",
    )
    add_precision_option(parser, None)
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "onnxruntime", "openvino"),
        default="auto",
        help="engine that runs the encoder: auto exports it to ONNX once (kept in the user cache, or beside --model), "
        "checks each installed engine against torch fp32 on the first slide's tiles and takes the fastest "
        "(OpenVINO bf16 runs a ViT-L about 1.3x torch bf16 on an AVX-512 CPU); a store begun on torch is finished "
        "on torch (default: auto)",
    )
    add_min_tissue_option(parser, "keep tiles with at least this fraction of tissue (default: 0.25)")


def _arch_help() -> str:
    return "the foundation model: " + ", ".join(PRESETS) + " (docs/models.md lists each one's facts)"


def _features(args: argparse.Namespace) -> int:
    from wsi_dala.runs.archive import find_slides, slide_id
    from wsi_dala.runs.features import FeatureSettings, features_for_slide, prepare_encoder

    source = Path(args.slides)
    if args.weights not in ("hub", "none") and not Path(args.weights).is_file():
        raise ConfigError(f"{args.weights}: encoder weights file not found (--weights)")
    is_archive = source.is_dir() and not any(source.glob("*.dcm"))
    slides = find_slides(source) if is_archive else [source]
    if is_archive and not slides:
        raise ConfigError(f"{source}: no slides in this folder")
    if not is_archive and not source.exists():
        raise ConfigError(f"{source}: file not found")
    if args.model is not None:
        if args.patch_tokens or args.encoder_option or args.weights != "hub":
            raise ConfigError("--model: a classifier brings its own weights and has no patch tokens or options")
        if not Path(args.model).is_file():
            raise ConfigError(f"{args.model}: checkpoint not found (--model)")
    settings = FeatureSettings(
        checkpoint=args.model,
        preset=args.arch,
        weights=args.weights,
        options=timm_options(args.encoder_option, "--encoder-option"),
        patch_tokens=args.patch_tokens,
        batch_size=int(args.batch_size),
        precision=args.precision or "auto",
        min_tissue=args.min_tissue,
        backend=args.backend,
    )
    encoder = prepare_encoder(settings)  # weights fetched and checked before any slide is read
    out = Path(args.out)
    failed = []
    for slide in slides:
        try:
            folder = out / slide_id(source, slide) if is_archive else out  # an archive: a folder per slide
            result = features_for_slide(slide, folder, settings, encoder, progress=not args.quiet)
        except WsiDalaError as exc:
            if not is_archive:
                raise
            failed.append(slide)
            print(f"failed:   {exc}")  # the error names the slide
            continue
        what = "already complete" if result.chunks_computed == 0 else f"{result.seconds:.1f} s"
        print(f"features: {slide.name}: {result.n_tiles} tiles x {result.embedding_dim} ({what}) -> {result.path}")
    engine = encoder.engine.label if encoder.engine else f"torch {encoder.card['precision']}"
    print(f"encoder:  {args.arch or args.model}, {engine}, weights {encoder.card['weights']}")
    if failed:
        print(f"{len(failed)} of {len(slides)} slides failed; rerun the same command to retry them")
        return 1
    return 0


VERBS = (
    Verb(
        "features",
        "store a foundation model's tile features for a slide or an archive (features.zarr)",
        _configure,
        _features,
    ),
)
