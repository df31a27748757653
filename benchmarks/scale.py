"""Scale: stitch, tile export and region export of a 10^6-tile slide, with no slide and no model.

    python benchmarks/scale.py                     # 10^6 tiles: build the store, then time the stages
    python benchmarks/scale.py --tiles 100000      # a quick run
    python benchmarks/scale.py --keep /tmp/scale   # keep the store and the outputs (else a temp folder, removed)
    python benchmarks/scale.py --run-slides        # `wsi-dala run` on the 40k slide and on 4x its area

``--run-slides`` instead runs the real command, ``wsi-dala run`` (default settings, a random-weight
224 px DALAResNet50 at 0.5 µm/px), on the 40,000 x 30,000 px benchmark slide and on one of 4x its area
(80,000 x 60,000), each generated once into ``benchmarks/.data`` by ``benchmarks/tiling.py``'s
generator. A first run on a small slide exports and times the engines (once per checkpoint and
machine) so both measured runs start warm. It prints each run's seconds, tiles and peak RSS (the
process's ``ru_maxrss``) and the 4x slide's peak over the 1x slide's (target: within +10 %).

What it does:
1. builds a real tile store (``TileStore.create``, ``prepare_scores``, ``write_scores``, ``mark_complete``,
   ``mark_scores_complete``) of ``--tiles`` tiles as tiling and scoring would leave it: 224 px tiles at
   0.5 µm/px of a 0.25 µm/px slide (448 level-0 px), 7 x 7 CAM cells, chunks of 64 tiles, tiles in the
   tiler's block order on a square lattice with tissue-free holes and a ragged outline, a tissue mask at
   28 level-0 px per pixel, random scores and CAMs that make smooth tumour blobs with noise (and
   border-dimmed CAMs, as a CNN's are), a few QC-flagged patches. The tile pixels are never written
   (the Zarr array's fill value: no bytes on disk);
2. in a fresh process (so its peak memory is its own), runs what ``wsi_dala.runs.pipeline`` runs after
   scoring, in its order, with default settings: ``stitch`` → ``write_heatmap`` (heatmap.zarr) →
   ``write_heatmap_ngff`` (heatmap.ome.zarr) → tile
   detections GeoJSON → tumour region GeoJSON (``export_tiles`` and ``export_regions``, the two halves of
   ``export_qupath``); ``--render`` adds the overlay PNG over a blank thumbnail of the tiler's size;
3. prints the seconds of each stage, their total, the peak RSS of that process during each stage
   (sampled every 5 ms with psutil from this process: a thread inside it would wait for the GIL while
   numpy or GEOS run) and over the whole run (its ``ru_maxrss``), and the CPU.

Targets (the project's issue): stitch + export + regions of 10^6 tiles ≤ 120 s on 2 cores, peak RSS ≤ 2.5 GB;
``wsi-dala run``'s peak RSS on 4x the slide area within +10 % of the 1x slide's.
Timings are on this machine only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

SLIDE_MPP = 0.25  # level-0 µm/px (a 40x scan)
TILE_PX, TILE_L0, CAM_GRID = 224, 448, 7  # tiles at 0.5 µm/px; a ResNet's 7 x 7 feature map
MASK_DOWNSAMPLE = 28  # level-0 px per tissue-mask pixel: 16 mask px per tile side, as the tiler asks
CHUNK_TILES = 64  # TilingConfig's default
REGION_LEVEL_PX = 2048  # TilingConfig's default: the tiler's block is 2048 // 224 = 9 tiles across
TISSUE_SHARE = 0.8  # of the lattice: the rest is outline and holes
WRITE_ROWS = CHUNK_TILES * 1024  # rows per write while building (a whole number of chunks)
CLASSES = ["Non-tumor", "Tumor"]


def cpu_line() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(wanted) or 'none of avx2/avx512'}"


# ---------------------------------------------------------------------------------------------- the store


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, scaled to mean 0 and SD 1."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def tissue_lattice(rng: np.random.Generator, n_tiles: int) -> np.ndarray:
    """[side, side] bool with exactly ``n_tiles`` true: a rounded piece of tissue with holes."""
    side = int(np.ceil(np.sqrt(n_tiles / TISSUE_SHARE)))
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    radius = np.hypot(x - side / 2, y - side / 2) / (side / 2)
    score = 0.35 * smooth_field(rng, (side, side), side / 40) + 0.15 * smooth_field(rng, (side, side), 3) - radius**4
    order = np.argsort(-score, axis=None, kind="stable")[:n_tiles]
    lattice = np.zeros(side * side, dtype=bool)
    lattice[order] = True
    return lattice.reshape(side, side)


def border_attenuation(grid: int) -> np.ndarray:
    """A CNN's CAM profile over a tile: edges at 0.6, corners at 0.36 of the inside."""
    edge = np.where((np.arange(grid) == 0) | (np.arange(grid) == grid - 1), 0.6, 1.0)
    return np.outer(edge, edge)


def build_store(path: Path, n_tiles: int, seed: int) -> dict[str, Any]:
    """A complete, scored tile store of ``n_tiles`` tiles (see the module's docstring)."""
    from wsi_dala.tiling.grid import block_order
    from wsi_dala.tiling.store import TileStore
    from wsi_dala.tiling.store_records import QCRecord, ScoringRecord, SlideRecord, TilingRecord
    from wsi_dala.tissue.qc import BLUR, FOLD

    rng = np.random.default_rng(seed)
    lattice = tissue_lattice(rng, n_tiles)
    side = lattice.shape[0]
    iy, ix = np.nonzero(lattice)
    origins = np.stack([ix, iy], axis=1).astype(np.int64) * TILE_L0
    order = block_order(origins, (REGION_LEVEL_PX // TILE_PX) * TILE_L0)
    iy, ix, origins = iy[order], ix[order], origins[order]
    # Tiles with a tissue-free neighbour are partly glass.
    padded = np.pad(lattice, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    fraction = np.where(inner[iy, ix], 1.0, rng.uniform(0.25, 1.0, n_tiles)).astype(np.float32)
    width = height = side * TILE_L0
    slide = SlideRecord("synthetic.svs", "synthetic.svs", width, height, None, 40.0, (0, 0), {"size": 0})
    tiling = TilingRecord(
        slide=slide,
        reader="synthetic",
        slide_mpp=SLIDE_MPP,
        mpp_source="benchmark",
        target_mpp=0.5,
        effective_mpp=0.5,
        level=1,
        level_mpp=0.5,
        level_downsample=2.0,
        read_size_level_px=TILE_PX,
        resize_factor=1.0,
        tile_size_px=TILE_PX,
        tile_size_l0=float(TILE_L0),
        stride_px=TILE_PX,
        stride_l0=float(TILE_L0),
        min_tissue=0.25,
        tissue={},
        mask_downsample=float(MASK_DOWNSAMPLE),
        grid_tiles=side * side,
        tiling_key="benchmark",
    )
    per_tile = TILE_L0 // MASK_DOWNSAMPLE
    mask = np.repeat(np.repeat(lattice, per_tile, axis=0), per_tile, axis=1)
    store = TileStore.create(path, origins, fraction, tiling, CHUNK_TILES, tissue_mask=mask)
    del mask
    # QC: a few out-of-focus patches, and folds.
    qc_field = smooth_field(rng, (side, side), side / 60)[iy, ix]
    flags = np.where(qc_field > 2.3, BLUR, 0).astype(np.uint8)
    flags[qc_field < -2.6] |= FOLD
    blur = np.where((flags & BLUR) > 0, 0.7, 0.0).astype(np.float32)
    counts = {"blur": int(((flags & BLUR) > 0).sum()), "fold": int(((flags & FOLD) > 0).sum()), "ink": 0}
    qc = QCRecord("flag", 1.0, {**counts, "any": int((flags > 0).sum())}, {}, {"ink": 0, "fold": 0}, [240.0] * 3, {})
    store.mark_complete(blur, flags, qc)
    # Tumour: three smooth fields (large, middle, small blobs); probability = a noisy logistic of it.
    tumour = (
        smooth_field(rng, (side, side), side / 12)
        + 0.6 * smooth_field(rng, (side, side), side / 50)
        + 0.3 * smooth_field(rng, (side, side), 4)
    )
    tumour = (tumour - tumour.mean()) / tumour.std()
    logit = 4.0 * (tumour[iy, ix] - 1.0) + rng.normal(0.0, 1.0, n_tiles).astype(np.float32)
    probability = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    done = store.prepare_scores(len(CLASSES), CAM_GRID, "benchmark")
    attenuation = border_attenuation(CAM_GRID).astype(np.float32)
    offsets = (np.arange(CAM_GRID, dtype=np.float32) + 0.5) / CAM_GRID - 0.5  # cell centres, in tiles
    for start in range(0, n_tiles, WRITE_ROWS):
        rows = slice(start, min(n_tiles, start + WRITE_ROWS))
        y = iy[rows, None, None] + offsets[None, :, None]
        x = ix[rows, None, None] + offsets[None, None, :]
        y, x = np.broadcast_arrays(y, x)
        local = ndimage.map_coordinates(tumour, [y.ravel(), x.ravel()], order=1, mode="nearest").reshape(y.shape)
        noise = rng.gamma(16.0, 1 / 16.0, size=local.shape).astype(np.float32)
        cams = (np.maximum(local - 0.6, 0.0) * attenuation * noise).astype(np.float32)
        p = probability[rows]
        store.write_scores(start // CHUNK_TILES, np.stack([1 - p, p], axis=1), cams)
    done[:] = True
    store.mark_score_chunk_done(len(done) - 1, done)
    store.mark_scores_complete(ScoringRecord(CLASSES, "Tumor", CAM_GRID, "fp32"))
    return {"lattice": side, "tumour_tiles": int((probability >= 0.5).sum()), "flagged": int((flags > 0).sum())}


# ---------------------------------------------------------------------------------------------- the stages


STAGES = ("stitch", "write heatmap.zarr", "write .ome.zarr", "export tiles", "export regions", "render overlay")


def _timed(results: dict[str, Any], stage: Any, name: str, work: Callable[[], Any]) -> Any:
    """Run ``work`` as stage ``name``: its seconds go to ``results``; ``stage`` (shared with the parent,
    which samples this process's RSS) says which stage runs."""
    stage.value = STAGES.index(name)
    started = time.perf_counter()
    value = work()
    results["seconds"][name] = time.perf_counter() - started
    stage.value = -1
    print(f"  {name:18s} {results['seconds'][name]:8.2f} s")
    sys.stdout.flush()
    return value


def run_stages(store_path: str, out: str, render: bool, skip: tuple[str, ...], stage: Any) -> dict[str, Any]:
    """What the pipeline runs after scoring, in its order (run in a fresh process)."""
    from wsi_dala.core.config import PipelineConfig
    from wsi_dala.outputs.geojson import export_regions, export_tiles
    from wsi_dala.outputs.heatmap import stitch, write_heatmap
    from wsi_dala.outputs.ngff import write_heatmap_ngff
    from wsi_dala.outputs.overlay import render_overlay

    config = PipelineConfig()
    folder = Path(out)
    results: dict[str, Any] = {"seconds": {}}
    prior = border_attenuation(CAM_GRID)  # the model card's profile (the stitch's prior)
    heatmap = _timed(results, stage, "stitch", lambda: stitch(store_path, config.heatmap, prior))
    _timed(
        results,
        stage,
        "write heatmap.zarr",
        lambda: write_heatmap(heatmap, folder / "heatmap.zarr", config.heatmap, {"slide": "synthetic.svs"}),
    )
    _timed(
        results,
        stage,
        "write .ome.zarr",
        lambda: write_heatmap_ngff(heatmap, folder / "heatmap.ome.zarr", config.heatmap.min_level_px),
    )
    tiles_path = folder / "synthetic.tiles.geojson"
    if "tiles" not in skip:
        results["tiles_written"] = _timed(
            results, stage, "export tiles", lambda: export_tiles(store_path, heatmap, tiles_path, config.export)
        )
    regions_path = folder / "synthetic.tumour.geojson"
    if "regions" not in skip:
        results["regions"] = _timed(
            results, stage, "export regions", lambda: export_regions(heatmap, regions_path, config.export)[0]
        )
    if render:
        from wsi_dala.tiling.store import TileStore

        mask = TileStore(store_path).tissue_mask()
        assert mask is not None
        thumbnail = np.where(mask[..., None], np.array([200, 150, 190], np.uint8), np.uint8(240))  # H&E-ish on glass
        del mask
        _timed(
            results,
            stage,
            "render overlay",
            lambda: render_overlay(thumbnail, heatmap.tumour, folder / "overlay.png", "synthetic", heatmap.qc_flagged),
        )
    results["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    results["sizes"] = {p.name: p.stat().st_size for p in (tiles_path, regions_path) if p.exists()}
    results["cells"] = list(heatmap.tumour.shape)
    return results


def _child(store_path: str, out: str, render: bool, skip: tuple[str, ...], stage: Any, result_path: str) -> None:
    Path(result_path).write_text(json.dumps(run_stages(store_path, out, render, skip, stage)))


def _watch(process: multiprocessing.process.BaseProcess, stage: Any, limit_bytes: float) -> dict[str, int] | None:
    """Sample the child's RSS every 5 ms from here (a thread inside it would wait for the GIL while numpy
    or GEOS run): the peak per stage. Kills the child past ``limit_bytes`` (a guard for the machine) and
    returns None."""
    import psutil

    peaks: dict[str, int] = {}
    child = psutil.Process(process.pid)
    while process.is_alive():
        try:
            rss = child.memory_info().rss
        except psutil.NoSuchProcess:
            break
        index = stage.value
        if index >= 0:
            peaks[STAGES[index]] = max(peaks.get(STAGES[index], 0), rss)
        if rss > limit_bytes:
            process.kill()
            process.join()
            return None
        time.sleep(0.005)
    process.join()
    return peaks


# ------------------------------------------------------------------------------------- wsi-dala run, 1x and 4x

DATA = Path(__file__).resolve().parent / ".data"
RUN_SLIDES = ((40_000, 30_000), (80_000, 60_000))  # the benchmark slide and 4x its area
WARM_UP_SLIDE = (4_000, 3_000)


def benchmark_slide(width: int, height: int) -> Path:
    """``benchmarks/.data/synthetic_<W>x<H>_0.25.svs``, generated (minutes for the large ones) if missing."""
    path = DATA / f"synthetic_{width}x{height}_0.25.svs"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).resolve().parent / "tiling.py"
        command = [sys.executable, str(script), "--phase", "generate", str(path), str(width), str(height)]
        subprocess.run(command, check=True)
    return path


def run_measured(slide: Path, checkpoint: Path, out: Path) -> dict[str, Any]:
    """``wsi-dala run`` on ``slide`` in its own process: seconds, tiles and that process's peak RSS."""
    command = [sys.executable, "-m", "wsi_dala", "run", str(slide), "--model", str(checkpoint), "--out", str(out)]
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        _, status, usage = os.wait4(proc.pid, 0)
        output = proc.stdout.read() if proc.stdout is not None else ""
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = output.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"wsi-dala run {slide.name} failed (exit {proc.returncode}): {tail[0]}")
    record = json.loads((out / "run.json").read_text())
    return {"seconds": seconds, "tiles": record["counts"]["tiles"], "peak_rss": usage.ru_maxrss * 1024}


def run_slides(folder: Path) -> int:
    """``wsi-dala run`` on the 1x and 4x slides, warm; prints seconds, tiles and peak RSS of each."""
    from wsi_dala.model import write_untrained_checkpoint

    checkpoint = write_untrained_checkpoint(folder / "dala-untrained.safetensors")
    warm = run_measured(benchmark_slide(*WARM_UP_SLIDE), checkpoint, folder / "warm-up")
    print(f"warm-up (engine export and timing, once per checkpoint): {warm['seconds']:.0f} s")
    results = []
    for width, height in RUN_SLIDES:
        slide = benchmark_slide(width, height)
        result = run_measured(slide, checkpoint, folder / f"run-{width}x{height}")
        results.append(result)
        print(
            f"{width:,} x {height:,} px: {result['tiles']:6,} tiles in {result['seconds']:6.1f} s "
            f"({result['tiles'] / result['seconds']:.1f} tiles/s), peak RSS {result['peak_rss'] / 1e9:.2f} GB"
        )
    growth = results[-1]["peak_rss"] / results[0]["peak_rss"] - 1
    print(f"peak RSS on 4x the area: {100 * growth:+.1f} % (target: within +10 %, at most 2.5 GB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=1_000_000, help="tiles in the store (default: 10^6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="build and write here, and keep it")
    parser.add_argument("--store", type=Path, default=None, help="reuse this store (built by an earlier --keep)")
    parser.add_argument("--render", action="store_true", help="also render overlay.png (thumbnail size)")
    parser.add_argument(
        "--skip", action="append", default=[], choices=("tiles", "regions"), help="leave out a stage (repeatable)"
    )
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="kill the stages past this RSS")
    parser.add_argument(
        "--run-slides", action="store_true", help="instead: `wsi-dala run` on the 40k slide and on 4x its area"
    )
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_line()}")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="wsi-dala-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if args.run_slides:
            return run_slides(folder)
        store_path = args.store or folder / "tiles.zarr"
        if args.store is None:
            if store_path.exists():
                shutil.rmtree(store_path)
            started = time.perf_counter()
            built = build_store(store_path, args.tiles, args.seed)
            print(
                f"built {args.tiles:,} tiles ({built['lattice']} x {built['lattice']} lattice, "
                f"{built['tumour_tiles']:,} tumour, {built['flagged']:,} QC-flagged) in "
                f"{time.perf_counter() - started:.1f} s: {store_path}"
            )
        out = folder / "out"
        out.mkdir(exist_ok=True)
        result_path = folder / "stages.json"
        context = multiprocessing.get_context("spawn")
        stage = context.Value("i", -1, lock=False)
        child = context.Process(
            target=_child, args=(str(store_path), str(out), args.render, tuple(args.skip), stage, str(result_path))
        )
        child.start()
        peaks = _watch(child, stage, args.max_rss_gb * 2**30)
        if peaks is None:
            print(f"stages killed: RSS above {args.max_rss_gb} GiB")
            return 1
        if child.exitcode != 0:
            print(f"stages failed (exit code {child.exitcode})")
            return 1
        result = json.loads(result_path.read_text())
        seconds = result["seconds"]
        target = sum(value for name, value in seconds.items() if name != "render overlay")
        size = result["sizes"].get("synthetic.tiles.geojson", 0) / 1e6
        print(f"tiles: {args.tiles:,}   map: {result['cells'][0]} x {result['cells'][1]} cells   ", end="")
        print(f"regions: {result.get('regions', '-')}   tile GeoJSON: {size:.0f} MB")
        for name, value in seconds.items():
            print(f"{name:20s} {value:8.2f} s   peak RSS {peaks.get(name, 0) / 2**30:5.2f} GiB")
        print(
            f"{'total (no render)':20s} {target:8.2f} s   peak RSS {result['ru_maxrss'] / 2**30:5.2f} GiB (ru_maxrss)"
        )
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
