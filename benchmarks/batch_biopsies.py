"""An archive of small biopsies through `wsi-dala batch` and through WSInfer 0.6.1: slides per hour.

    python benchmarks/batch_biopsies.py                    # 50 generated biopsies, 2,000-10,000 px at 0.25 µm/px
    python benchmarks/batch_biopsies.py --slides 12        # a quicker check
    python benchmarks/batch_biopsies.py --dala-args "--precision fp32"

Most clinical slides are small, so per-slide fixed cost (start-up, model load, engine choice, outputs) decides
an archive's throughput more than tiles/s. Both tools get the whole folder in one command: ``wsi-dala batch
DIR --model CKPT --out OUT`` (one process: imports, model and engine choice once) and ``wsinfer run --wsi-dir
DIR`` (also one process). Same model size (ResNet50-class, random weights, 224 px at 0.5 µm/px), same batch
size; WSInfer runs from its own virtual environment, built and described as in ``compare_wsinfer.py`` (whose
helpers this uses). Slides are written once under ``benchmarks/.data/biopsies-<N>`` by the synthetic generator
(sizes drawn with a fixed seed); both tools start from fresh output folders and from a checkpoint whose engine
files are already cached (a run of one slide first), so the figure is the steady state of a lab's archive.
Prints each tool's wall seconds, slides/hour, tiles/s and peak RSS, and the ratio, with the CPU flags.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_wsinfer import (  # benchmarks/ is put on sys.path above
    DATA,
    VENV,
    WORK,
    BenchmarkError,
    build_venv,
    cpu_description,
    dala_command,
    run_wsinfer,
    timed,
    write_dala_checkpoint,
    write_wsinfer_model,
    wsinfer_env,
    wsinfer_works,
)

MIN_PX, MAX_PX = 2_000, 10_000


def write_biopsies(folder: Path, count: int) -> list[Path]:
    """``count`` small slides at 0.25 µm/px, each side drawn from MIN_PX..MAX_PX (seeded: the same archive
    every time); reused when the folder already holds them."""
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(50)
    paths = []
    for number in range(count):
        width, height = rng.randint(MIN_PX, MAX_PX), rng.randint(MIN_PX, MAX_PX)
        path = folder / f"biopsy_{number:03d}.svs"
        if not path.exists():
            spec = SyntheticSlideSpec(width=width, height=height, mpp=0.25, seed=1000 + number, label_px=32)
            write_synthetic_slide(path.with_suffix(".partial.svs"), spec)
            path.with_suffix(".partial.svs").replace(path)
        paths.append(path)
    return paths


def tiles_of_batch(out: Path) -> int:
    import json

    return sum(int(json.loads(p.read_text())["counts"]["tiles"]) for p in out.rglob("run.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=50, help="biopsies in the archive (default: 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="WSInfer's batch size (wsi-dala's default: 32)")
    parser.add_argument("--wsinfer-workers", type=int, default=2, help="WSInfer's -n (DataLoader workers)")
    parser.add_argument("--dala-args", default="", help="extra `wsi-dala batch` flags (default: none)")
    parser.add_argument("--skip-wsinfer", action="store_true", help="time wsi-dala only")
    args = parser.parse_args()

    name, has, lacks = cpu_description()
    print(f"CPU: {name}; has {' '.join(has) or 'none'}; lacks {' '.join(lacks) or 'none'}", flush=True)
    slides = write_biopsies(DATA / f"biopsies-{args.slides}", args.slides)
    work = WORK / "biopsies"
    models = WORK / "models"
    checkpoint = write_dala_checkpoint(models)
    base = dala_command()
    warm = work / "dala-warm"
    shutil.rmtree(warm, ignore_errors=True)
    one = work / "one-slide"
    one.mkdir(parents=True, exist_ok=True)
    shutil.copy(slides[0], one / slides[0].name)
    timed([*base, "batch", str(one), "--model", str(checkpoint), "--out", str(warm), "-q"], None, warm / "log")

    results = []
    out = work / "dala"
    shutil.rmtree(out, ignore_errors=True)
    command = [*base, "batch", str(slides[0].parent), "--model", str(checkpoint), "--out", str(out), "-q"]
    command += shlex.split(args.dala_args)  # batch takes scoring settings from --config: its batch size is 32
    seconds, rss = timed(command, None, work / "dala.log")
    results.append(("wsi-dala batch", seconds, tiles_of_batch(out), rss))
    if not args.skip_wsinfer:
        env = wsinfer_env(WORK / "home")
        if not wsinfer_works(VENV, env):
            print("building the WSInfer venv (once)...", file=sys.stderr, flush=True)
            build_venv(VENV, env, WORK / "venv-build.log")
        model, config = write_wsinfer_model(VENV, models, env)
        out = work / "wsinfer"
        shutil.rmtree(out, ignore_errors=True)
        run = run_wsinfer(slides[0].parent, out, model, config, args.wsinfer_workers, args.batch_size, env)
        results.append(("WSInfer 0.6.1", run.seconds, run.patches, run.peak_rss_mb))

    print(f"{len(slides)} biopsies, {MIN_PX}-{MAX_PX} px a side at 0.25 µm/px; batch size {args.batch_size}")
    print(f"{'tool':<16} {'wall s':>8} {'slides/hour':>12} {'tiles':>7} {'tiles/s':>8} {'peak RSS MB':>12}")
    for tool, wall, tiles, peak in results:
        print(f"{tool:<16} {wall:8.1f} {3600 * len(slides) / wall:12.0f} {tiles:7d} {tiles / wall:8.1f} {peak:12.0f}")
    if len(results) == 2:
        print(f"wsi-dala / WSInfer, slides per hour: {results[1][1] / results[0][1]:.1f}x")


if __name__ == "__main__":
    started = time.perf_counter()
    try:
        main()
    except BenchmarkError as exc:
        sys.exit(f"batch_biopsies: {exc}")
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
