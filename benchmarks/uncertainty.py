"""What a per-tile uncertainty costs: scoring with --tta flips / d4 and --mc-dropout N, against plain scoring.

    python benchmarks/uncertainty.py [--size 224] [--tiles 64] [--batch 32] [--mc 20]

Runs ``wsi_dala.inference.scoring.score_tiles`` — the function each Dask task runs on a chunk of tiles: probabilities
at the card's temperature, DT Grad-CAM for every tile, and the SD when asked — on the same random tiles
with an untrained DALAResNet50 (timing does not depend on the weights), at the precision ``run`` would
pick on this CPU, all in one process. Prints tiles/s and the cost relative to plain scoring. Expected:
flips ≈ 4x, d4 ≈ 8x (every view is a backbone pass); MC dropout re-runs only the head on features
computed once, so a few per cent.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from tissue import cpu_flags  # benchmarks/ is on sys.path when this runs as a script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="tile side in px (default: 224)")
    parser.add_argument("--tiles", type=int, default=64, help="tiles per measurement (default: 64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--mc", type=int, default=20, help="MC-dropout passes (default: 20)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest counts (default: 3)")
    args = parser.parse_args(argv)
    from wsi_dala.inference.scoring import Uncertainty, score_tiles
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.model.devices import resolve_device, resolve_precision

    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    print(f"CPU: {cpu_flags()}; device {device}, precision {precision}, {args.tiles} tiles of {args.size} px")
    tiles = np.random.default_rng(0).integers(0, 256, size=(args.tiles, args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(write_untrained_checkpoint(Path(folder) / "dala.safetensors", tile_size_px=args.size))
        score_tiles(tiles, checkpoint, device, precision, args.batch)  # load the model, warm up (a whole pass)
        options = {
            "plain": Uncertainty(),
            f"mc-dropout {args.mc}": Uncertainty(mc_dropout=args.mc),
            "tta flips": Uncertainty("flips"),
            "tta d4": Uncertainty("d4"),
        }
        best: dict[str, float] = {}
        for _round in range(args.rounds):  # interleaved rounds, fastest of each: this VM's speed drifts
            for name, uncertainty in options.items():
                started = time.perf_counter()
                score_tiles(tiles, checkpoint, device, precision, args.batch, None, uncertainty)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - started)
        print(f"{'option':16s} {'tiles/s':>8s} {'cost':>7s}  (fastest of {args.rounds} interleaved rounds)")
        for name, seconds in best.items():
            print(f"{name:16s} {args.tiles / seconds:8.1f} {seconds / best['plain']:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
