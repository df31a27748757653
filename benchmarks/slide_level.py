"""Slide-level answers on a generated archive: a tile classifier trained on two annotated slides (max and
top-k aggregation) against attention MIL trained on slide labels alone, and both together.

    python benchmarks/slide_level.py                      # 60 slides, about 25 minutes on 2 cores
    python benchmarks/slide_level.py --slides 24 --work /tmp/slide-level   # a quicker look

The archive: half the slides hold tumour (half of those one small focus of 0.2-0.4 mm, the others three
regions), half are tumour-free; two stains on each side, balanced across the labels; a fifth of the slides
come from the real-texture generator (``wsi_dala.slides.synthetic_texture``, real H&E patches from
tests/data/textures), the rest from the ellipse generator. Methods, each judged on every slide:

(a) the demo's DALAResNet50, trained from scratch on two annotated slides (``wsi-dala demo``), run over the
    archive with ``wsi-dala batch``: the slide score is the highest tile probability (max) or the mean of the
    ten highest (top-k);
(b) ABMIL (``wsi-dala mil train``) on slide labels alone, with features of encoders that never saw an
    annotation: an untrained DALAResNet50 (random weights) and a ViT-S/16-sized UNI-family ViT with random
    weights (its patch-token mean: a random ViT's class token hardly varies between tiles);
(c) both: ABMIL on the features of (a)'s annotation-trained DALAResNet50.

ABMIL's figures are out-of-fold (5-fold cross-validation by slide): each slide is scored by a model that
never saw it. Intervals are 95 % bootstrap intervals over slides. "small foci" is the sensitivity at 95 %
specificity (over every tumour-free slide) of the slides whose only tumour is one small focus. Prints the
CPU it ran on and the table, whatever the figures are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
WSI_DALA = [sys.executable, "-m", "wsi_dala"]
VIT_OPTIONS = {"depth": 12, "embed_dim": 384, "num_heads": 6}  # ViT-S/16 dimensions in the UNI preset's family


def write_archive(folder: Path, count: int) -> list[dict[str, object]]:
    """The slides and what each holds (label, kind of tumour, stain, generator)."""
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide

    textures = load_textures(DATA / "textures" / "textures.json", 0.5)
    slides = []
    for number in range(count):
        tumour = number % 2 == 0
        small = tumour and (number // 2) % 2 == 0
        dark = (number // 4) % 2 == 1  # the stain alternates within each label
        texture = number % 5 == 4
        name = folder / f"slide{number:03d}.svs"
        if texture:
            spec_t = TextureSlideSpec(
                width=4000,
                height=3200,
                seed=500 + number,
                tumour_fraction=(0.04 if small else 0.25) if tumour else 0.0,
                stain_scale=1.3 if dark else 1.0,
            )
            write_texture_slide(name, textures["normal"], textures["tumour"], spec_t)
        else:
            spec = SyntheticSlideSpec(
                width=4096,
                height=3072,
                mpp=0.5,
                app_mag=20,
                seed=500 + number,
                tumour_regions=(1 if small else 3) if tumour else 0,
                stain="dark" if dark else "default",
                pen_marks=False,
            )
            write_synthetic_slide(name, spec)
        slides.append(
            {
                "slide": name.name,
                "tumour": tumour,
                "small_focus": small,
                "stain": "dark" if dark else "default",
                "generator": "texture" if texture else "ellipses",
            }
        )
    return slides


def call(*args: object) -> float:
    """Run a wsi-dala command; its seconds (a failure stops the benchmark with its error)."""
    started = time.perf_counter()
    result = subprocess.run([*WSI_DALA, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"wsi-dala {' '.join(map(str, args[:2]))} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def tile_scores(batch_out: Path, slides: list[dict[str, object]]) -> tuple[np.ndarray, np.ndarray]:
    """Per slide: the highest tile probability and the top-10 mean, from each run."""
    from wsi_dala.tiling.store import TileStore

    found = {}
    for run_json in batch_out.rglob("run.json"):
        record = json.loads(run_json.read_text())
        store = TileStore(run_json.parent / "tiles.zarr")
        scores = store.positive_scores()[store.usable_tiles()]
        found[Path(record["slide"]["path"]).name] = (
            float(np.nanmax(scores)),
            record["slide_answer"]["top_k_mean_probability"],
        )
    maximum = np.array([found[str(s["slide"])][0] for s in slides])
    top_k = np.array([found[str(s["slide"])][1] for s in slides])
    return maximum, top_k


def mil(
    features: Path, labels: Path, out: Path, feature: str, slides: list[dict[str, object]]
) -> tuple[np.ndarray, float]:
    import csv

    seconds = call("mil", "train", "--labels", labels, "--features", features, "--out", out, "--feature", feature)
    rows = {row["slide"]: float(row["probability"]) for row in csv.DictReader((out / "oof_predictions.csv").open())}
    return np.array([rows[str(s["slide"])] for s in slides]), seconds


def row(name: str, features: str, score: np.ndarray, slides: list[dict[str, object]], seconds: float | None) -> str:
    from wsi_dala.model.slide_thresholds import rank_auc
    from wsi_dala.training.slide_metrics import sensitivity_at_specificity, slide_metrics

    tumour = np.array([bool(s["tumour"]) for s in slides])
    small = np.array([bool(s["small_focus"]) for s in slides])
    texture = np.array([s["generator"] == "texture" for s in slides])
    metrics = slide_metrics(score, tumour)
    auc, sens = metrics["auc"], metrics["sensitivity_at_95_specificity"]
    keep = ~tumour | small  # small-focus slides against every tumour-free one
    small_sens = sensitivity_at_specificity(score[keep], tumour[keep])
    by_source = []
    for mask in (~texture, texture):  # ellipses, texture
        if tumour[mask].any() and (~tumour[mask]).any():
            by_source.append(f"{rank_auc(score[mask], tumour[mask]):.3f}")
        else:
            by_source.append("–")
    took = f"{seconds:.0f}" if seconds is not None else "–"
    return (
        f"| {name} | {features} | {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] | "
        f"{sens['value']:.2f} [{sens['low']:.2f}, {sens['high']:.2f}] | {small_sens:.2f} | "
        f"{by_source[0]} / {by_source[1]} | {took} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=60, help="slides in the archive (default: 60)")
    parser.add_argument("--work", type=Path, default=Path("slide-level-bench"), help="working folder")
    args = parser.parse_args()

    import torch
    from tissue import cpu_flags

    print(f"{os.cpu_count()} cores, CPU {cpu_flags()}, torch {torch.__version__}")
    work = args.work
    archive, labels = work / "archive", work / "labels.csv"
    started = time.perf_counter()
    if not labels.exists():
        slides = write_archive(archive, args.slides)
        (work / "slides.json").write_text(json.dumps(slides))
        rows = ["slide,label"] + [f"{s['slide']},{'Tumor' if s['tumour'] else 'Non-tumor'}" for s in slides]
        labels.write_text("\n".join(rows) + "\n")
    slides = json.loads((work / "slides.json").read_text())
    print(
        f"archive: {len(slides)} slides ({sum(s['tumour'] for s in slides)} with tumour, "
        f"{sum(s['small_focus'] for s in slides)} of them one small focus; "
        f"{sum(s['generator'] == 'texture' for s in slides)} from real texture) "
        f"in {time.perf_counter() - started:.0f} s"
    )

    from wsi_dala.core.layout import DemoLayout
    from wsi_dala.model import write_untrained_checkpoint

    demo = DemoLayout(work / "demo")
    if not demo.model.best_checkpoint.exists():
        print(f"(a) training the demo's DALAResNet50 on two annotated slides: {call('demo', demo.root, '-q'):.0f} s")
    trained = demo.model.best_checkpoint
    untrained = work / "dalaresnet50-untrained.safetensors"
    if not untrained.exists():
        write_untrained_checkpoint(untrained, "dalaresnet50", 128, 0.5, ("Non-tumor", "Tumor"))

    batch_s = call("batch", archive, "--out", work / "batch", "--model", trained, "-q")
    print(f"batch with the tile classifier: {batch_s:.0f} s")
    maximum, top_k = tile_scores(work / "batch", slides)
    feature_s = {}
    for name, flags in (
        ("trained", ["--model", trained]),
        ("untrained", ["--model", untrained]),
        ("vit", ["--arch", "uni", "--weights", "none", *[f"--encoder-option={k}={v}" for k, v in VIT_OPTIONS.items()]]),
    ):
        feature_s[name] = call("features", archive, *flags, "--out", work / f"features-{name}", "-q")
        print(f"features ({name}): {feature_s[name]:.0f} s")
    results = [
        ("(a) tile classifier, max", "DALAResNet50, 2 annotated slides", maximum, None),
        ("(a) tile classifier, top-10 mean", "DALAResNet50, 2 annotated slides", top_k, None),
    ]
    for label, name, feature in (
        ("(b) ABMIL, slide labels", "DALAResNet50, random weights", "embedding"),
        ("(b) ABMIL, slide labels", "ViT-S/16 (UNI family), random weights, token mean", "token_mean"),
        ("(c) ABMIL on (a)'s features", "DALAResNet50, 2 annotated slides", "embedding"),
    ):
        folder = {"DALAResNet50, random weights": "untrained", "DALAResNet50, 2 annotated slides": "trained"}.get(
            name, "vit"
        )
        score, seconds = mil(work / f"features-{folder}", labels, work / f"mil-{folder}", feature, slides)
        results.append((label, name, score, seconds))
    print()
    print(
        "| method | features | slide AUC [95 % CI] | sensitivity at 95 % specificity [CI] | small foci | "
        "AUC ellipses / texture | ABMIL training s |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, name, score, seconds in results:
        print(row(label, name, score, slides, seconds))
    print(f"\nin all {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
