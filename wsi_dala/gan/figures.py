"""Pictures of a GAN run: its curves (losses, ADA's p, KID) and a grid of generated tiles per class."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from wsi_dala.core.fileio import atomic_open, save_png_atomic
from wsi_dala.core.layout import generated_tile_name
from wsi_dala.gan.networks import Generator, generate

GRID_COLUMNS = 8


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_gan_curves(
    path: Path, rows: list[dict[str, float]], kids: list[tuple[int, float, float]], kid_label: str
) -> None:
    steps = np.array([r["step"] for r in rows], dtype=float)
    window = max(1, len(rows) // 50)
    fig = Figure(figsize=(14, 4.4))
    losses, ada, quality = fig.subplots(1, 3)
    for key, label in (("loss_d", "discriminator"), ("loss_g", "generator")):
        values = _smoothed(np.array([r[key] for r in rows]), window)
        losses.plot(steps[len(steps) - len(values) :], values, label=label)
    losses.set(xlabel="step", ylabel="loss", title=f"Losses (moving mean of {window} steps)")
    losses.legend()
    ada.plot(steps, [r["ada_p"] for r in rows], color="tab:purple", label="augmentation p")
    signs = _smoothed(np.array([r["r_t_real_sign"] for r in rows]), window)
    ada.plot(steps[len(steps) - len(signs) :], signs, color="tab:gray", alpha=0.7, label="r_t = E[sign D(real)]")
    ada.axhline(0.6, color="tab:gray", linestyle=":", label="r_t target")
    ada.set(xlabel="step", ylim=(-1.05, 1.05), title="Adaptive augmentation")
    ada.legend(loc="lower right")
    if kids:
        quality.errorbar(
            [k[0] for k in kids], [k[1] for k in kids], yerr=[k[2] for k in kids], fmt="o-", color="tab:red", capsize=3
        )
        quality.axhline(0, color="tab:gray", linewidth=0.8)
        title = "\n".join(textwrap.wrap(f"KID in the features of {kid_label}", 48)[:3])
        quality.set(xlabel="step", ylabel="KID ± SD over subsets (lower is closer to real)", title=title)
    else:
        quality.text(0.5, 0.5, "no KID measured\n(--kid-encoder or --kid-inception)", ha="center", va="center")
        quality.set_axis_off()
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def sample_grid(path: Path, generator: Generator, class_names: list[str], trained: list[str], seed: int) -> None:
    """One row of ``GRID_COLUMNS`` tiles per trained class (an untrained class's row would be noise), the
    same latents at every checkpoint (progress shows); tiles enlarged to at least 96 px so a person can
    see their texture."""
    device = next(generator.parameters()).device
    shown = [name for name in class_names if name in trained]
    rows = [generate(generator, class_names.index(name), GRID_COLUMNS, seed=seed + 7, device=device) for name in shown]
    tile = generator.shape.resolution
    scale = max(1, -(-96 // tile))
    side, label_w = tile * scale, 110
    canvas = Image.new("RGB", (label_w + GRID_COLUMNS * (side + 4), len(rows) * (side + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, tiles) in enumerate(zip(shown, rows, strict=True)):
        draw.text((6, r * (side + 4) + side // 2 - 6), name[:16], fill="black")
        for c, image in enumerate(tiles):
            pixels = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(pixels, (label_w + c * (side + 4), r * (side + 4)))
    save_png_atomic(path, canvas)


def tiles_to_pngs(tiles: torch.Tensor, folder: Path, class_name: str, seed: int) -> list[str]:
    """uint8 [N, 3, H, W] as PNG files named by :func:`wsi_dala.core.layout.generated_tile_name`; returns the names."""
    names = []
    for i, image in enumerate(tiles):
        name = generated_tile_name(class_name, seed, i)
        save_png_atomic(folder / name, Image.fromarray(image.permute(1, 2, 0).numpy()))
        names.append(name)
    return names
