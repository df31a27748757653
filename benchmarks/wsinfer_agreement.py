"""Does the real WSInfer give our probabilities when it runs a model we exported?

    python benchmarks/wsinfer_agreement.py                         # 12,000 x 9,000 px synthetic SVS
    python benchmarks/wsinfer_agreement.py --slide my.svs --model my.safetensors

1. exports ``--model`` (default: the colour reference scorer, a transparent model whose probabilities
   spread from 0 to 1 on the synthetic slide's planted tumour) with ``wsi-dala export-model --format
   wsinfer``;
2. runs ``wsinfer run`` 0.6.1 on the slide with that folder's ``torchscript_model.pt`` and ``config.json``,
   in the WSInfer virtual environment that ``benchmarks/compare_wsinfer.py`` builds (offline: its own HOME
   with an empty zoo registry, ``HF_HUB_OFFLINE=1``);
3. reads WSInfer's patches (level-0 ``minx, miny, width, height``) with our reader, resizes them as our
   tiler does, and again as WSInfer does (so the pixels match), and scores them with
   ``wsi_dala.inference.scoring.score_tiles`` (fp32, torch);
4. prints, for each, the Spearman correlation of the positive-class probabilities, the max and median
   |Δp|, and the share of patches within 0.02 (targets: Spearman ≥ 0.99; within 0.02 where the pixels match).

The two tools decode JPEG with different libraries (WSInfer: tiffslide/imagecodecs through its own
reader; ours: the same or OpenSlide) and resize with different filters, so the pixels may differ slightly.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_wsinfer import (  # noqa: E402  (benchmarks/ is not a package)
    DATA,
    VENV,
    WORK,
    BenchmarkError,
    build_venv,
    slide_folder,
    wsinfer_command,
    wsinfer_env,
    wsinfer_works,
)


def wsinfer_patches(folder: Path, slides: Path, out: Path, env: dict[str, str]) -> list[dict[str, float]]:
    command = wsinfer_command(slides, out, folder / "torchscript_model.pt", folder / "config.json", 1, 32)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchmarkError(f"wsinfer run failed (exit {done.returncode}): {tail}")
    rows: list[dict[str, float]] = []
    for table in sorted((out / "model-outputs-csv").glob("*.csv")):
        with table.open(newline="") as handle:
            rows.extend({k: float(v) for k, v in row.items()} for row in csv.DictReader(handle))
    return rows


def our_probabilities(
    slide_path: Path, checkpoint: Path, rows: list[dict[str, float]], resize: str = "ours"
) -> np.ndarray:
    """Our positive-class probability of each WSInfer patch, read at level 0 and resized as our tiler does
    (``resize="ours"``) or as WSInfer's ``transforms.Resize`` does (``"wsinfer"``: Pillow's bilinear), so
    the model sees the same pixels."""
    from PIL import Image

    from wsi_dala.inference.scoring import score_tiles
    from wsi_dala.model import read_card
    from wsi_dala.slides.reader import Slide
    from wsi_dala.tiling.tiler import resize_tile

    card = read_card(checkpoint)
    size = card.tile_size_px

    def resized(region: np.ndarray) -> np.ndarray:
        if resize == "ours":
            return resize_tile(region, size)
        return np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR))

    with Slide(slide_path) as slide:
        tiles = np.stack(
            [
                resized(slide.read_region(int(r["minx"]), int(r["miny"]), 0, int(r["width"]), int(r["height"])))
                for r in rows
            ]
        )
    return score_tiles(tiles, str(checkpoint), "cpu", "fp32", batch_size=32)[:, card.positive_index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DATA / "synthetic_12000x9000_0.25.svs")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the colour reference scorer)")
    args = parser.parse_args()
    from scipy.stats import spearmanr

    from wsi_dala.interop.model_export import export_model
    from wsi_dala.model import read_card, write_untrained_checkpoint

    if not args.slide.exists():
        raise SystemExit(f"{args.slide}: not found (benchmarks/compare_wsinfer.py generates it)")
    env = wsinfer_env(WORK / "home")
    if not wsinfer_works(VENV, env):
        print(f"building WSInfer in {VENV} ...", file=sys.stderr, flush=True)
        build_venv(VENV, env, WORK / "venv-build.log")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = args.model or write_untrained_checkpoint(
            folder / "colour.safetensors", "colour-reference", tile_size_px=224, mpp=0.5
        )
        card = read_card(checkpoint)
        exported = folder / "wsinfer-model"
        export_model(checkpoint, exported, "wsinfer")
        rows = wsinfer_patches(exported, slide_folder(args.slide, folder / "slides"), folder / "results", env)
        if not rows:
            raise SystemExit("WSInfer found no patches")
        theirs = np.asarray([r[f"prob_{card.positive_class}"] for r in rows])
        ours = {how: our_probabilities(args.slide, checkpoint, rows, how) for how in ("ours", "wsinfer")}
    print(f"slide: {args.slide.name}; model: {card.architecture}, {card.tile_size_px} px at {card.mpp} µm/px")
    print(f"patches: {len(rows)}; positive probability spread (WSInfer): {theirs.min():.3f}-{theirs.max():.3f}")
    for how, label in (("ours", "our tiler's resize"), ("wsinfer", "WSInfer's resize (same pixels)")):
        difference = np.abs(theirs - ours[how])
        rho = spearmanr(theirs, ours[how]).statistic
        print(
            f"{label:31s}: Spearman {rho:.4f}; |Δp| max {difference.max():.4f}, median {np.median(difference):.5f}; "
            f"within 0.02: {100 * (difference <= 0.02).mean():.1f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
