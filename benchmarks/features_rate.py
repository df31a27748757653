"""`wsi-dala features` against the bare backbone, in one process, same CPU, batch and precision.

    python benchmarks/features_rate.py                       # UNI (ViT-L/16), the CMU-1 small region
    python benchmarks/features_rate.py --arch phikon-v2 --slide my.svs --batch-size 8

Random weights (the rate does not depend on them). Prints the tiles/s of ``write_features`` (tiles read
from the store, the model's transform, the forward pass, the embedding rule, fp16 writes) on the slide's
tiles, then the bare rate: the forward pass on the engine ``features`` chose (``--backend``) and the embedding
rule alone, on one batch of those tiles already normalised in memory, for as many tiles; and their ratio (the
issue's target: at least 0.9); and, when the engine is not torch, torch's bare rate at the same precision.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SLIDE = Path(__file__).resolve().parent.parent / "tests" / "data" / "cmu_small_region.svs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="uni", help="preset (default: uni)")
    parser.add_argument("--slide", type=Path, default=SLIDE, help="slide (default: the CMU-1 small region)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles a forward pass (default: 8)")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (default: auto)")
    parser.add_argument(
        "--backend", default="auto", help="auto, torch, onnxruntime or openvino, as `features` takes (default: auto)"
    )
    args = parser.parse_args()

    import torch
    from tissue import cpu_flags

    from wsi_dala.inference.features import encoder_input
    from wsi_dala.model.devices import autocast
    from wsi_dala.model.foundation import embed
    from wsi_dala.runs.features import FeatureSettings, features_for_slide, prepare_encoder
    from wsi_dala.tiling.store import TileStore

    settings = FeatureSettings(
        args.arch, "none", batch_size=args.batch_size, precision=args.precision, backend=args.backend
    )
    encoder = prepare_encoder(settings)
    with tempfile.TemporaryDirectory() as tmp:
        features_for_slide(args.slide, Path(tmp), settings, encoder, progress=False)  # tiles, chooses the engine
        shutil.rmtree(Path(tmp) / "features.zarr")  # the timed pass computes every chunk
        result = features_for_slide(args.slide, Path(tmp), settings, encoder, progress=False)
        tiles = TileStore(Path(tmp) / "tiles.zarr").tiles(slice(0, args.batch_size))
    x = encoder_input(tiles, encoder.preset, encoder.card)
    engine = encoder.engine
    precision = engine.card["precision"] if engine else encoder.card["precision"]

    def torch_forward(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, "cpu"):
            return encoder.network.forward_features(images).float()

    rates = {}
    forwards = {"the same engine": engine.forward if engine and engine.forward else torch_forward}
    if engine and engine.forward:
        forwards["torch"] = torch_forward
    for name, forward in forwards.items():
        forward(x)  # warm-up
        done, started = 0, time.perf_counter()
        while done < result.n_tiles:
            embed(encoder.preset, forward(x).float())
            done += len(x)
        rates[name] = done / (time.perf_counter() - started)
    rate = result.n_tiles / result.seconds
    label = engine.label if engine else f"torch {precision}"
    print(f"{os.cpu_count()} cores, CPU {cpu_flags()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.arch}, {label}, batch {args.batch_size}, {result.n_tiles} tiles of {args.slide.name}")
    if engine:
        print(f"engine chosen: {engine.label} ({engine.reason}; {engine.rates_tiles_per_s})")
    bare = rates["the same engine"]
    print(
        f"features: {rate:.2f} tiles/s; bare backbone on the same engine: {bare:.2f} tiles/s; ratio {rate / bare:.2f}"
    )
    if "torch" in rates:
        versus = rate / rates["torch"]
        print(f"bare backbone on torch {precision}: {rates['torch']:.2f} tiles/s (features ÷ it: {versus:.2f})")


if __name__ == "__main__":
    main()
