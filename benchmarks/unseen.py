"""Train on two slides of one source, run on a slide of another: does the output hold on slides nobody here made?

    python benchmarks/unseen.py                        # every pair of the two generators, then the real CMU-1 crop
    python benchmarks/unseen.py --pairs gen2:gen2      # one pair (train:run)
    python benchmarks/unseen.py --keep DIR             # keep slides, models and runs (to look at the pictures)

Sources: ``gen1`` is :mod:`wsi_dala.slides.synthetic` (flat colours, round nuclei, 0.25 µm/px); ``gen2`` is
:mod:`wsi_dala.slides.synthetic_texture` (a mosaic of real H&E: CMU-1 skin as normal tissue, a TCGA carcinoma and a
lung adenocarcinoma as tumour, 0.5 µm/px; other shapes, other markers). Each pair runs what a new user would:

    wsi-dala train --slide A.svs=A.geojson --slide B.svs=B.geojson --unannotated-class Non-tumor \\
        --mpp 0.5 --input-size 128 --epochs 6 --pretrained none --out model
    wsi-dala run C.svs --model model/best.safetensors --out run          # default settings

and prints, against C's planted truth: region IoU (outside marker ink), tile AUC, tile ECE at the card's
temperature and at T = 1 (with the card's T), the seam index and tile-period power of the tumour layer, the
mean distance between exported and planted outlines (and half a tile, the target), and the share of tiles QC
flags out of focus where nothing was blurred. Then the gen2 model on the real CMU-1 crop (no tumour truth:
tiles, QC false-blur rate, tumour called). Timings are this machine's; every figure of a pair is from one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tissue import cpu_flags  # noqa: E402  (benchmarks/ is on sys.path when this runs as a script)

from wsi_dala.core.layout import annotations_beside  # noqa: E402
from wsi_dala.runs.truth import (  # noqa: E402
    PlantedSlide,
    TileTruth,
    outline_distance_um,
    tumour_iou,
    write_truth_annotations,
)
from wsi_dala.tiling.grid import tissue_fractions  # noqa: E402
from wsi_dala.tiling.store import TileStore  # noqa: E402
from wsi_dala.tissue.qc import BLUR  # noqa: E402

TEXTURES = ROOT / "tests" / "data" / "textures" / "textures.json"
CMU = ROOT / "tests" / "data" / "cmu_small_region.svs"
TRAIN = ["--unannotated-class", "Non-tumor", "--mpp", "0.5", "--input-size", "128", "--epochs", "6",
         "--pretrained", "none"]  # fmt: skip


def write_slide(source: str, path: Path, seed: int, role: str) -> PlantedSlide:
    """A slide of ``source``; the case to run carries markers (gen1: its own, gen2: a dull red and navy)."""
    if source == "gen1":
        from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

        size = (12288, 9216) if role == "case" else (8192, 6144)
        spec = SyntheticSlideSpec(width=size[0], height=size[1], mpp=0.25, seed=seed, tumour_regions=4)
        return write_synthetic_slide(path, spec)
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide

    textures = load_textures(TEXTURES, 0.5)
    markers = ("dull-red", "navy") if role == "case" else ()
    size = (7200, 5760) if role == "case" else (8400, 6720)
    spec = TextureSlideSpec(width=size[0], height=size[1], seed=seed, markers=markers, thin_markers=True)
    return write_texture_slide(path, textures["normal"], textures["tumour"], spec)


def wsi_dala(*args: str) -> float:
    """Run the CLI as a user would; seconds taken. Fails loudly."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "wsi_dala", *args, "-q"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"wsi-dala {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def train(source: str, folder: Path, seed: int) -> tuple[Path, float]:
    slides = []
    for number in (1, 2):
        slide = write_slide(source, folder / f"{source}-train{number}.svs", seed + number, "train")
        write_truth_annotations(slide, annotations_beside(slide.path))
        slides += ["--slide", f"{slide.path}={annotations_beside(slide.path)}"]
    seconds = wsi_dala("train", *slides, *TRAIN, "--out", str(folder / f"model-{source}"))
    return folder / f"model-{source}" / "best.safetensors", seconds


def measure(slide: PlantedSlide, run: Path) -> dict[str, float | None]:
    record = json.loads((run / "run.json").read_text())
    regions = run / f"{slide.path.stem}.tumour.geojson"
    truth = TileTruth.of_store(slide, run / "tiles.zarr")
    store = TileStore(run / "tiles.zarr")
    blur_truth = getattr(slide, "blur", None)
    blurred = (store.qc_flags() & BLUR) > 0
    if blur_truth is not None and blur_truth.any():
        cover = tissue_fractions(blur_truth, float(slide.label_px), store.coords(), store.info.tile_size_l0)
        blurred = blurred[cover == 0]
    tile_um = store.info.tile_size_l0 * store.info.slide_mpp
    return {
        "region IoU": tumour_iou(slide, regions),
        "tile AUC": truth.auc(),
        "ECE (card T)": truth.ece(),
        "ECE (T = 1)": truth.ece(1.0),
        "card T": truth.temperature,
        "seam index": record["heatmap"].get("seam_index"),
        "tile-period power": record["heatmap"].get("tile_period_power"),
        "outline distance µm": outline_distance_um(slide, regions),
        "half a tile µm": tile_um / 2,
        "QC false blur %": 100 * float(blurred.mean()) if blurred.size else None,
    }


def real_slide(model: Path, folder: Path) -> dict[str, float]:
    run = folder / "run-cmu"
    wsi_dala("run", str(CMU), "--model", str(model), "--out", str(run))
    record = json.loads((run / "run.json").read_text())
    flagged = record["qc"]["tiles_flagged"]
    return {
        "tiles": record["counts"]["tiles"],
        "QC false blur %": 100 * flagged["blur"] / max(1, record["counts"]["tiles"]),
        "not judged %": 100 * flagged.get("blur_not_judged", 0) / max(1, record["counts"]["tiles"]),
        "tiles called tumour": record["counts"]["tumour_tiles"],
    }


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["gen1:gen1", "gen2:gen2", "gen1:gen2", "gen2:gen1"])
    parser.add_argument("--seed", type=int, default=40)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep everything in (default: a temp dir)")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_flags()}")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="unseen-"))
    folder.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {}
    rows = []
    for pair in args.pairs:
        train_source, case_source = pair.split(":")
        if train_source not in models:
            models[train_source], seconds = train(train_source, folder, args.seed)
            print(f"trained on two {train_source} slides in {seconds:.0f} s")
        case = write_slide(case_source, folder / f"{case_source}-case.svs", args.seed + 10, "case")
        run = folder / f"run-{train_source}-on-{case_source}"
        seconds = wsi_dala("run", str(case.path), "--model", str(models[train_source]), "--out", str(run))
        figures = measure(case, run)
        rows.append((pair, figures))
        print(f"{pair}: run in {seconds:.0f} s; " + ", ".join(f"{k} {fmt(v)}" for k, v in figures.items()))
    names = list(rows[0][1]) if rows else []
    print("\n| train → run | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for pair, figures in rows:
        print(f"| {pair.replace(':', ' → ')} | " + " | ".join(fmt(figures[n]) for n in names) + " |")
    if "gen2" in models:
        print(f"\nReal slide (CMU-1 crop, no tumour truth), the gen2 model: {real_slide(models['gen2'], folder)}")
    print(f"\neverything is in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
