"""Where one `wsi-dala run` spends its time: seconds per step of tiling and scoring, and how busy each core was.

    python benchmarks/profile_run.py                       # a generated 16,000 x 12,000 SVS at 0.25 µm/px
    python benchmarks/profile_run.py --size 40000x30000    # the large slide of benchmarks/run.py
    python benchmarks/profile_run.py --slide my.svs --model my.safetensors

Runs ``run_slide`` twice in one process on a fresh output folder each time: the first run of the checkpoint
(engine export, check against fp32, choice) and a warm one. For the warm run it prints, per step
(``wsi_dala.core.step_times``), the wall seconds summed over the threads that ran it, their own CPU seconds
and the CPU milliseconds per tile (a thread's own: an engine's worker threads are not in its step, so for the
engine read the wall time); then each core's busy share over the run (from /proc/stat), the bare
engine's rate in the same process, batch size and threads (forward pass only, tiles decoded in memory), and
the non-engine CPU milliseconds per tile. Steps nest: "model" holds "engine"; "chunk tasks" hold reads, Dask,
model and writes. Without --model an untrained DALAResNet50 (224 px at 0.5 µm/px) stands in: speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parent / ".data"


class CoreSampler:
    """Each core's busy share over a block, from /proc/stat's per-CPU counters (Linux), sampled every
    ``interval_s``; ``shares`` holds, per core, the busy share of every interval."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.shares: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _counters() -> list[tuple[int, int]]:
        rows = []
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]  # idle + iowait
                rows.append((sum(values), idle))
        return rows

    def _sample(self) -> None:
        before = self._counters()
        self.shares = [[] for _ in before]
        while not self._stop.wait(self.interval_s):
            now = self._counters()
            for core, ((total0, idle0), (total1, idle1)) in enumerate(zip(before, now, strict=True)):
                elapsed = total1 - total0
                self.shares[core].append(1.0 - (idle1 - idle0) / elapsed if elapsed else 0.0)
            before = now

    def __enter__(self) -> CoreSampler:
        if Path("/proc/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> str:
        if not self.shares or not self.shares[0]:
            return "core use: not measured (no /proc/stat)"
        means = [sum(s) / len(s) for s in self.shares]
        both = sum(all(s[i] >= 0.8 for s in self.shares) for i in range(len(self.shares[0]))) / len(self.shares[0])
        cores = ", ".join(f"core {i} {100 * m:.0f} %" for i, m in enumerate(means))
        return f"core use (whole machine): {cores}; every core >= 80 % busy in {100 * both:.0f} % of the run"


def bare_engine(checkpoint: Path, store: Path, backend: dict, batch_size: int, n_tiles: int) -> tuple[float, float]:
    """The engine the run chose, alone: tiles/s and process CPU ms per tile (its worker threads included),
    forward pass only, on the run's own tiles decoded into memory first."""
    from wsi_dala.inference.engines import BackbonePlan, load_backbone
    from wsi_dala.inference.scoring import cached_model, prepared_images
    from wsi_dala.tiling.store import TileStore

    model, card = cached_model(str(checkpoint), "cpu")
    plan = BackbonePlan(backend["engine"], backend["precision"], backend.get("model_file"), backend["threads"])
    backbone = load_backbone(plan, model, "cpu")
    tiles = TileStore(store)
    n = min(n_tiles, tiles.info.n_tiles)
    starts = range(0, n, batch_size)
    batches = [prepared_images(tiles.tiles(slice(s, min(s + batch_size, n))), card, "cpu") for s in starts]
    backbone(batches[0])  # warm-up
    before, started = os.times(), time.perf_counter()
    for batch in batches:
        backbone(batch)
    wall, after = time.perf_counter() - started, os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return n / wall, 1000 * cpu / n


def print_steps(steps: dict, n_tiles: int, run_started: float, wall_s: float) -> None:
    print(f"{'step':<76} {'wall s':>8} {'CPU s':>8} {'CPU ms/tile':>12} {'first at s':>10}")
    for name, total in sorted(steps.items(), key=lambda item: item[1].first_started):
        first = total.first_started - run_started
        print(
            f"{name:<76} {total.wall_s:8.2f} {total.cpu_s:8.2f} {1000 * total.cpu_s / max(n_tiles, 1):12.2f} "
            f"{first:10.2f}"
        )
    print(f"{'run_slide, wall':<76} {wall_s:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="a slide of your own (default: generated)")
    parser.add_argument("--size", default="16000x12000", help="generated slide's W x H at 0.25 µm/px")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: untrained DALAResNet50)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="auto", help="scoring.backend (default: auto)")
    parser.add_argument("--precision", default="auto", help="scoring.precision (default: auto)")
    parser.add_argument("--bare-tiles", type=int, default=320, help="tiles for the bare engine's rate")
    args = parser.parse_args()

    from tiling import phase_generate
    from tissue import cpu_flags

    from wsi_dala.core.config import PipelineConfig, ScoringConfig
    from wsi_dala.core.step_times import recording
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.runs.pipeline import run_slide

    width, height = (int(v) for v in args.size.lower().split("x"))
    slide = args.slide or DATA / f"synthetic_{width}x{height}_0.25.svs"
    if not slide.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        phase_generate(slide, width, height)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model or write_untrained_checkpoint(Path(tmp) / "dala-untrained.safetensors")
        scoring = ScoringConfig(batch_size=args.batch_size, backend=args.backend, precision=args.precision)
        config = PipelineConfig(model=str(checkpoint), scoring=scoring)
        walls, first_setup = [], {}
        for attempt in ("first", "warm"):
            with recording() as steps, CoreSampler() as cores:
                cpu_before, started = os.times(), time.perf_counter()
                summary = run_slide(slide, Path(tmp) / attempt, config, progress=False)
                wall = time.perf_counter() - started
                cpu_after = os.times()
            walls.append(wall)
            if attempt == "first":
                setup_steps = ("scoring: setup", "scoring setup")
                first_setup = {name: total for name, total in steps.items() if name.startswith(setup_steps)}
        process_cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        record = summary.record
        backend = record.scoring["backend"]
        bare, engine_cpu_ms = bare_engine(
            checkpoint, summary.layout.tiles_store, backend, args.batch_size, args.bare_tiles
        )
    n = record.counts.tiles
    print(
        f"slide {slide.name}: {n} tiles at {record.resolution.tile_mpp} µm/px; "
        f"engine {backend['engine']} {backend['precision']}, "
        f"{backend['threads']} threads; {os.cpu_count()} cores, CPU {cpu_flags()}"
    )
    print(f"first run of the checkpoint {walls[0]:.1f} s; warm run {walls[1]:.1f} s ({n / walls[1]:.1f} tiles/s)")
    for name, total in first_setup.items():
        print(f"  first run, {name}: {total.wall_s:.2f} s")
    print()
    print("warm run, by step:")
    print_steps(steps, n, started, walls[1])
    print(f"\nprocess CPU {process_cpu:.1f} s in {walls[1]:.1f} s wall = {process_cpu / walls[1]:.2f} cores busy")
    print(cores.summary())
    print(
        f"bare engine: {bare:.1f} tiles/s, {engine_cpu_ms:.1f} CPU ms a tile (same process, batch {args.batch_size}, "
        f"{backend['threads']} threads); end to end {n / walls[1]:.1f} tiles/s = {n / walls[1] / bare:.2f}x it"
    )
    other_ms = (1000 * process_cpu - n * engine_cpu_ms) / max(n, 1)
    print(f"non-engine CPU per tile: {other_ms:.1f} ms (the run's process CPU less the bare engine's per tile)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
