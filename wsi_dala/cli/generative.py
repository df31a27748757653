"""CLI verb ``gan``: ``gan train`` (a class-conditional StyleGAN2 with ADA on labelled tiles) and ``gan sample``
(PNG tiles of one class with the synthetic.json that `train --synthetic` reads)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_dala.cli.common import Formatter, Verb, number_in
from wsi_dala.cli.labelled_data import add_data_options, load_samples
from wsi_dala.core.config import GanConfig, build
from wsi_dala.core.errors import ConfigError


def _configure_gan(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="gan_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train on labelled tiles (all classes, or one)", formatter_class=Formatter)
    train.add_argument("--out", required=True, metavar="DIR", help="run folder (gan.safetensors, curves, samples)")
    add_data_options(train)
    train.add_argument("--class", dest="only_class", metavar="NAME", help="train on this class only (default: all)")
    train.add_argument("--resolution", type=int, default=64, help="tile side, a power of two 32..256 (default: 64)")
    train.add_argument("--steps", type=int, default=2000, help="generator updates (default: 2000)")
    train.add_argument("--batch-size", type=int, default=16, help="tiles per step (default: 16)")
    train.add_argument(
        "--lr", type=float, default=0.0025, metavar="RATE", help="Adam learning rate, both networks (default: 0.0025)"
    )
    train.add_argument("--r1-gamma", type=float, default=1.0, help="R1 penalty weight (default: 1.0)")
    train.add_argument("--ada-target", type=float, default=0.6, help="ADA's target for r_t (default: 0.6)")
    train.add_argument(
        "--ada-speed", type=int, default=100_000, metavar="IMAGES", help="images for p to go 0 -> 1 (default: 100000)"
    )
    train.add_argument("--channel-max", type=int, default=256, help="widest layer (default: 256)")
    train.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    train.add_argument(
        "--kid-every", type=int, default=0, help="steps between KID measurements (default: 0 = at the end only)"
    )
    train.add_argument("--kid-samples", type=int, default=500, help="generated tiles per KID (default: 500)")
    train.add_argument(
        "--kid-holdout",
        type=number_in(0, 0.9),
        default=0.2,
        metavar="F",
        help="share of slides/patients held out as KID's real tiles when KID is measured (default: 0.2)",
    )
    quality = train.add_mutually_exclusive_group()
    quality.add_argument(
        "--kid-encoder", type=Path, metavar="FILE", help="KID in the feature space of a `wsi-dala pretrain` backbone"
    )
    quality.add_argument(
        "--kid-inception",
        type=Path,
        metavar="FILE",
        help="KID with torch-fidelity's InceptionV3 from this local weights-inception-2015-12-05-6726825d.pth "
        "(default: no KID)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    sample = sub.add_parser("sample", help="write generated tiles of one class as PNGs", formatter_class=Formatter)
    sample.add_argument("--model", required=True, type=Path, metavar="GAN", help="gan.safetensors of `gan train`")
    sample.add_argument("--class", dest="sample_class", required=True, metavar="NAME", help="class to generate")
    sample.add_argument("--n", type=number_in(1, 1e7, integer=True), default=500, help="tiles (default: 500)")
    sample.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the PNGs + synthetic.json")
    sample.add_argument(
        "--truncation", type=number_in(0, 1), default=1.0, help="ψ: 1 = full variety, lower = typical (default: 1)"
    )
    sample.add_argument("--seed", type=int, default=0, help="latent seed (default: 0)")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    for action in (train, sample):  # also after the action (`gan train ... -q`); SUPPRESS keeps `gan -q train`
        action.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log each stage")
        action.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def _gan(args: argparse.Namespace) -> int:
    return _train(args) if args.gan_command == "train" else _sample(args)


def _train(args: argparse.Namespace) -> int:
    from wsi_dala.core.layout import GanLayout
    from wsi_dala.gan.training import GanData, train_gan

    values: dict[str, Any] = {
        "resolution": args.resolution,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "r1_gamma": args.r1_gamma,
        "ada_target": args.ada_target,
        "ada_speed_images": args.ada_speed,
        "channel_max": args.channel_max,
        "checkpoint_every": args.checkpoint_every,
        "kid_every": args.kid_every,
        "kid_samples": args.kid_samples,
        "seed": args.seed,
        "device": args.device,
    }
    config = build(GanConfig, values, "gan train options")
    kid_features = _kid_features(args)  # a bad weights file fails before any slide is tiled
    samples, names, mpp, _note, source = load_samples(args, GanLayout(Path(args.out)).root / "tiles", args.resolution)
    mpp = args.mpp if args.mpp is not None and not args.slide else mpp
    trained = names
    if args.only_class is not None:
        if args.only_class not in names:
            raise ConfigError(f"--class {args.only_class!r} is not one of the classes in {source}: {', '.join(names)}")
        samples = [s for s in samples if s.label == names.index(args.only_class)]
        trained = [args.only_class]
    train, held_out = _hold_out(samples, args.kid_holdout if kid_features else 0.0, args.seed)
    data = GanData(train, held_out, names, trained, mpp, source)
    print(f"GAN on {len(train)} tiles of {', '.join(trained)} ({len(held_out)} held out for KID), {args.resolution} px")
    result = train_gan(config, data, Path(args.out), kid_features, progress=not args.quiet)
    if result.kid:
        print("KID by step: " + ", ".join(f"{step}: {value:.4f} ± {sd:.4f}" for step, value, sd in result.kid))
    print(f"checkpoint: {result.checkpoint}  ({result.images_per_s:.1f} generated images/s while training)")
    return 0


def _kid_features(args: argparse.Namespace) -> Any:
    from wsi_dala.gan.quality import encoder_features, inception_features

    if args.kid_encoder is not None:
        return encoder_features(args.kid_encoder)
    if args.kid_inception is not None:
        return inception_features(args.kid_inception)
    return None


def _hold_out(samples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Whole slides/patients held out for KID's real tiles (none when ``fraction`` is 0)."""
    if fraction <= 0:
        return samples, []
    from wsi_dala.training.splits import group_split

    train_idx, held_idx = group_split([s.label for s in samples], [s.group for s in samples], fraction, seed=seed)
    if len(held_idx) == 0 or len(train_idx) == 0:
        raise ConfigError(f"--kid-holdout {fraction}: the data has too few slides/patients to hold some out")
    return [samples[i] for i in train_idx], [samples[i] for i in held_idx]


def _sample(args: argparse.Namespace) -> int:
    from wsi_dala.gan.sampling import sample_tiles

    card_path = sample_tiles(args.model, args.sample_class, args.n, args.out, args.truncation, args.seed, args.device)
    print(f"{args.n} {args.sample_class} tiles in {args.out} (described by {card_path.name})")
    return 0


VERBS = (
    Verb(
        "gan",
        "class-conditional StyleGAN2 with adaptive augmentation: `gan train` on labelled tiles, `gan sample` tiles",
        _configure_gan,
        _gan,
    ),
)
