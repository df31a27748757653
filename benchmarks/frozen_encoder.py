"""How long `train --arch timm:NAME --freeze-backbone` takes on this machine, and what 10^5 tiles would take.

Two parts, both through the real code:

1. Encoder throughput: the forward pass that computes the cached features, per encoder (ViT-S/16, ViT-B/16,
   and UNI's layout ViT-L/16 with ``init_values=1e-5``), randomly initialised (the speed does not depend on
   the weights), at 224 px under the precision ``--precision auto`` picks on this CPU.
2. The whole command on an image folder of blob tiles: once with an empty feature cache (the encoder runs
   over every tile), then again with another learning rate and the same ``--feature-cache`` (the head alone
   trains on the cached features). The second run's epoch time, scaled to 10^5 tiles, is the head's cost.

Usage: ``python benchmarks/frozen_encoder.py [--tiles 2000] [--epochs 10] [--encoders vit_small_patch16_224 ...]``
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tissue import cpu_flags

from tests.images import write_blob_folder
from wsi_dala.cli import main
from wsi_dala.model import build_model
from wsi_dala.model.devices import autocast, resolve_precision

UNI_OPTIONS = {"init_values": 1e-5}
ENCODERS = {
    "vit_small_patch16_224": {},
    "vit_base_patch16_224": {},
    "vit_large_patch16_224": UNI_OPTIONS,
}
SIDE_PX = 224
TARGET_TILES = 100_000


def encoder_rate(name: str, options: dict[str, object], batch: int = 16, seconds: float = 8.0) -> tuple[float, int]:
    """Tiles/s of ``forward_features`` (one warm-up batch first) and the encoder's parameter count."""
    model = build_model(f"timm:{name}", 2, "none", dict(options), input_size=SIDE_PX).eval()
    images = torch.rand(batch, 3, SIDE_PX, SIDE_PX)
    with torch.no_grad(), autocast("auto", "cpu"):
        model.forward_features(images)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 2 * batch:
            model.forward_features(images)
            done += batch
    return done / (time.perf_counter() - started), sum(p.numel() for p in model.encoder.parameters())


def command_run(data: Path, out: Path, cache: Path, encoder: str, weights: str, epochs: int, lr: str) -> float:
    argv = ["train", "--folder", str(data), "--out", str(out), "--arch", f"timm:{encoder}", "--weights", weights]
    argv += ["--freeze-backbone", "--feature-cache", str(cache), "--epochs", str(epochs), "--patience", str(epochs)]
    argv += ["--input-size", str(SIDE_PX), "--train-mpp", "0.5", "--lr-head", lr, "-q"]
    started = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"wsi-dala train failed: {' '.join(argv)}")
    return time.perf_counter() - started


def epoch_seconds(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=2000, help="tiles in the image folder (default: 2000)")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs per command run (default: 10)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), help="timm names (default: S, B, L)")
    parser.add_argument("--command-encoder", default="vit_small_patch16_224", help="encoder of part 2")
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"precision: {resolve_precision('auto', 'cpu')} (what --precision auto picks here)")
    print(f"\n1. encoder forward at {SIDE_PX} px (random weights)")
    for name in args.encoders:
        rate, params = encoder_rate(name, ENCODERS.get(name, {}))
        hours = TARGET_TILES / rate / 3600
        print(f"  {name:26s} {params / 1e6:6.1f} M params  {rate:7.1f} tiles/s  10^5 tiles: {hours:5.2f} h")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = write_blob_folder(root / "data", size=SIDE_PX, n=args.tiles, groups=10)
        what = f"timm:{args.command_encoder}, {args.tiles} tiles, {args.epochs} epochs"
        print(f"\n2. wsi-dala train --freeze-backbone, {what}")
        cold = command_run(data, root / "a", root / "cache", args.command_encoder, "none", args.epochs, "0.001")
        warm = command_run(data, root / "b", root / "cache", args.command_encoder, "none", args.epochs, "0.002")
        per_epoch = sorted(epoch_seconds(root / "b"))[len(epoch_seconds(root / "b")) // 2]
        print(f"  empty cache : {cold:7.1f} s (encoder over every tile, then the head)")
        print(f"  cached      : {warm:7.1f} s (the head alone; median epoch {per_epoch * 1000:.0f} ms)")
        scale = TARGET_TILES / args.tiles
        print(f"  head on 10^5 cached tiles: about {per_epoch * scale:.1f} s per epoch (linear in tiles)")


if __name__ == "__main__":
    main_benchmark()
