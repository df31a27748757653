"""CLI verb for learning without labels: ``pretrain`` (SimCLR on the archive's own tiles)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_dala.cli.architecture import add_architecture_options, architecture_options
from wsi_dala.cli.common import Verb, add_precision_option, number_in
from wsi_dala.core.config import PretrainConfig, build


def _configure_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder (backbone.safetensors, loss curve)")
    data = parser.add_argument_group("data (any mix; no labels needed)")
    data.add_argument(
        "--stores",
        nargs="+",
        default=[],
        type=Path,
        metavar="STORE",
        help="tile stores written by tile/run/batch: RUN/tiles.zarr or the RUN folder (default: none)",
    )
    data.add_argument("--archive", type=Path, metavar="DIR", help="every tiles.zarr below a `batch` output folder")
    data.add_argument(
        "--folder",
        action="append",
        default=[],
        type=Path,
        metavar="ROOT",
        help="images below ROOT (squares of one size; one slide per sub-folder); repeatable (default: none)",
    )
    data.add_argument(
        "--folder-mpp",
        type=number_in(0, 1000, low_open=True),
        metavar="UM",
        help="µm/px of the --folder images, for the card (default: the stores', or unknown)",
    )
    model = parser.add_argument_group("encoder")
    add_architecture_options(model)
    fit = parser.add_argument_group("SimCLR")
    fit.add_argument("--epochs", type=int, default=20, help="epochs (default: 20)")
    fit.add_argument("--batch-size", type=int, default=64, help="tiles per step, two views each (default: 64)")
    fit.add_argument(
        "--tiles-per-epoch",
        type=int,
        default=0,
        metavar="N",
        help="tiles drawn per epoch, every slide the same share (default: 0 = as many as there are tiles)",
    )
    fit.add_argument(
        "--lr", type=float, default=1e-3, metavar="RATE", help="AdamW learning rate, cosine decay (default: 1e-3)"
    )
    fit.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay (default: 1e-6)")
    fit.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (default: 0.2)")
    fit.add_argument("--projection-dim", type=int, default=128, help="projection head output (default: 128)")
    fit.add_argument(
        "--crop-fraction",
        type=float,
        default=0.75,
        help="view side / tile side; crops keep the tile's µm/px, never resized (default: 0.75)",
    )
    fit.add_argument(
        "--hed-jitter",
        type=float,
        nargs=2,
        default=(0.05, 0.05),
        metavar=("SCALE", "SHIFT"),
        help="stain jitter in HED space: each stain x U(1±SCALE) + U(±SHIFT) (default: 0.05 0.05)",
    )
    fit.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_precision_option(fit, "auto")
    fit.add_argument(
        "--workers", dest="loader_workers", type=int, default=0, help="data-loading processes (default: 0)"
    )


def _pretrain(args: argparse.Namespace) -> int:
    from wsi_dala.training.pretrain import pretrain
    from wsi_dala.training.unlabelled import unlabelled_set

    options, pretrained = architecture_options(args)
    if pretrained == "hub":  # a foundation model's own weights, fetched (and checked) before any tile is read
        from wsi_dala.interop.foundation_weights import fetch_foundation_weights
        from wsi_dala.model.foundation import check_weights
        from wsi_dala.model.foundation_presets import PRESETS

        path, _origin = fetch_foundation_weights(PRESETS[args.arch])
        check_weights(PRESETS[args.arch], options, path)
        pretrained = str(path)
    values = {
        "arch": args.arch,
        "options": options,
        "pretrained": pretrained,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "tiles_per_epoch": args.tiles_per_epoch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "temperature": args.temperature,
        "projection_dim": args.projection_dim,
        "crop_fraction": args.crop_fraction,
        "hed_scale": args.hed_jitter[0],
        "hed_shift": args.hed_jitter[1],
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "loader_workers": args.loader_workers,
    }
    config = build(PretrainConfig, values, "pretrain options")  # checked before any store is read
    data = unlabelled_set(args.stores, args.archive, args.folder, args.folder_mpp)
    mpp = f"{data.mpp:.3g} µm/px" if data.mpp is not None else "unknown µm/px"
    size = f"{data.tile_size_px} px ({mpp})"
    print(f"pre-training {config.arch} on {len(data.samples)} tiles of {size} from {data.n_groups} slides")
    result = pretrain(config, data, Path(args.out), progress=not args.quiet)
    last = result.losses[-1] if result.losses else float("nan")
    if result.collapsed:
        print(f"warning: loss at chance ({last:.3f}): the encoder collapsed; lower --lr or raise --temperature")
    print(f"backbone: {result.backbone}  (last step loss {last:.4f}; use it with `wsi-dala train --pretrained`)")
    return 0


VERBS = (
    Verb(
        "pretrain",
        "self-supervised contrastive pre-training (SimCLR, HED stain jitter) of a backbone on unlabelled tiles",
        _configure_pretrain,
        _pretrain,
    ),
)
