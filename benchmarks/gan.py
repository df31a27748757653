"""Does `wsi-dala gan train` learn the tumour tiles? KID of generated against held-out real tiles over
training, and the GAN's speed on this machine.

    python benchmarks/gan.py [--steps 600] [--kid-every 100] [--resolution 64]

Generated slides (``wsi_dala.slides.synthetic``), tumour drawn as QuPath annotations, tiles at ``--mpp``
(default 1 µm/px: flat colour; at 0.5 µm/px the generator's nuclei show, as in few_labels.py): the
tumour tiles of ``--slides`` slides train the GAN (`gan train --class Tumor`, whole slides held out for KID's
real tiles); KID is measured in the feature space of a `wsi-dala pretrain` backbone (resnet18, SimCLR on
four other slides, without stain jitter by default so that it sees colour; torch-fidelity's InceptionV3
would need its weights file, which cannot be downloaded here). Prints KID by step, generated images/s
while training, and the CPU flags; compare within one run only. The sample grid and curves stay in
``--keep DIR`` when given.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from few_labels import annotated, unlabelled_stores
from tissue import cpu_flags

from wsi_dala.cli import main


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="generator updates (default: 600)")
    parser.add_argument("--kid-every", type=int, default=100, help="steps between KIDs (default: 100)")
    parser.add_argument("--resolution", type=int, default=64, help="tile side (default: 64)")
    parser.add_argument(
        "--mpp", type=float, default=1.0, help="tile µm/px (default: 1.0; below 1 the tiles show nuclei)"
    )
    parser.add_argument("--channel-max", type=int, default=128, help="widest GAN layer (default: 128)")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="KID encoder's SimCLR epochs (default: 10)")
    parser.add_argument(
        "--encoder-hed-jitter",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("SCALE", "SHIFT"),
        help="the KID encoder's SimCLR stain jitter (default: 0 0: an encoder taught to ignore stain colour "
        "cannot see the colour a GAN learns first)",
    )
    parser.add_argument("--slides", type=int, default=5, help="annotated slides (default: 5)")
    parser.add_argument(
        "--kid-holdout",
        type=float,
        default=0.2,
        help="share of the slides whose tumour tiles are KID's real tiles, not trained on (default: 0.2); with "
        "some 25 tumour tiles a slide, KID from one slide's tiles is mostly noise",
    )
    parser.add_argument("--keep", type=Path, default=None, help="copy the GAN run folder here")
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        slides = annotated(root / "slides", list(range(501, 501 + args.slides)), ["default"], args.mpp)
        stores = unlabelled_stores(root / "archive", list(range(601, 605)), ["default"], args.mpp)
        encoder_dir = root / "encoder"
        argv = ["pretrain", "--stores", *map(str, stores), "--out", str(encoder_dir), "--arch", "resnet18"]
        started = time.perf_counter()
        argv += ["--hed-jitter", *map(str, args.encoder_hed_jitter)]
        if main([*argv, "--pretrained", "none", "--epochs", str(args.pretrain_epochs), "-q"]) != 0:
            raise SystemExit("pre-training the KID encoder failed")
        jitter = " ".join(map(str, args.encoder_hed_jitter))
        print(
            f"KID encoder: resnet18, SimCLR {args.pretrain_epochs} epochs, HED jitter {jitter}, "
            f"{time.perf_counter() - started:.0f} s"
        )
        out = root / "gan"
        argv = ["gan", "train", *[f"--slide={s.slide}={s.annotations}" for s in slides], "--class", "Tumor"]
        argv += ["--unannotated-class", "Normal", "--mpp", str(args.mpp), "--resolution", str(args.resolution)]
        argv += ["--steps", str(args.steps)]
        argv += ["--channel-max", str(args.channel_max), "--checkpoint-every", str(args.kid_every)]
        argv += ["--kid-every", str(args.kid_every), "--kid-encoder", str(encoder_dir / "backbone.safetensors")]
        argv += ["--kid-holdout", str(args.kid_holdout)]
        argv += ["--out", str(out), "-q"]
        started = time.perf_counter()
        if main(argv) != 0:
            raise SystemExit("GAN training failed")
        seconds = time.perf_counter() - started
        with open(out / "kid.csv", newline="") as handle:
            kids = [(int(r["step"]), float(r["kid"]), float(r["kid_sd"])) for r in csv.DictReader(handle)]
        print(f"\nGAN: {args.steps} steps of 16 tiles at {args.resolution} px, {seconds:.0f} s in all (with KIDs)")
        print("| step | KID (SimCLR resnet18 features) | SD over subsets |\n|---|---|---|")
        for step, value, sd in kids:
            print(f"| {step} | {value:.4f} | {sd:.4f} |")
        if args.keep is not None:
            shutil.copytree(out, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tiles"))
            print(f"kept: {args.keep}")


if __name__ == "__main__":
    main_benchmark()
