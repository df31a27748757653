"""The seeds' architectures and mask guidance, trained on one split of generated annotated slides and
compared on held-out slides.

    python benchmarks/architectures.py [--seeds 0 1] [--epochs 3] [--tile-px 64] [--mpp 1.0]

Generated slides (``wsi_dala.slides.synthetic``) with their tumour drawn as QuPath annotations: four train the
models, two are held out. Each configuration is trained by the real `wsi-dala train` (from random weights:
nothing is downloaded), then scored on the held-out tiles with DT Grad-CAM:

- DALAResNet50, ResNet50, ResViT-GANNet (a CPU-sized ViT: timm ViT-Tiny/16 with 4 blocks, 2 fused; its CAM
  on the TAMA-attended CNN tokens, and, as a second row, on the SE-attended CNN map before TAMA), and
  DALAResNet50 with ``--mask-guided`` (hard attention 0.1, attention supervision 0.5);
- balanced accuracy, F1, GMean and IBA of the tumour class, ROC AUC;
- **CAM in lesion**: for each held-out tumour tile that its annotation covers only in part, the share of
  its (ReLU'd, upsampled) CAM mass inside the lesion mask, averaged; and the pointing game: how often the
  CAM's peak falls inside the lesion (a CAM that is zero everywhere is a miss; their share is cam_blank);
- training images/s (from the run's epoch times) and scoring images/s (the held-out pass with CAM).

Figures are means ± SD over seeds. Prints the CPU flags; compare within one run only.
"""

from __future__ import annotations

import argparse
import csv
import json
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
from wsi_dala.core.config import TilingConfig
from wsi_dala.explain.cam import upsample
from wsi_dala.model import load_checkpoint
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.datasets import SampleDataset
from wsi_dala.training.lesion_masks import attach_lesion_masks
from wsi_dala.training.loaders import make_loader
from wsi_dala.training.metrics import classification_metrics
from wsi_dala.training.predict import predict
from wsi_dala.training.slide_tiles import AnnotatedSlide, annotated_slide_samples

TINY_VIT = ["--vit", "timm:vit_tiny_patch16_224", "--vit-option", "depth=4", "--fused-blocks", "2", "--tama-heads", "3"]
CONFIGS = {
    "DALAResNet50": ["--arch", "dalaresnet50"],
    "ResNet50": ["--arch", "resnet50"],
    "ResViT-GANNet (ViT-Ti/16, 4 blocks)": ["--arch", "resvit-gannet", *TINY_VIT],
    "ResViT-GANNet, CAM before TAMA": ["--arch", "resvit-gannet", *TINY_VIT, "--cam-layer", "cnn"],
    "DALAResNet50 + mask guidance": ["--arch", "dalaresnet50", "--mask-guided"],
}


def make_slides(folder: Path, seeds: range) -> list[AnnotatedSlide]:
    slides = []
    for seed in seeds:
        slide = write_synthetic_slide(
            folder / f"case{seed}.svs",
            SyntheticSlideSpec(width=6144, height=4608, mpp=0.25, seed=seed, tumour_regions=4),
        )
        slides.append(AnnotatedSlide(slide.path, _write_qupath_annotations(slide, folder / f"case{seed}.geojson")))
    return slides


def cam_in_lesion(cams: np.ndarray, masks: np.ndarray, tile_px: int) -> tuple[float, float, float]:
    """Over the given tiles: the mean share of CAM mass inside the lesion (tiles with any CAM), the
    pointing-game hit rate (a tile whose CAM is zero everywhere points nowhere: a miss), and the share of
    tiles whose CAM is zero everywhere."""
    maps = np.maximum(np.nan_to_num(upsample(cams, tile_px)), 0.0)
    mass = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * masks).reshape(len(maps), -1).sum(axis=1)
    usable = mass > 0
    peaks = maps.reshape(len(maps), -1).argmax(axis=1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(masks)), peaks].astype(bool) & usable
    share = float((inside[usable] / mass[usable]).mean()) if usable.any() else float("nan")
    return share, float(hits.mean()), float(1.0 - usable.mean())


def evaluate(checkpoint: Path, samples: list, names: list[str], tile_px: int) -> dict[str, float]:
    model, card = load_checkpoint(checkpoint)
    loader = make_loader(samples, input_size=tile_px, batch_size=32, train=False, n_classes=len(names))
    started = time.perf_counter()
    result = predict(
        model,
        loader,
        torch.device("cpu"),
        card.normalisation["mean"],
        card.normalisation["std"],
        "auto",
        cam_class=card.positive_index,
    )
    seconds = time.perf_counter() - started
    probabilities = result.probabilities
    metrics = classification_metrics(result.labels, probabilities.argmax(1), names, card.positive_index, probabilities)
    dataset = SampleDataset(samples)
    masks = np.stack([dataset.lesion_mask(s, (tile_px, tile_px)) for s in samples]).astype(np.float32)
    share = masks.reshape(len(masks), -1).mean(axis=1)
    partial = (result.labels == card.positive_index) & (share > 0.05) & (share < 0.95)
    assert result.cams is not None
    in_lesion, pointing, blank = cam_in_lesion(result.cams[partial], masks[partial], tile_px)
    binary = metrics["binary"]
    return {
        "balanced_accuracy": metrics["balanced_accuracy"],
        "f1": binary["f1"],
        "gmean": binary["gmean"],
        "iba": binary["iba"],
        "roc_auc": metrics.get("roc_auc") or float("nan"),
        "cam_in_lesion": in_lesion,
        "pointing_game": pointing,
        "cam_blank": blank,
        "partial_tiles": float(partial.sum()),
        "scoring_img_s": len(samples) / seconds,
    }


def training_rate(run: Path, n_train: int) -> float:
    with open(run / "metrics.csv", newline="") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return n_train / float(np.median(seconds))


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    parser.add_argument("--tile-px", type=int, default=64, help="tile side in px (default: 64)")
    parser.add_argument("--mpp", type=float, default=1.0, help="tile µm/px (default: 1.0)")
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        slides = make_slides(root / "slides", range(101, 107))
        train_slides, held_out = slides[:4], slides[4:]
        tiling = TilingConfig(mpp=args.mpp, tile_size_px=args.tile_px)
        test, names, _ = annotated_slide_samples(held_out, root / "held-out", tiling, unannotated_class="Normal")
        test = attach_lesion_masks(test, held_out, "Tumor")
        print(f"held out: {len(test)} tiles of {len(held_out)} slides, classes {names}")
        results: dict[str, list[dict[str, float]]] = {}
        for name, flags in CONFIGS.items():
            if args.only and not any(o.lower() in name.lower() for o in args.only):
                continue
            for seed in args.seeds:
                out = root / "runs" / f"{list(CONFIGS).index(name)}-{seed}"
                argv = ["train", *[f"--slide={s.slide}={s.annotations}" for s in train_slides], *flags]
                argv += ["--unannotated-class", "Normal", "--positive-class", "Tumor", "--mpp", str(args.mpp)]
                argv += ["--input-size", str(args.tile_px), "--pretrained", "none", "--epochs", str(args.epochs)]
                argv += ["--seed", str(seed), "--batch-size", "32", "--patience", str(args.epochs), "--out", str(out)]
                argv += ["--precise-bn-batches", "8", "-q"]
                if main(argv) != 0:
                    raise SystemExit(f"training failed: {name}, seed {seed}")
                summary = json.loads((out / "train.json").read_text())
                row = evaluate(out / "best.safetensors", test, names, args.tile_px)
                row["training_img_s"] = training_rate(out, sum(summary["counts"]["train"]))
                results.setdefault(name, []).append(row)
                print(f"  {name}, seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        keys = ["balanced_accuracy", "f1", "gmean", "iba", "roc_auc", "cam_in_lesion", "pointing_game", "cam_blank"]
        keys += ["training_img_s", "scoring_img_s"]
        print("\n| model | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for name, rows in results.items():
            cells = []
            for key in keys:
                values = np.array([r[key] for r in rows], dtype=float)
                cells.append(
                    f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
                )
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main_benchmark()
