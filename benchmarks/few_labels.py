"""Learning from few and imbalanced labels: training from scratch against training after `wsi-dala
pretrain` on the unlabelled tiles of other slides.

    python benchmarks/few_labels.py [--seeds 0 1 2] [--fractions 0.05 0.2 1.0] [--arch resnet18]

Generated slides (``wsi_dala.synthetic``), tumour drawn as QuPath annotations, 64 px tiles at 1 µm/px:

- unlabelled: every tile of ``--unlabelled-slides`` other slides, tiled by `wsi-dala tile`; `wsi-dala
  pretrain` (SimCLR, HED jitter) runs on them once per seed, from random weights (nothing is downloaded);
- labelled pool: the tiles of four annotated slides, tumour thinned to 1 tumour per 10 normal tiles;
  each label fraction keeps that share of the pool (stratified, at least 2 tumour tiles) for training;
- validation (best epoch, temperature): one more annotated slide at the same 1:10; test: two held-out
  annotated slides, all their tiles;
- the same training recipe from random weights (a) and from the pre-trained backbone (b), the same
  number of optimiser steps at every fraction (epochs = steps x batch / tiles).

Prints balanced accuracy and minority (tumour) recall on the test slides, means ± SD over seeds, the
pre-training images/s and the margin (b) - (a) per fraction with its spread over seeds. GAN tiles (c, d:
`gan train` on each fraction's tiles, `gan sample`, `train --synthetic`) are not in this table yet; KID
over GAN training is `benchmarks/gan.py`. Prints the CPU flags; compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tissue import cpu_flags

from tests.test_slide_training import _write_qupath_annotations
from wsi_dala.cli import main
from wsi_dala.config import TilingConfig, TrainConfig
from wsi_dala.model import load_checkpoint
from wsi_dala.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.datasets import Sample
from wsi_dala.training.loaders import make_loader
from wsi_dala.training.metrics import classification_metrics
from wsi_dala.training.predict import predict
from wsi_dala.training.slide_tiles import AnnotatedSlide, annotated_slide_samples
from wsi_dala.training.train import train_model

TILE_PX, MPP = 64, 1.0
IMBALANCE = 10  # normal tiles per tumour tile in the labelled pool and validation


def slide_spec(seed: int) -> SyntheticSlideSpec:
    return SyntheticSlideSpec(width=6144, height=4608, mpp=0.25, seed=seed, tumour_regions=4)


def annotated(folder: Path, seeds: list[int]) -> list[AnnotatedSlide]:
    slides = []
    for seed in seeds:
        slide = write_synthetic_slide(folder / f"case{seed}.svs", slide_spec(seed))
        slides.append(AnnotatedSlide(slide.path, _write_qupath_annotations(slide, folder / f"case{seed}.geojson")))
    return slides


def unlabelled_stores(folder: Path, seeds: list[int]) -> list[Path]:
    runs = []
    for seed in seeds:
        slide = write_synthetic_slide(folder / f"archive{seed}.svs", slide_spec(seed)).path
        run = folder / f"run{seed}"
        if main(["tile", str(slide), "--out", str(run), "--mpp", str(MPP), "--tile-size", str(TILE_PX), "-q"]) != 0:
            raise SystemExit(f"tiling failed: {slide}")
        runs.append(run)
    return runs


def imbalanced(samples: list[Sample], positive: int, rng: np.random.Generator) -> list[Sample]:
    """All normal tiles and one tumour tile per ``IMBALANCE`` of them."""
    tumour = [s for s in samples if s.label == positive]
    normal = [s for s in samples if s.label != positive]
    keep = max(2, len(normal) // IMBALANCE)
    chosen = rng.choice(len(tumour), size=min(keep, len(tumour)), replace=False)
    return normal + [tumour[i] for i in sorted(chosen)]


def fraction_of(samples: list[Sample], fraction: float, positive: int, rng: np.random.Generator) -> list[Sample]:
    """A stratified share of the pool, with at least two tiles of each class."""
    picked = []
    for positive_class in (True, False):
        group = [s for s in samples if (s.label == positive) == positive_class]
        n = min(len(group), max(2, round(fraction * len(group))))
        picked += [group[i] for i in sorted(rng.choice(len(group), size=n, replace=False))]
    return picked


def test_metrics(checkpoint: Path, samples: list[Sample], names: list[str]) -> dict[str, float]:
    model, card = load_checkpoint(checkpoint)
    loader = make_loader(samples, input_size=TILE_PX, batch_size=64, train=False, n_classes=len(names))
    mean, std = card.normalisation["mean"], card.normalisation["std"]
    result = predict(model, loader, torch.device("cpu"), mean, std, "auto")
    predicted = result.probabilities.argmax(1)
    metrics = classification_metrics(result.labels, predicted, names, card.positive_index, result.probabilities)
    return {"balanced_accuracy": metrics["balanced_accuracy"], "tumour_recall": metrics["binary"]["recall"]}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 1.0], help="label fractions")
    parser.add_argument("--arch", default="resnet18", help="architecture (default: resnet18, CPU-sized)")
    parser.add_argument("--unlabelled-slides", type=int, default=6, help="slides to pre-train on (default: 6)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="SimCLR epochs (default: 15)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning optimiser steps (default: 60)")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (default: 32)")
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads; arch {args.arch}")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        slides = annotated(root / "slides", list(range(301, 308)))
        pool_slides, val_slides, test_slides = slides[:4], slides[4:5], slides[5:]
        tiling = TilingConfig(mpp=MPP, tile_size_px=TILE_PX)
        kwargs = {"unannotated_class": "Normal", "progress": False}
        pool, names, _ = annotated_slide_samples(pool_slides, root / "pool", tiling, **kwargs)
        val, _, _ = annotated_slide_samples(val_slides, root / "val", tiling, **kwargs)
        test, _, _ = annotated_slide_samples(test_slides, root / "test", tiling, **kwargs)
        positive = names.index("Tumor")
        stores = unlabelled_stores(root / "archive", list(range(401, 401 + args.unlabelled_slides)))
        results: dict[tuple[str, float], list[dict[str, float]]] = {}
        pretrain_rates = []
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            labelled = imbalanced(pool, positive, rng)
            val_seed = imbalanced(val, positive, rng)
            backbone_dir = root / f"pretrain-{seed}"
            argv = ["pretrain", "--stores", *map(str, stores), "--out", str(backbone_dir), "--arch", args.arch]
            argv += ["--pretrained", "none", "--epochs", str(args.pretrain_epochs), "--seed", str(seed), "-q"]
            if main(argv) != 0:
                raise SystemExit("pre-training failed")
            summary = json.loads((backbone_dir / "pretrain.json").read_text())
            pretrain_rates.append(2 * summary["tiles_per_s_this_invocation"])  # two views per tile
            print(
                f"seed {seed}: pre-trained on {summary['card']['data']['tiles']} tiles, loss "
                f"{summary['card']['final_epoch_loss']}, {pretrain_rates[-1]:.1f} images/s"
            )
            for fraction in args.fractions:
                train = fraction_of(labelled, fraction, positive, rng)
                epochs = max(1, math.ceil(args.steps * args.batch_size / len(train)))
                n_tumour = sum(s.label == positive for s in train)
                for start, weights in (("scratch", "none"), ("pretrained", str(backbone_dir / "backbone.safetensors"))):
                    config = TrainConfig(
                        arch=args.arch,
                        pretrained=weights,
                        input_size=TILE_PX,
                        epochs=epochs,
                        patience=epochs,
                        batch_size=args.batch_size,
                        lr_backbone=1e-3,
                        seed=seed,
                        precise_bn_batches=8,
                    )
                    out = root / "runs" / f"{start}-{fraction}-{seed}"
                    started = time.perf_counter()
                    result = train_model(train, val_seed, names, "Tumor", config, out, {"mpp": MPP}, progress=False)
                    row = test_metrics(result.checkpoint, test, names)
                    results.setdefault((start, fraction), []).append(row)
                    print(
                        f"  {start:<10} {fraction:>4.0%} labels ({len(train)} tiles, {n_tumour} tumour, {epochs} "
                        f"epochs, {time.perf_counter() - started:.0f} s): balanced accuracy "
                        f"{row['balanced_accuracy']:.3f}, tumour recall {row['tumour_recall']:.3f}"
                    )
        print(
            f"\npre-training: {np.mean(pretrain_rates):.1f} images/s ({args.arch}, {TILE_PX} px tiles, views "
            f"{round(0.75 * TILE_PX)} px); test: {len(test)} tiles of {len(test_slides)} held-out slides"
        )
        print("\n| start | labels | balanced accuracy | tumour recall |")
        print("|---|---|---|---|")
        for (start, fraction), rows in results.items():
            ba = np.array([r["balanced_accuracy"] for r in rows])
            recall = np.array([r["tumour_recall"] for r in rows])
            print(
                f"| {start} | {fraction:.0%} | {ba.mean():.3f} ± {ba.std():.3f} | "
                f"{recall.mean():.3f} ± {recall.std():.3f} |"
            )
        print("\nmargin (pretrained - scratch), balanced accuracy, per seed:")
        for fraction in args.fractions:
            margins = [
                b["balanced_accuracy"] - a["balanced_accuracy"]
                for a, b in zip(results[("scratch", fraction)], results[("pretrained", fraction)], strict=True)
            ]
            print(
                f"  {fraction:.0%}: {np.mean(margins):+.3f} ± {np.std(margins):.3f}  "
                f"({', '.join(f'{m:+.3f}' for m in margins)})"
            )


if __name__ == "__main__":
    main_benchmark()
