"""How soon `wsi-dala run` reads its first tile, and its fixed cost on a small slide, through the CLI.

    python benchmarks/first_tile.py                      # tests/data/cmu_small_region.svs (real H&E, 58 tiles)
    python benchmarks/first_tile.py --slide my.svs --model my.safetensors

Starts ``wsi-dala run`` as a new process three times on fresh output folders: the first run of a checkpoint
(an empty engine cache and user cache: export, check against fp32, choice), then two warm runs. While each
runs it watches the output folder and prints the seconds from the process's start to the first tile chunk on
disk (which the tiler writes after reading, cutting and QC-ing that chunk's tiles), to the first scores on disk,
and to the process's end; and ``wsi-dala --help``'s time. Without --model an untrained DALAResNet50 (224 px
at 0.5 µm/px) stands in. Run on an idle machine: another process on the cores moves every figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SLIDE = Path(__file__).resolve().parent.parent / "tests" / "data" / "cmu_small_region.svs"


def _first_file(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def timed_run(command: list[str], out: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds from the start to the first tile chunk, the first score chunk and the end of ``command``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    watched = {"first tile chunk on disk": "tiles/c", "first scores on disk": "scores/c"}
    while process.poll() is None:
        for label, below in watched.items():
            if label not in seen and any(_first_file(p / below) for p in out.glob("*tiles.zarr*")):
                seen[label] = time.perf_counter() - started
        time.sleep(0.01)
    seen["process end"] = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read()}")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=SLIDE, help="slide (default: the CMU-1 small region)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: untrained DALAResNet50)")
    args = parser.parse_args()

    from tissue import cpu_flags

    from wsi_dala.model import write_untrained_checkpoint

    executable = str(Path(sys.executable).with_name("wsi-dala"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = args.model or write_untrained_checkpoint(root / "dala-untrained.safetensors")
        env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache"), "WSI_DALA_ENGINE_CACHE": str(root / "engines")}
        started = time.perf_counter()
        subprocess.run([executable, "--help"], env=env, check=True, capture_output=True)
        help_s = time.perf_counter() - started
        print(f"{os.cpu_count()} cores, CPU {cpu_flags()}; slide {args.slide.name}")
        print(f"wsi-dala --help: {help_s:.2f} s")
        for attempt in ("first run of the checkpoint", "warm run 1", "warm run 2"):
            out = root / attempt.replace(" ", "-")
            command = [executable, "run", str(args.slide), "--model", str(checkpoint), "--out", str(out), "-q"]
            seen = timed_run(command, out, env)
            print(f"{attempt}: " + ", ".join(f"{label} {s:.2f} s" for label, s in seen.items()))


if __name__ == "__main__":
    main()
