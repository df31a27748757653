"""Learning from few and imbalanced labels: training from scratch, after `wsi-dala pretrain` on the
unlabelled tiles of other slides, with GAN-made tumour tiles, and both.

    python benchmarks/few_labels.py [--seeds 0 1 2] [--fractions 0.05 0.2 1.0] [--gan-steps 300]
        [--mpp 0.5] [--other-stains pale dark]

Generated slides (``wsi_dala.slides.synthetic``), tumour drawn as QuPath annotations, 64 px tiles at ``--mpp``
(default 1 µm/px, where the generator's tiles are flat colour; at 0.5 µm/px they show its nuclei, denser
in tumour). Every slide spans the same area, so each µm/px gives the same number of tiles:

- unlabelled: every tile of ``--unlabelled-slides`` other slides, tiled by `wsi-dala tile`; `wsi-dala
  pretrain` (SimCLR, HED jitter) runs on them once per seed, from random weights (nothing is downloaded);
- labelled pool: the tiles of four annotated slides, tumour thinned to 1 tumour per 10 normal tiles;
  each label fraction keeps that share of the pool (stratified, at least 2 tumour tiles) for training;
- GAN tiles: per seed and fraction, the GAN (`gan train --class Tumor`'s code) learns that split's
  tumour tiles only, and `gan sample` writes as many as bring tumour to half of normal; they join the
  training split as `train --synthetic DIR` does (``mix_synthetic``). KID against the test slides'
  tumour tiles, in the seed's pre-trained encoder's features;
- validation (best epoch, temperature, and the backbone learning rate of ``--lr-backbone``): one more
  annotated slide at the same 1:10; test: two held-out annotated slides, all their tiles;
- stains: labelled, validation and test slides in ``--stains``; with ``--other-stains``, a second test
  set of two slides in those stains (another lab's staining), and the unlabelled slides span both, as
  an archive that already holds the other lab's slides would;
- rows (a) scratch, (b) pre-trained, (c) scratch + GAN tiles, (d) pre-trained + GAN tiles, each the
  same number of optimiser steps at every fraction, every layer trained; (e) pre-trained and frozen:
  only the linear head trains, on the backbone's cached features (`train --freeze-backbone`, a linear
  probe), at the head learning rate of ``--lr-probe`` that the validation slide picks.

Prints balanced accuracy and minority (tumour) recall on each test set, means ± SD over seeds, each
row's margin over (a) with its spread over seeds, pre-training and GAN images/s, and KID. Prints the CPU
flags; compare within one run only.
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
from wsi_dala.core.config import GanConfig, TilingConfig, TrainConfig
from wsi_dala.gan.quality import encoder_features
from wsi_dala.gan.sampling import sample_tiles
from wsi_dala.gan.training import GanData, train_gan
from wsi_dala.model import load_checkpoint
from wsi_dala.slides.synthetic import STAIN_NAMES, SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.datasets import Sample
from wsi_dala.training.loaders import make_loader
from wsi_dala.training.metrics import classification_metrics
from wsi_dala.training.predict import predict
from wsi_dala.training.slide_tiles import AnnotatedSlide, annotated_slide_samples
from wsi_dala.training.synthetic_tiles import SyntheticSource, mix_synthetic
from wsi_dala.training.train import train_model

TILE_PX = 64
SLIDE_UM = (1536, 1152)  # every slide's size: a 24 x 18 grid of 64 px tiles at 1 µm/px, whatever --mpp
IMBALANCE = 10  # normal tiles per tumour tile in the labelled pool and validation


def slide_spec(seed: int, stain: str, mpp: float) -> SyntheticSlideSpec:
    """A 0.25 µm/px slide of ``SLIDE_UM / mpp`` tiles' worth of pixels: the same number of tiles at any
    tile µm/px. Tiles at 1 µm/px and coarser are read from the generator's level 1, where its nuclei are
    averaged into flat colour; finer tiles are resized from level 0, where tumour is denser nuclei."""
    width, height = (round(4 * side * mpp) for side in SLIDE_UM)
    return SyntheticSlideSpec(width=width, height=height, mpp=0.25, seed=seed, tumour_regions=4, stain=stain)


def annotated(folder: Path, seeds: list[int], stains: list[str], mpp: float) -> list[AnnotatedSlide]:
    """Slide ``i`` is stained ``stains[i % len(stains)]``."""
    slides = []
    for i, seed in enumerate(seeds):
        slide = write_synthetic_slide(folder / f"case{seed}.svs", slide_spec(seed, stains[i % len(stains)], mpp))
        slides.append(AnnotatedSlide(slide.path, _write_qupath_annotations(slide, folder / f"case{seed}.geojson")))
    return slides


def unlabelled_stores(folder: Path, seeds: list[int], stains: list[str], mpp: float) -> list[Path]:
    runs = []
    for i, seed in enumerate(seeds):
        spec = slide_spec(seed, stains[i % len(stains)], mpp)
        slide = write_synthetic_slide(folder / f"archive{seed}.svs", spec).path
        run = folder / f"run{seed}"
        if main(["tile", str(slide), "--out", str(run), "--mpp", str(mpp), "--tile-size", str(TILE_PX), "-q"]) != 0:
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


STARTS = {  # row: (pre-trained backbone, GAN tiles, frozen backbone: a linear probe)
    "a scratch": (False, False, False),
    "b pretrained": (True, False, False),
    "c scratch + GAN": (False, True, False),
    "d pretrained + GAN": (True, True, False),
    "e pretrained, frozen": (True, False, True),
}


def pretrain(stores: list[Path], out: Path, args: argparse.Namespace, seed: int) -> float:
    """`wsi-dala pretrain` on the unlabelled stores; returns images/s (two views per tile)."""
    argv = ["pretrain", "--stores", *map(str, stores), "--out", str(out), "--arch", args.arch, "--pretrained", "none"]
    argv += ["--epochs", str(args.pretrain_epochs), "--lr", str(args.pretrain_lr), "--seed", str(seed), "-q"]
    if main(argv) != 0:
        raise SystemExit("pre-training failed")
    summary = json.loads((out / "pretrain.json").read_text())
    rate = 2 * summary["tiles_per_s_this_invocation"]
    card = summary["card"]
    state = " (COLLAPSED)" if card.get("collapsed") else ""
    print(
        f"seed {seed}: pre-trained on {card['data']['tiles']} tiles, loss {card['final_epoch_loss']}{state}, "
        f"{rate:.1f} images/s"
    )
    return rate


def gan_tiles(
    train: list[Sample],
    test: list[Sample],
    names: list[str],
    out: Path,
    encoder: Path,
    args: argparse.Namespace,
    seed: int,
) -> tuple[Path, float, float]:
    """`gan train` on the tumour tiles of this split, then `gan sample` as many as bring tumour to half of
    normal; returns the folder, KID against the test slides' tumour tiles, and generated images/s."""
    positive = names.index("Tumor")
    tumour = [s for s in train if s.label == positive]
    held_out = [s for s in test if s.label == positive]
    config = GanConfig(
        resolution=TILE_PX,
        steps=args.gan_steps,
        channel_max=args.gan_channel_max,
        ada_speed_images=args.gan_ada_speed,
        checkpoint_every=args.gan_steps,
        kid_samples=200,
        seed=seed,
        device="cpu",
    )
    data = GanData(tumour, held_out, names, ["Tumor"], args.mpp, f"few_labels seed {seed}: {len(tumour)} tumour tiles")
    result = train_gan(config, data, out / "gan", encoder_features(encoder), progress=False)
    wanted = max(1, round(0.5 * (len(train) - len(tumour))) - len(tumour))
    folder = out / "tiles"
    sample_tiles(result.checkpoint, "Tumor", wanted, folder, truncation=1.0, seed=seed, device_name="cpu")
    return folder, result.kid[-1][1], result.images_per_s


def fit(
    train: list[Sample],
    val: list[Sample],
    names: list[str],
    weights: str,
    frozen: bool,
    out: Path,
    args: argparse.Namespace,
    seed: int,
) -> tuple[Path, float, float, float]:
    """Train once per backbone learning rate of ``--lr-backbone`` (``frozen``: per head learning rate of
    ``--lr-probe``, the backbone fixed); keep the run that the validation slide prefers (balanced
    accuracy, then loss). Returns its checkpoint, its lr, the passes over the split and the seconds taken."""
    best: tuple[float, float, Path, float] | None = None
    started = time.perf_counter()
    # Small splits are repeated so that an epoch is about ``--epoch-steps`` steps at every fraction: the
    # validation slide is scored once per epoch, and 50 validations of a 37-tile split would cost more
    # than its training.
    passes = args.steps * args.batch_size / len(train)
    train = train * max(1, round(args.epoch_steps * args.batch_size / len(train)))
    epochs = max(1, math.ceil(args.steps * args.batch_size / len(train)))
    for lr in args.lr_probe if frozen else args.lr_backbone:
        config = TrainConfig(
            arch=args.arch,
            pretrained=weights,
            input_size=TILE_PX,
            epochs=epochs,
            patience=epochs,
            batch_size=args.batch_size,
            lr_backbone=lr,
            lr_head=lr if frozen else 1e-3,
            seed=seed,
            precise_bn_batches=0 if frozen else 8,
            freeze_backbone=frozen,
        )
        result = train_model(
            train,
            val,
            names,
            "Tumor",
            config,
            out / f"lr{lr:g}",
            {"mpp": args.mpp},
            progress=False,
            feature_cache_dir=out / "features",
        )
        score = (result.best_metrics["balanced_accuracy"], -result.history[result.best_epoch - 1]["val_loss"])
        if best is None or score > best[:2]:
            best = (*score, result.checkpoint, lr)
    assert best is not None
    return best[2], best[3], passes, time.perf_counter() - started


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 1.0], help="label fractions")
    parser.add_argument("--rows", nargs="+", default=list(STARTS), choices=list(STARTS), help="rows (default: all)")
    parser.add_argument("--arch", default="resnet18", help="architecture (default: resnet18, CPU-sized)")
    parser.add_argument("--unlabelled-slides", type=int, default=6, help="slides to pre-train on (default: 6)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="SimCLR epochs (default: 15)")
    parser.add_argument("--pretrain-lr", type=float, default=5e-4, help="SimCLR learning rate (default: 5e-4)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning optimiser steps (default: 60)")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (default: 32)")
    parser.add_argument(
        "--epoch-steps", type=int, default=10, help="steps per epoch, small splits repeated (default: 10)"
    )
    parser.add_argument(
        "--lr-backbone",
        type=float,
        nargs="+",
        default=[1e-3, 1e-4],
        help="backbone learning rates tried for every row; the validation slide picks one (default: 1e-3 1e-4)",
    )
    parser.add_argument(
        "--lr-probe",
        type=float,
        nargs="+",
        default=[1e-2, 1e-3],
        help="head learning rates tried for the frozen row (e); the validation slide picks one (default: 1e-2 1e-3)",
    )
    parser.add_argument(
        "--mpp", type=float, default=1.0, help="tile µm/px (default: 1.0; below 1 the tiles show nuclei)"
    )
    parser.add_argument(
        "--stains",
        nargs="+",
        default=["default"],
        choices=STAIN_NAMES,
        help="stains of the labelled, validation and test slides, in turn (default: default)",
    )
    parser.add_argument(
        "--other-stains",
        nargs="+",
        default=[],
        choices=STAIN_NAMES,
        help="a second test set: two more slides in these stains, as from another lab (default: none)",
    )
    parser.add_argument(
        "--archive-stains",
        nargs="+",
        choices=STAIN_NAMES,
        help="stains of the unlabelled slides, in turn (default: --stains, then --other-stains)",
    )
    parser.add_argument("--gan-steps", type=int, default=300, help="GAN generator updates per split (default: 300)")
    parser.add_argument("--gan-channel-max", type=int, default=64, help="GAN's widest layer (default: 64)")
    parser.add_argument("--gan-ada-speed", type=int, default=20_000, help="ADA images for p 0 -> 1 (default: 20000)")
    args = parser.parse_args()
    archive_stains = args.archive_stains or [*args.stains, *args.other_stains]
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads; arch {args.arch}")
    print(
        f"{TILE_PX} px tiles at {args.mpp:g} µm/px; stains: labelled {' '.join(args.stains)}, other-lab test "
        f"{' '.join(args.other_stains) or '-'}, unlabelled {' '.join(archive_stains)}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        slides = annotated(root / "slides", list(range(301, 308)), args.stains, args.mpp)
        pool_slides, val_slides, test_slides = slides[:4], slides[4:5], slides[5:]
        tiling = TilingConfig(mpp=args.mpp, tile_size_px=TILE_PX)

        def samples_of(slides: list[AnnotatedSlide], folder: str) -> tuple[list[Sample], list[str]]:
            found = annotated_slide_samples(slides, root / folder, tiling, unannotated_class="Normal", progress=False)
            return found[0], found[1]

        pool, names = samples_of(pool_slides, "pool")
        val = samples_of(val_slides, "val")[0]
        tests = {"test": samples_of(test_slides, "test")[0]}
        if args.other_stains:
            other = annotated(root / "slides", [308, 309], args.other_stains, args.mpp)
            tests["other-lab test"] = samples_of(other, "other")[0]
        test = tests["test"]
        positive = names.index("Tumor")
        stores = unlabelled_stores(
            root / "archive", list(range(401, 401 + args.unlabelled_slides)), archive_stains, args.mpp
        )
        results: dict[tuple[str, str, float], list[dict[str, float]]] = {}
        pretrain_rates: list[float] = []
        gan_rates: list[float] = []
        kids: dict[float, list[float]] = {}
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            labelled = imbalanced(pool, positive, rng)
            val_seed = imbalanced(val, positive, rng)
            backbone = root / f"pretrain-{seed}" / "backbone.safetensors"
            pretrain_rates.append(pretrain(stores, backbone.parent, args, seed))
            for fraction in args.fractions:
                train = fraction_of(labelled, fraction, positive, rng)
                n_tumour = sum(s.label == positive for s in train)
                print(f"  {fraction:.0%} labels: {len(train)} tiles, {n_tumour} tumour")
                mixed = train
                if any(STARTS[row][1] for row in args.rows):
                    started = time.perf_counter()
                    folder, kid_value, rate = gan_tiles(
                        train, test, names, root / f"gan-{seed}-{fraction}", backbone, args, seed
                    )
                    mixed, record = mix_synthetic(train, names, [SyntheticSource(folder)], args.mpp, TILE_PX, seed)
                    kids.setdefault(fraction, []).append(kid_value)
                    gan_rates.append(rate)
                    print(
                        f"    GAN on {n_tumour} tumour tiles: {args.gan_steps} steps, "
                        f"{time.perf_counter() - started:.0f} s, "
                        f"KID {kid_value:.3f}; +{record[0]['added']} generated tumour tiles"
                    )
                for row in args.rows:
                    pretrained, with_gan, frozen = STARTS[row]
                    weights = str(backbone) if pretrained else "none"
                    out = root / "runs" / f"{row[0]}-{fraction}-{seed}"
                    checkpoint, lr, epochs, seconds = fit(
                        mixed if with_gan else train, val_seed, names, weights, frozen, out, args, seed
                    )
                    scores = []
                    for test_set, samples in tests.items():
                        metrics = test_metrics(checkpoint, samples, names)
                        results.setdefault((test_set, row, fraction), []).append(metrics)
                        scores.append(
                            f"{test_set}: balanced accuracy {metrics['balanced_accuracy']:.3f}, "
                            f"tumour recall {metrics['tumour_recall']:.3f}"
                        )
                    print(f"    {row:<20} {epochs:.0f} passes, lr {lr:g}, {seconds:.0f} s: {'; '.join(scores)}")
        sizes = {name: len(samples) for name, samples in tests.items()}
        report(args, results, pretrain_rates, gan_rates, kids, sizes)


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, str, float], list[dict[str, float]]],
    pretrain_rates: list[float],
    gan_rates: list[float],
    kids: dict[float, list[float]],
    test_sizes: dict[str, int],
) -> None:
    print(
        f"\npre-training: {np.mean(pretrain_rates):.1f} images/s ({args.arch}, {TILE_PX} px tiles, views "
        f"{round(0.75 * TILE_PX)} px); "
        + "; ".join(f"{name}: {n} tiles of 2 held-out slides" for name, n in test_sizes.items())
    )
    if gan_rates:
        print(f"GAN: {np.mean(gan_rates):.1f} generated images/s ({TILE_PX} px, channel max {args.gan_channel_max})")
        for fraction, values in kids.items():
            print(
                f"  KID of GAN tiles vs test tumour tiles, {fraction:.0%} labels: "
                f"{np.mean(values):.3f} ± {np.std(values):.3f}"
            )
    for test_set in test_sizes:
        print(f"\n{test_set}:\n| row | labels | balanced accuracy | tumour recall |")
        print("|---|---|---|---|")
        for (name, row, fraction), rows in sorted(results.items(), key=lambda item: (item[0][2], item[0][1])):
            if name != test_set:
                continue
            ba = np.array([r["balanced_accuracy"] for r in rows])
            recall = np.array([r["tumour_recall"] for r in rows])
            print(
                f"| {row} | {fraction:.0%} | {ba.mean():.3f} ± {ba.std():.3f} | "
                f"{recall.mean():.3f} ± {recall.std():.3f} |"
            )
        print(f"margin over (a) scratch on the {test_set}, balanced accuracy, mean ± SD over seeds (per seed):")
        for fraction in args.fractions:
            scratch = results.get((test_set, "a scratch", fraction))
            for row in [r for r in args.rows if r != "a scratch"] if scratch is not None else []:
                assert scratch is not None
                margins = [
                    b["balanced_accuracy"] - a["balanced_accuracy"]
                    for a, b in zip(scratch, results[(test_set, row, fraction)], strict=True)
                ]
                print(
                    f"  {fraction:.0%} {row}: {np.mean(margins):+.3f} ± {np.std(margins):.3f}  "
                    f"({', '.join(f'{m:+.3f}' for m in margins)})"
                )


if __name__ == "__main__":
    main_benchmark()
