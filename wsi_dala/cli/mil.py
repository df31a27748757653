"""CLI verb ``mil``: ``mil train`` (gated attention MIL on slide labels and stored tile features) and
``mil evaluate`` (slide AUC, balanced accuracy, sensitivity at 95 % specificity, ECE, with bootstrap
intervals)."""

from __future__ import annotations

import argparse

from wsi_dala.cli.common import Formatter, Verb, number_in


def _configure_mil(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mil_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train ABMIL on slide labels and features stores", formatter_class=Formatter)
    _add_labels_and_features(train, required=True)
    train.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where mil.safetensors, oof_predictions.csv, slide_metrics.json, slide_roc.png and mil.json go",
    )
    train.add_argument(
        "--tumour-label",
        metavar="NAME",
        help="the label meaning tumour (default: the one label named tumour, tumor, malignant, cancer ...)",
    )
    train.add_argument(
        "--cv-folds", type=number_in(2, 20, integer=True), default=5, help="cross-validation folds, by slide"
    )
    train.add_argument("--epochs", type=number_in(1, 1000, integer=True), default=40, help="passes over the slides")
    train.add_argument("--lr", type=number_in(1e-7, 1, low_open=True), default=2e-4, metavar="RATE", help="Adam rate")
    train.add_argument("--hidden", type=number_in(8, 4096, integer=True), default=256, help="hidden width")
    train.add_argument(
        "--max-tiles", type=number_in(16, 1e6, integer=True), default=2048, help="tiles drawn per slide per step"
    )
    train.add_argument(
        "--feature",
        choices=("embedding", "token_mean"),
        default="embedding",
        help="the stores' rows to use: the encoder's embedding (its model card's rule), or the mean of its patch "
        "tokens (more informative for an encoder with random weights)",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="random seed of the folds, weights and tile draws (default: 0)"
    )

    evaluate = sub.add_parser(
        "evaluate", help="slide-level metrics with bootstrap intervals", formatter_class=Formatter
    )
    evaluate.add_argument(
        "--predictions",
        metavar="CSV",
        help="pooled predictions to judge, e.g. mil train's oof_predictions.csv (default: none; then --model)",
    )
    evaluate.add_argument("--model", metavar="FILE", help="a mil.safetensors to apply to --labels and --features")
    _add_labels_and_features(evaluate, required=False)
    evaluate.add_argument("--out", required=True, metavar="DIR", help="where slide_metrics.json and slide_roc.png go")


def _add_labels_and_features(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--labels",
        required=required,
        metavar="CSV",
        help="slide labels: columns slide,label[,split]; test rows are left out of training",
    )
    parser.add_argument(
        "--features",
        action="append",
        required=required,
        metavar="DIR",
        help="features stores (wsi-dala features --out), searched below this folder; repeatable",
    )


def _mil(args: argparse.Namespace) -> int:
    if args.mil_command == "train":
        return _train(args)
    return _evaluate(args)


def _train(args: argparse.Namespace) -> int:
    from wsi_dala.runs.mil import train_mil
    from wsi_dala.training.mil import MilSettings
    from wsi_dala.training.slide_metrics import metrics_lines

    settings = MilSettings(
        folds=args.cv_folds,
        epochs=args.epochs,
        lr=args.lr,
        hidden=args.hidden,
        max_tiles=args.max_tiles,
        seed=args.seed,
        feature=args.feature,
    )
    result = train_mil(args.labels, args.features, args.out, settings, args.tumour_label)
    print("out of fold, " + "\n".join(metrics_lines(result.metrics)))
    record = result.thresholds
    print(
        f"slide thresholds: tumour at p >= {record['tumour_at']:.3g}, no tumour below {record['no_tumour_below']:.3g}"
    )
    print(f"trained in {result.seconds:.1f} s; model: {result.layout.model}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from wsi_dala.runs.mil import evaluate_mil
    from wsi_dala.training.slide_metrics import metrics_lines

    metrics = evaluate_mil(args.out, args.predictions, args.model, args.labels, args.features)
    print("\n".join(metrics_lines(metrics)))
    print(f"metrics: {args.out}")
    return 0


VERBS = (
    Verb(
        "mil",
        "attention MIL from slide labels: `mil train` on stored tile features, `mil evaluate` with bootstrap intervals",
        _configure_mil,
        _mil,
    ),
)
