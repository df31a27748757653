"""End-to-end benchmark of `wsi-dala run` on a 40,000 x 30,000 px slide, stage by stage.

    python benchmarks/run.py                 # generates the slide once (as benchmarks/tiling.py does)
    python benchmarks/run.py --slide my.svs --model my.safetensors

Prints time and tiles/s per stage (tile, score with DT Grad-CAM, stitch, export), end to end, peak
RSS, and — in the same process, at the same precision, on the same tiles — the bare model's forward
throughput, so the cost of computing a CAM for every tile is visible. Without --model, an untrained
DALAResNet50 (224 px at 0.5 µm/px) stands in: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parent / ".data"


def bare_model_rate(checkpoint: Path, store: Path, precision: str, batch_size: int, n_tiles: int) -> float:
    """Forward-only images/s of the same model on the same tiles, as scoring runs it (minus the CAM)."""
    import torch

    from wsi_dala.devices import autocast, normalise
    from wsi_dala.scoring import cached_model
    from wsi_dala.store import TileStore

    model, card = cached_model(str(checkpoint), "cpu")
    tiles = TileStore(store)
    n = min(n_tiles, tiles.info.n_tiles)
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        batch = torch.from_numpy(tiles.tiles(slice(start, start + batch_size))).permute(0, 3, 1, 2)
        images = normalise(batch, card.normalisation["mean"], card.normalisation["std"])
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(precision, "cpu"):
            model(images)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bare-tiles", type=int, default=640, help="tiles for the bare-model figure")
    args = parser.parse_args()

    from tiling import phase_generate

    from wsi_dala.config import PipelineConfig, ScoringConfig
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.pipeline import run_slide

    slide = args.slide or DATA / "synthetic_40000x30000_0.25.svs"
    if not slide.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        phase_generate(slide, 40_000, 30_000)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model
        if checkpoint is None:
            checkpoint = write_untrained_checkpoint(Path(tmp) / "dala-untrained.safetensors")
        config = PipelineConfig(model=str(checkpoint), scoring=ScoringConfig(batch_size=args.batch_size))
        started = time.perf_counter()
        summary = run_slide(slide, Path(tmp) / "run", config, progress=False)
        total = time.perf_counter() - started
        record = summary.record
        precision = record.scoring["precision"]
        bare = bare_model_rate(checkpoint, summary.layout.tiles_store, precision, args.batch_size, args.bare_tiles)
    n = record.counts.tiles
    timings = record.timings_s
    print(
        f"slide: {slide} ({record.resolution.slide_mpp} µm/px), {n} tiles of 224 px at "
        f"{record.resolution.tile_mpp} µm/px; precision {precision}, device {record.scoring['device']}"
    )
    for stage in ("tile", "score", "stitch", "export"):
        print(f"  {stage:<7} {timings[stage]:7.1f} s  {n / timings[stage]:8.1f} tiles/s")
    score_rate = n / timings["score"]
    print(f"  end to end {total:6.1f} s  {n / total:8.1f} tiles/s (run_slide, including model load)")
    print(
        f"bare model forward: {bare:.1f} images/s; scoring with DT Grad-CAM: {score_rate:.1f} tiles/s "
        f"= {score_rate / bare:.2f}x"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
