"""Tiling throughput and memory: wsi-dala's tiler vs a naive one-read_region-per-tile loop.

    python benchmarks/tiling.py                    # generates a 40,000 x 30,000 SVS at 0.25 µm/px once
    python benchmarks/tiling.py --slide my.svs     # or measure a slide of your own

Prints tiles/s at the target µm/px and tile size, peak RSS of each method (each runs in a fresh
process so neither inherits the other's memory), and the speed-up over the naive loop for the same tiles.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / ".data"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def phase_generate(path: Path, width: int, height: int) -> None:
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    started = time.perf_counter()
    write_synthetic_slide(
        path, SyntheticSlideSpec(width=width, height=height, mpp=0.25, seed=7, tissue_fraction=0.5, label_px=32)
    )
    print(
        f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )


def phase_ours(slide: Path, out: Path, mpp: float, tile: int, reader_threads: int) -> dict:
    from wsi_dala.core.config import TilingConfig
    from wsi_dala.tiling.tiler import tile_slide

    config = TilingConfig(mpp=mpp, tile_size_px=tile, reader_threads=reader_threads)
    result = tile_slide(slide, out, config, progress=False)
    return {
        "tiles": result.n_tiles,
        "seconds": result.seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "level": result.record.level,
        "resize_factor": result.record.resize_factor,
    }


def phase_naive(slide: Path, store: Path, tile: int, limit: int | None) -> dict:
    """The loop most scripts start with: one OpenSlide read_region per tile, then the same resize."""
    import numpy as np
    import openslide
    import zarr

    from wsi_dala.tiling.tiler import resize_tile

    group = zarr.open_group(store, mode="r")
    coords = np.asarray(group["coords"][:])
    # Same tiles in row-major order (the order a naive loop walks), optionally a sample of them.
    coords = coords[np.lexsort((coords[:, 0], coords[:, 1]))]
    if limit:
        coords = coords[:limit]
    read_px = int(group.attrs["read_size_level_px"])
    level = int(group.attrs["level"])
    handle = openslide.OpenSlide(str(slide))
    started = time.perf_counter()
    for x, y in coords:
        region = handle.read_region((int(x), int(y)), level, (read_px, read_px)).convert("RGB")
        resize_tile(np.asarray(region), tile)  # the same resize as the tiler: only reading differs
    seconds = time.perf_counter() - started
    return {"tiles": len(coords), "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _phase(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--phase", *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="slide to tile (default: generate one)")
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--height", type=int, default=30_000)
    parser.add_argument("--mpp", type=float, default=0.5, help="target µm/px")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--reader-threads", type=int, default=2)
    parser.add_argument("--naive-tiles", type=int, default=0, help="time the naive loop on the first N tiles (0: all)")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        name, *rest = args.phase
        if name == "generate":
            phase_generate(Path(rest[0]), int(rest[1]), int(rest[2]))
            print("{}")
        elif name == "ours":
            print(json.dumps(phase_ours(Path(rest[0]), Path(rest[1]), float(rest[2]), int(rest[3]), int(rest[4]))))
        else:
            limit = int(rest[3]) or None
            print(json.dumps(phase_naive(Path(rest[0]), Path(rest[1]), int(rest[2]), limit)))
        return

    slide = args.slide
    if slide is None:
        slide = DATA / f"synthetic_{args.width}x{args.height}_0.25.svs"
        if not slide.exists():
            DATA.mkdir(parents=True, exist_ok=True)
            _phase("generate", str(slide), str(args.width), str(args.height))
    with tempfile.TemporaryDirectory() as tmp:
        ours = _phase("ours", str(slide), tmp, str(args.mpp), str(args.tile_size), str(args.reader_threads))
        naive = _phase("naive", str(slide), str(Path(tmp) / "tiles.zarr"), str(args.tile_size), str(args.naive_tiles))
    ours_rate = ours["tiles"] / ours["seconds"]
    naive_rate = naive["tiles"] / naive["seconds"]
    print(f"slide: {slide}")
    print(
        f"target: {args.mpp} µm/px, {args.tile_size} px tiles "
        f"(level {ours['level']}, resize x{ours['resize_factor']:g})"
    )
    print(
        f"wsi-dala tiler : {ours['tiles']} tiles in {ours['seconds']:.1f} s = {ours_rate:.0f} tiles/s, "
        f"peak RSS {ours['peak_rss_mb']:.0f} MB ({args.reader_threads} reader threads, writes Zarr)"
    )
    print(
        f"naive loop     : {naive['tiles']} tiles in {naive['seconds']:.1f} s = {naive_rate:.0f} tiles/s, "
        f"peak RSS {naive['peak_rss_mb']:.0f} MB (one read_region per tile, no writing)"
    )
    print(f"speed-up       : {ours_rate / naive_rate:.2f}x")


if __name__ == "__main__":
    main()
