"""The model-architecture options that `train` and `pretrain` share (--arch, starting weights, and each
architecture's own options), and the ``options`` dict they make for ``build_model``: one parser, so a
backbone pre-trained with `pretrain` is built exactly as `train` will build it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from wsi_dala.cli.common import number_in
from wsi_dala.core.errors import ConfigError
from wsi_dala.model.registry import (
    ARCHITECTURES,
    ATTENTION_KINDS,
    ATTENTION_POSITIONS,
    FOUNDATION_PRESETS,
    GATE_MODES,
    TIMM_PREFIX,
    architecture_problem,
    takes_encoder_weights,
)


def architecture_argument(text: str) -> str:
    """argparse type for ``--arch``: a known architecture, or a one-line error saying what is wrong."""
    problem = architecture_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def add_architecture_options(model: argparse._ArgumentGroup) -> None:
    model.add_argument(
        "--arch",
        default="dalaresnet50",
        type=architecture_argument,
        metavar="NAME",
        help=f"architecture: {', '.join(ARCHITECTURES)}, or timm:NAME for any timm network as an encoder with a "
        "linear head on its pooled feature map (ViT: patch tokens), e.g. timm:vit_large_patch16_224 for UNI's "
        "layout (default: dalaresnet50)",
    )
    model.add_argument(
        "--pretrained",
        default="imagenet",
        metavar="imagenet|none|PATH",
        help="starting weights: ImageNet (torchvision weights API), none, or a weights file (default: imagenet)",
    )
    model.add_argument(
        "--weights",
        default="hub",
        metavar="FILE|hub|none",
        help="timm:NAME and the foundation models (uni, virchow2, ...): the encoder's weights, a local .safetensors "
        "or .bin/.pth file read without running code, hub (a foundation model's own Hugging Face repository, "
        "fetched into its cache; timm:NAME has none, so give it a FILE) or none for random weights; replaces "
        "--pretrained (default: hub)",
    )
    model.add_argument(
        "--timm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="timm:NAME: a keyword argument for timm.create_model, VALUE read as JSON where it parses "
        "(e.g. init_values=1e-5 and dynamic_img_size=true for UNI); repeatable (default: none)",
    )
    add_encoder_option(model)
    model.add_argument(
        "--attention-position",
        default="end",
        choices=ATTENTION_POSITIONS,
        help="DALAResNet50: attention after the whole of layer4, or after each of its blocks",
    )
    model.add_argument("--attention-kind", default="gate", choices=ATTENTION_KINDS, help="DALAResNet50 attention")
    model.add_argument("--gate-mode", default="x*a", choices=GATE_MODES, help="DALAResNet50: y = x*a or x*(1+a)")
    model.add_argument(
        "--vit",
        default="vit_b_16",
        metavar="vit_b_16|timm:NAME",
        help="resvit-gannet: its ViT branch, torchvision's ViT-B/16 or a timm ViT (e.g. timm:vit_small_patch16_224 "
        "for CPU-sized runs) (default: vit_b_16)",
    )
    model.add_argument(
        "--vit-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="resvit-gannet with timm:NAME: a keyword argument of the ViT (e.g. depth=6); repeatable (default: none)",
    )
    model.add_argument(
        "--fused-blocks",
        type=number_in(1, 64, integer=True),
        default=4,
        metavar="K",
        help="resvit-gannet: multi-layer token fusion over the ViT's last K blocks (default: 4)",
    )
    model.add_argument(
        "--tama-heads",
        type=number_in(1, 64, integer=True),
        default=8,
        metavar="H",
        help="resvit-gannet: attention heads of the TAMA fusion; must divide the ViT width (default: 8)",
    )
    model.add_argument(
        "--cam-layer",
        choices=("tama", "cnn"),
        default="tama",
        help="resvit-gannet: DT Grad-CAM's target, the TAMA-attended CNN tokens or the SE-attended CNN map "
        "before the fusion (default: tama)",
    )


def add_encoder_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--encoder-option``: a foundation preset's architecture argument overridden (train, pretrain, features)."""
    parser.add_argument(
        "--encoder-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a foundation model (uni, virchow2, ...): overrides one of its architecture arguments, VALUE read as "
        "JSON where it parses (e.g. depth=2 for a small network of the same family); recorded; repeatable "
        "(default: none)",
    )


def timm_options(pairs: list[str], flag: str = "--timm-option") -> dict[str, Any]:
    """``--timm-option KEY=VALUE``: VALUE as JSON where it parses (numbers, true, lists), else a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. init_values=1e-5")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def architecture_options(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """(``options`` for ``build_model``, starting weights) from the flags; a flag of another architecture
    is an error, not silently ignored."""
    options: dict[str, Any] = {}
    timm_arch = args.arch.startswith(TIMM_PREFIX)
    foundation = args.arch in FOUNDATION_PRESETS
    if args.timm_option and not timm_arch:
        raise ConfigError("--timm-option applies to --arch timm:NAME only")
    if args.weights != "hub" and not takes_encoder_weights(args.arch):
        raise ConfigError(
            "--weights is the encoder's file for --arch timm:NAME and the foundation models; other architectures "
            "take --pretrained"
        )
    if args.encoder_option and not foundation:
        raise ConfigError("--encoder-option applies to the foundation models (uni, virchow2, ...) only")
    if foundation:
        options = timm_options(args.encoder_option, "--encoder-option")
        weights = args.weights
        if weights not in ("hub", "none") and not Path(weights).is_file():
            raise ConfigError(f"{weights}: encoder weights file not found (--weights)")
        return options, weights
    if timm_arch:
        if args.weights == "hub":  # the default: a timm network has no repository of its own here
            raise ConfigError(
                f"--arch {args.arch}: give the encoder's weights with --weights FILE (a local .safetensors/.bin; "
                "nothing is downloaded), or --weights none"
            )
        if args.weights != "none" and not Path(args.weights).is_file():
            raise ConfigError(f"{args.weights}: encoder weights file not found (--weights)")
        options = timm_options(args.timm_option)
    resvit_flags = (
        args.vit != "vit_b_16"
        or args.vit_option
        or args.fused_blocks != 4
        or args.tama_heads != 8
        or args.cam_layer != "tama"
    )
    if resvit_flags and args.arch != "resvit-gannet":
        raise ConfigError(
            "--vit, --vit-option, --fused-blocks, --tama-heads and --cam-layer apply to --arch resvit-gannet only"
        )
    if args.arch == "resvit-gannet":
        options = {
            "vit": args.vit,
            "vit_options": timm_options(args.vit_option, "--vit-option"),
            "fused_blocks": args.fused_blocks,
            "heads": args.tama_heads,
            "cam_layer": args.cam_layer,
        }
    if args.arch == "dalaresnet50":
        options = {
            "attention_position": args.attention_position,
            "attention_kind": args.attention_kind,
            "gate_mode": args.gate_mode,
        }
    return options, args.weights if timm_arch else args.pretrained
