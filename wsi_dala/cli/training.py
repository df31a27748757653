"""CLI verbs for models: ``train``, ``evaluate``, ``calibrate``, ``cam``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from wsi_dala.cli.architecture import add_architecture_options, architecture_options
from wsi_dala.cli.common import Verb, add_precision_option, deprecated_flag, number_in
from wsi_dala.cli.labelled_data import add_data_options, load_samples
from wsi_dala.core.config import ThresholdMethod, TrainConfig, build
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import CalibrateLayout, EvalLayout, TrainLayout
from wsi_dala.model.foundation_presets import PRESETS
from wsi_dala.model.registry import (
    TIMM_PREFIX,
)
from wsi_dala.model.slide_thresholds import MEASURE_WORDS, RUN_MEASURES

if TYPE_CHECKING:
    from wsi_dala.model import ModelCard
    from wsi_dala.training.datasets import Sample


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoint, curves, metrics)")
    add_data_options(parser)
    parser.add_argument(
        "--synthetic",
        action="append",
        default=[],
        metavar="DIR[:RATIO]",
        help="generated tiles (with their synthetic.json, e.g. from `gan sample`) added to the training split of "
        "their class until it reaches RATIO x the largest class (default RATIO 0.5); never to validation; "
        "repeatable (default: none)",
    )
    _add_model_options(parser)
    _add_fit_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    add_architecture_options(model)
    model.add_argument(
        "--positive-class",
        default=None,
        metavar="NAME",
        help="class whose probability is the tumour probability (default: malignant/Tumor/last)",
    )


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    fit = parser.add_argument_group("training")
    fit.add_argument("--input-size", type=int, default=224, metavar="PX", help="input side (crops at native scale)")
    fit.add_argument("--epochs", type=int, default=20, help="maximum epochs")
    fit.add_argument("--batch-size", type=number_in(1, 1e6, integer=True), default=32, help="batch size")
    fit.add_argument(
        "--lr-backbone",
        type=float,
        default=None,
        metavar="RATE",
        help="AdamW learning rate of the backbone (default: 1e-4; 1e-3 for a CNN trained from scratch)",
    )
    fit.add_argument(
        "--lr-head", type=float, default=1e-3, metavar="RATE", help="AdamW learning rate of attention and head"
    )
    fit.add_argument(
        "--imbalance",
        default="cb-loss",
        choices=("cb-loss", "sampler", "none"),
        help="class-balanced loss (Cui et al.) or a weighted sampler, never both",
    )
    fit.add_argument("--beta", type=float, default=0.999, help="class-balanced loss β")
    fit.add_argument("--patience", type=int, default=5, help="early stopping: epochs without val-loss improvement")
    fit.add_argument(
        "--freeze-until",
        choices=("layer1", "layer2", "layer3"),
        default=None,
        help="freeze the backbone up to this layer, for faster CPU runs (default: train everything)",
    )
    fit.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="train only the linear head (a linear probe; timm:NAME, resnet18/34/50, densenet121, swin_t), on "
        "encoder features computed once per tile (centre crop, no augmentation) and cached in a Zarr; with few "
        "labels it keeps a `pretrain` backbone's features intact (default: train the encoder too)",
    )
    fit.add_argument(
        "--features",
        action="append",
        default=[],
        metavar="DIR",
        help="--freeze-backbone: read the training tiles' encoder features from the features stores in DIR "
        "(`wsi-dala features`, or an earlier training's OUT/tiles; same encoder and weights) instead of running "
        "the encoder, which otherwise computes them once into OUT/tiles/<slide>/features.zarr; repeatable "
        "(default: none)",
    )
    fit.add_argument(
        "--feature-cache",
        metavar="DIR",
        default=None,
        help="--freeze-backbone on image folders: where their cached features go, shared by runs on the same "
        "images; slide tiles keep theirs beside their tiles (default: OUT/features)",
    )
    guide = parser.add_argument_group("guidance (Deep Pneumonia)")
    guide.add_argument(
        "--mask-guided",
        action="store_true",
        help="with --slide: the lesion outlines of the positive class guide training, by hard attention and "
        "attention supervision (default: off)",
    )
    guide.add_argument(
        "--hard-attention-floor",
        type=number_in(0, 1),
        default=0.1,
        metavar="F",
        help="--mask-guided: features of lesion tiles outside the lesion are multiplied by F (1: no hard "
        "attention) (default: 0.1)",
    )
    guide.add_argument(
        "--attention-loss-weight",
        type=number_in(0, 100),
        default=0.5,
        metavar="W",
        help="--mask-guided: weight of the BCE pulling the attention gate (or the CAM) toward the lesion mask "
        "(0: off) (default: 0.5)",
    )
    guide.add_argument(
        "--contrastive-weight",
        type=number_in(0, 100),
        default=0.0,
        metavar="W",
        help="weight of a supervised-contrastive term on the pooled features of each batch (default: 0, off)",
    )
    guide.add_argument(
        "--contrastive-temperature",
        type=number_in(0.001, 10),
        default=0.1,
        metavar="T",
        help="temperature of the supervised-contrastive term (default: 0.1)",
    )
    fit.add_argument(
        "--precise-bn-batches",
        type=int,
        default=0,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training batches before each validation "
        "(helps short runs from scratch; 0: off)",
    )
    fit.add_argument(
        "--val-fraction",
        type=number_in(0, 1, low_open=True, high_open=True),
        default=0.2,
        help="share of patients/slides for validation",
    )
    fit.add_argument("--fold", metavar="DSFOLD.txt", help="BreakHis fold file: its train/test split instead")
    fit.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation, augmentation)")
    fit.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    add_precision_option(fit, default="auto")
    deprecated_flag(fit, "--no-amp", "--precision fp32", dest="precision", nargs=0, const="fp32")
    fit.add_argument("--loader-workers", type=int, default=0, metavar="N", help="data-loading processes")
    deprecated_flag(fit, "--workers", "--loader-workers", dest="loader_workers", type=int)
    fit.add_argument(
        "--stain-normalise",
        choices=("none", "macenko", "reinhard"),
        default="none",
        help="map training batches from the training images' stain to the published H&E reference, which the "
        "model card records; `run --stain-normalise` then maps slides to it (default: none)",
    )


def _positive_class(names: list[str], requested: str | None) -> str:
    if requested:
        if requested not in names:
            raise ConfigError(f"--positive-class {requested!r} is not one of the classes {names}")
        return requested
    for candidate in ("malignant", "Tumor", "tumor", "Tumour", "tumour"):
        if candidate in names:
            return candidate
    return names[-1]


def _split(args: argparse.Namespace, samples: list[Sample], source: str) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples: a BreakHis fold file's split, or a split by patient/slide."""
    from wsi_dala.training.splits import group_split, read_breakhis_fold

    if args.fold:
        split = read_breakhis_fold(args.fold)
        train = [s for s in samples if split.get(Path(s.source).name) == "train"]
        val = [s for s in samples if split.get(Path(s.source).name) == "test"]
    else:
        train_idx, val_idx = group_split(
            [s.label for s in samples], [s.group for s in samples], args.val_fraction, args.seed
        )
        train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    if not train or not val:
        raise ConfigError(f"{source}: the split left {len(train)} training and {len(val)} validation images")
    return train, val


def _encoder_weights(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """An encoder's weights fetched (``--weights hub``) and checked against the network before any data is
    read; with where they came from, for the card."""
    origin = None
    if config.pretrained == "hub":
        from wsi_dala.interop.foundation_weights import fetch_foundation_weights

        path, origin = fetch_foundation_weights(PRESETS[config.arch])
        config = config.model_copy(update={"pretrained": str(path)})
    if config.arch in PRESETS and config.pretrained != "none":
        from wsi_dala.model.foundation import check_weights

        check_weights(PRESETS[config.arch], config.options, Path(config.pretrained))
    elif config.arch.startswith(TIMM_PREFIX) and config.pretrained != "none":
        from wsi_dala.model.encoder import check_encoder_weights

        check_encoder_weights(config.arch, config.options, Path(config.pretrained), config.input_size)
    return config, origin


def _train_config(args: argparse.Namespace) -> TrainConfig:
    options, pretrained = architecture_options(args)
    if args.feature_cache and not args.freeze_backbone:
        raise ConfigError("--feature-cache applies to --freeze-backbone only")
    values = {
        "arch": args.arch,
        "options": options,
        "pretrained": pretrained,
        "input_size": args.input_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr_backbone": args.lr_backbone,
        "lr_head": args.lr_head,
        "imbalance": args.imbalance,
        "beta": args.beta,
        "patience": args.patience,
        "seed": args.seed,
        "freeze_until": args.freeze_until,
        "freeze_backbone": args.freeze_backbone,
        "features": args.features,
        "device": args.device,
        "precision": args.precision,
        "precise_bn_batches": args.precise_bn_batches,
        "loader_workers": args.loader_workers,
        "stain_normalise": args.stain_normalise,
        "mask_guided": args.mask_guided,
        "hard_attention_floor": args.hard_attention_floor,
        "attention_loss_weight": args.attention_loss_weight,
        "contrastive_weight": args.contrastive_weight,
        "contrastive_temperature": args.contrastive_temperature,
    }
    if args.mask_guided and not args.slide:
        raise ConfigError(
            "--mask-guided needs slides annotated in QuPath (--slide S.svs=S.geojson): the lesion masks come "
            "from their polygons"
        )
    return build(TrainConfig, values, "command line")


def _card_fields(
    args: argparse.Namespace,
    names: list[str],
    train: list[Sample],
    val: list[Sample],
    mpp_note: tuple[Any, str],
    source: str,
) -> dict[str, Any]:
    """What the model card records about the data (µm/px and where it comes from, counts, split)."""
    from wsi_dala.training.datasets import class_counts

    given = args.mpp is not None and not args.slide  # --slide: the tiler's measured µm/px, not the target
    mpp, note = (args.mpp, "given with --mpp") if given else mpp_note
    return {
        "mpp": mpp,
        "mpp_note": note,
        "training_data": {
            "source": source,
            "split": "dataset fold file" if args.fold else f"by patient/slide, seed {args.seed}",
            "counts_train": dict(zip(names, class_counts(train, len(names)), strict=False)),
            "counts_val": dict(zip(names, class_counts(val, len(names)), strict=False)),
            "groups_train": len({s.group for s in train}),
            "groups_val": len({s.group for s in val}),
        },
    }


def _calibration_line(card: ModelCard) -> str:
    """What training says about the temperature it fitted (or why it fitted none)."""
    record = card.calibration
    if card.temperature is None:
        return f"uncalibrated (T = 1): {record.get('skipped', 'no temperature in the model card')}"
    before, after = record.get("before", {}), record.get("after", {})
    return (
        f"temperature {card.temperature:.4g} (fitted on {record.get('n_tiles')} validation tiles): "
        f"ECE {before.get('ece', float('nan')):.4f} -> {after.get('ece', float('nan')):.4f}"
    )


def _train(args: argparse.Namespace) -> int:
    from wsi_dala.model import read_card
    from wsi_dala.training.metrics import format_table
    from wsi_dala.training.train import train_model

    config = _train_config(args)  # every setting checked before any data is read
    config, encoder_origin = _encoder_weights(config)
    from wsi_dala.training.synthetic_tiles import mix_synthetic, parse_synthetic_argument

    synthetic = [parse_synthetic_argument(text) for text in args.synthetic]  # a bad RATIO before any data is read
    layout = TrainLayout(Path(args.out))
    samples, names, mpp, note, source = load_samples(args, layout.tiles_dir, args.input_size)
    train, val = _split(args, samples, source)
    card_fields = _card_fields(args, names, train, val, (mpp, note), source)
    if encoder_origin is not None:
        card_fields["training_data"]["encoder_origin"] = encoder_origin
    print(
        f"training on {len(train)} images ({card_fields['training_data']['groups_train']} groups), validating on "
        f"{len(val)} ({card_fields['training_data']['groups_val']} groups); classes {names}"
    )
    positive = _positive_class(names, args.positive_class)
    if config.mask_guided:
        from wsi_dala.training.lesion_masks import attach_lesion_masks
        from wsi_dala.training.slide_tiles import parse_slide_argument

        slides = [parse_slide_argument(text) for text in args.slide]
        train = attach_lesion_masks(train, slides, positive)
    if synthetic:
        train, mixed = mix_synthetic(train, names, synthetic, card_fields["mpp"], args.input_size, args.seed)
        card_fields["training_data"]["synthetic"] = mixed
        print("synthetic: " + "; ".join(f"{m['added']} {m['class']} tiles from {m['folder']}" for m in mixed))
    result = train_model(
        train,
        val,
        names,
        positive,
        config,
        layout.root,
        card_fields,
        progress=not args.quiet,
        feature_cache_dir=Path(args.feature_cache) if args.feature_cache else None,
    )
    print(format_table(result.best_metrics, f"best epoch {result.best_epoch} (validation)"))
    print(_calibration_line(read_card(result.checkpoint)))
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CKPT", help="a .safetensors checkpoint")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="where metrics.json, confusion and reliability PNGs go"
    )
    _add_held_out_options(parser)


def _add_held_out_options(parser: argparse.ArgumentParser) -> None:
    """What `evaluate` and `calibrate` share: which labelled tiles, and how to run the model over them."""
    parser.add_argument(
        "--split-from",
        metavar="TRAIN_DIR",
        help="use only the images that this training run held out for validation (default: all of the data)",
    )
    parser.add_argument("--batch-size", type=number_in(1, 1e6, integer=True), default=32, help="batch size")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda ...")
    add_precision_option(parser, default="auto")
    add_data_options(parser)


def _held_out_samples(
    args: argparse.Namespace, tiles_dir: Path, input_size: int
) -> tuple[list[Sample], list[str], str]:
    """The labelled images of the data options, narrowed to a training run's validation groups with
    ``--split-from``; (samples, class names, what they are)."""
    from wsi_dala.training.train import read_validation_groups

    samples, names, _, _, source = load_samples(args, tiles_dir, input_size)
    if args.split_from:
        held_out = set(read_validation_groups(args.split_from))
        samples = [s for s in samples if s.group in held_out]
        if not samples:
            raise ConfigError(f"{args.split_from}: none of its validation patients/slides are in this data")
        source += f", validation groups of {args.split_from}"
    return samples, names, source


def _evaluate(args: argparse.Namespace) -> int:
    from wsi_dala.model import read_card
    from wsi_dala.training.evaluate import evaluate_checkpoint

    card = read_card(args.model)
    layout = EvalLayout(Path(args.out))
    samples, names, _ = _held_out_samples(args, layout.tiles_dir, card.tile_size_px)
    _, table = evaluate_checkpoint(
        args.model,
        samples,
        names,
        layout.root,
        args.batch_size,
        args.device,
        precision=args.precision,
        progress=not args.quiet,
    )
    print(table)
    print(f"metrics: {layout.metrics_json}")
    return 0


def _configure_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CKPT", help="a .safetensors checkpoint; never modified")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where calibrated.safetensors (same weights, card with temperature and CAM profile), "
        "calibration.json and reliability.png go (with --slide-labels: slide_thresholds.json and .png)",
    )
    parser.add_argument(
        "--slide-labels",
        metavar="CSV",
        help="fit slide-level thresholds instead of the temperature: a CSV of slide,label (the model's class "
        "names), one row per slide, each slide run with this model in --runs (default: none)",
    )
    parser.add_argument(
        "--runs",
        action="append",
        metavar="DIR",
        help="with --slide-labels: a batch output or run folders holding those slides' runs; repeatable",
    )
    parser.add_argument(
        "--slide-measure",
        default="auto",
        choices=("auto", *RUN_MEASURES),
        help="with --slide-labels: what the thresholds apply to; auto picks the one with the best slide AUC",
    )
    _add_held_out_options(parser)


def _calibrate(args: argparse.Namespace) -> int:
    from wsi_dala.model import read_card
    from wsi_dala.training.calibrate import summary_lines
    from wsi_dala.training.evaluate import calibrate_checkpoint

    if args.slide_labels:
        return _calibrate_slides(args)
    if args.runs:
        raise ConfigError("--runs: goes with --slide-labels (slide thresholds), not with tile calibration")
    card = read_card(args.model)
    layout = CalibrateLayout(Path(args.out))
    samples, names, source = _held_out_samples(args, layout.tiles_dir, card.tile_size_px)
    calibration, profile = calibrate_checkpoint(
        args.model,
        samples,
        names,
        layout.root,
        source,
        args.batch_size,
        args.device,
        precision=args.precision,
        progress=not args.quiet,
    )
    print("\n".join(summary_lines(calibration, profile)))
    print(f"checkpoint: {layout.checkpoint}")
    return 0


def _calibrate_slides(args: argparse.Namespace) -> int:
    from wsi_dala.runs.slide_calibration import calibrate_slides

    if any(getattr(args, name, None) for name in ("breakhis", "folder", "slide", "split_from")):
        raise ConfigError("--slide-labels fits slide thresholds from runs: give no tile data with it")
    if not args.runs:
        raise ConfigError("--slide-labels: give --runs DIR, the runs of those slides made with this model")
    layout = CalibrateLayout(Path(args.out))
    record = calibrate_slides(args.model, args.slide_labels, args.runs, layout.root, args.slide_measure)
    print(
        f"slide thresholds on {MEASURE_WORDS[record['measure']]} (slide AUC {record['auc']:.3f}, "
        f"{record['slides']} slides, {record['tumour_slides']} with tumour): tumour at >= {record['tumour_at']:.4g}, "
        f"no tumour below {record['no_tumour_below']:.4g}"
    )
    print(
        f"on those slides: specificity {record['specificity']:.3f}, sensitivity {record['sensitivity']:.3f}, "
        f"{100 * record['indeterminate_share']:.0f} % indeterminate"
    )
    print(f"checkpoint: {layout.checkpoint}")
    return 0


def _configure_export_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a .safetensors checkpoint written by wsi-dala train")
    parser.add_argument(
        "--format",
        required=True,
        choices=("wsinfer", "onnx"),
        help="wsinfer: torchscript_model.pt + config.json (wsinfer-zoo spec 1.0) for `wsinfer run` and QuPath's "
        "WSInfer extension; onnx: model.onnx, RGB in [0, 1] NCHW in, class probabilities out",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created if missing)")


def _export_model(args: argparse.Namespace) -> int:
    from wsi_dala.interop.model_export import describe, export_model

    print(describe(export_model(args.checkpoint, args.out, args.format)))
    return 0


def _configure_cam(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (tiles)")
    parser.add_argument("--model", required=True, metavar="CKPT", help="a .safetensors checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the side-by-side PNGs go")
    methods = get_args(ThresholdMethod)
    parser.add_argument("--threshold-method", default="mean_std", choices=methods, help="dynamic threshold")
    deprecated_flag(parser, "--threshold", "--threshold-method", dest="threshold_method", choices=methods)
    parser.add_argument("--k", type=number_in(-10, 10), default=1.0, help="mean_std: τ = mean + k·std")
    parser.add_argument("--percentile", type=number_in(0, 100), default=80.0, help="percentile: τ = this percentile")


def _cam(args: argparse.Namespace) -> int:
    from wsi_dala.explain.figures import write_cam_figures
    from wsi_dala.explain.threshold import CamSettings

    settings = CamSettings(method=args.threshold_method, k=args.k, percentile=args.percentile)
    written = write_cam_figures([Path(p) for p in args.images], Path(args.model), Path(args.out), settings)
    for path, probability, tau in written:
        print(f"{path}  tumour probability {probability:.4f}  τ {tau:.3f}")
    return 0


VERBS = (
    Verb(
        "train",
        "fine-tune DALAResNet50 (or a baseline) on BreakHis, image folders or annotated slides",
        _configure_train,
        _train,
    ),
    Verb(
        "evaluate",
        "accuracy, precision, recall, F1, GMean, IBA and ROC AUC of a checkpoint",
        _configure_evaluate,
        _evaluate,
    ),
    Verb(
        "calibrate",
        "fit a checkpoint's temperature (and Grad-CAM profile) on labelled data; writes a new checkpoint",
        _configure_calibrate,
        _calibrate,
    ),
    Verb("cam", "DT Grad-CAM figures: image | Grad-CAM | DT Grad-CAM, side by side", _configure_cam, _cam),
    Verb(
        "export-model",
        "write a checkpoint for other tools: WSInfer / QuPath's WSInfer extension, or ONNX",
        _configure_export_model,
        _export_model,
    ),
)
