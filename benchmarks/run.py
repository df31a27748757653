"""End-to-end benchmark of `wsi-dala run` on a 40,000 x 30,000 px slide, stage by stage.

    python benchmarks/run.py                 # generates the slide once (as benchmarks/tiling.py does)
    python benchmarks/run.py --slide my.svs --model my.safetensors

Prints time and tiles/s per stage (tile, score with DT Grad-CAM, tiling and scoring together — they
overlap —, stitch, export), end to end, peak RSS, and — in the same process, on the engine and precision
the run chose, on the same tiles loaded into memory first — the bare backbone's throughput, so what the
pipeline adds (reads, CAM, writes, Dask) is visible. Without --model, an untrained DALAResNet50 (224 px
at 0.5 µm/px) stands in: speed does not depend on the weights. Extra ``wsi-dala run`` settings:
``--backend``, ``--precision`` (int8 included). ``--tiled-first``: the slide is tiled by ``wsi-dala tile``
before the timed run, which then only scores (its tiling stage finds the store complete): the scoring
stage alone, without tiling competing for the same cores.
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


def bare_backbone_rate(checkpoint: Path, store: Path, backend: dict, batch_size: int, n_tiles: int) -> float:
    """Backbone-only tiles/s of the engine the run chose, on the run's tiles already in memory."""
    from wsi_dala.inference.engines import BackbonePlan, load_backbone
    from wsi_dala.inference.scoring import cached_model, prepared_images
    from wsi_dala.tiling.store import TileStore

    model, card = cached_model(str(checkpoint), "cpu")
    plan = BackbonePlan(backend["engine"], backend["precision"], backend.get("model_file"), backend["threads"])
    backbone = load_backbone(plan, model, "cpu")
    tiles = TileStore(store)
    n = min(n_tiles, tiles.info.n_tiles)
    batches = [
        prepared_images(tiles.tiles(slice(s, min(s + batch_size, n))), card, "cpu") for s in range(0, n, batch_size)
    ]
    backbone(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        backbone(batch)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bare-tiles", type=int, default=640, help="tiles for the bare-backbone figure")
    parser.add_argument("--backend", default="auto", help="scoring.backend (default: auto)")
    parser.add_argument("--precision", default="auto", help="scoring.precision (default: auto)")
    parser.add_argument("--tiled-first", action="store_true", help="tile before the timed run (scoring alone)")
    args = parser.parse_args()

    from tiling import phase_generate
    from tissue import cpu_flags

    from wsi_dala.core.config import PipelineConfig, ScoringConfig
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.runs.pipeline import run_slide

    slide = args.slide or DATA / "synthetic_40000x30000_0.25.svs"
    if not slide.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        phase_generate(slide, 40_000, 30_000)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model
        if checkpoint is None:
            checkpoint = write_untrained_checkpoint(Path(tmp) / "dala-untrained.safetensors")
        scoring = ScoringConfig(batch_size=args.batch_size, backend=args.backend, precision=args.precision)
        config = PipelineConfig(model=str(checkpoint), scoring=scoring)
        if args.tiled_first:
            from wsi_dala.cli import main as cli_main
            from wsi_dala.model import read_card

            card = read_card(checkpoint)
            tile_args = ["tile", str(slide), "--out", str(Path(tmp) / "run"), "--quiet"]
            cli_main([*tile_args, "--mpp", str(card.mpp), "--tile-size", str(card.tile_size_px)])
        started = time.perf_counter()
        summary = run_slide(slide, Path(tmp) / "run", config, progress=False)
        total = time.perf_counter() - started
        record = summary.record
        backend = record.scoring["backend"]
        bare = bare_backbone_rate(checkpoint, summary.layout.tiles_store, backend, args.batch_size, args.bare_tiles)
    n = record.counts.tiles
    timings = record.timings_s
    print(
        f"slide: {slide} ({record.resolution.slide_mpp} µm/px), {n} tiles of 224 px at "
        f"{record.resolution.tile_mpp} µm/px; backbone {backend['engine']} {backend['precision']} "
        f"({backend['reason']}), device {record.scoring['device']}; CPU {cpu_flags()}"
    )
    for stage in ("tile", "score", "tile_and_score", "stitch", "export"):
        print(f"  {stage:<14} {timings[stage]:7.1f} s  {n / max(timings[stage], 1e-9):8.1f} tiles/s")
    overlapped = record.scoring["chunks_scored_while_tiling"]
    print(f"  ({overlapped} chunks scored while tiling; 'score' is what was left after tiling ended)")
    score_rate = n / (timings["tile_and_score"] - (timings["tile"] if not overlapped else 0))
    print(f"  end to end {total:6.1f} s  {n / total:8.1f} tiles/s (run_slide, including model load)")
    print(
        f"bare backbone (tiles in memory): {bare:.1f} tiles/s; in the pipeline with DT Grad-CAM: "
        f"{score_rate:.1f} tiles/s = {score_rate / bare:.2f}x"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
