"""Per-tile DT Grad-CAM figures: image | Grad-CAM | DT Grad-CAM, side by side, one PNG per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from wsi_dala.core.errors import ConfigError
from wsi_dala.core.fileio import save_png_atomic
from wsi_dala.core.layout import cam_figure
from wsi_dala.explain.cam import dt_gradcam, logits_and_raw_cams
from wsi_dala.explain.threshold import CamSettings
from wsi_dala.model import load_checkpoint
from wsi_dala.model.devices import normalise
from wsi_dala.model.interface import has_feature_map

MIN_PANEL_PX = 224  # narrower tiles are shown enlarged


def load_tile(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: centre crop if larger, resized if smaller."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read image ({exc})") from exc
    w, h = image.size
    if w < size or h < size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    else:
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image)


def colourise(values: np.ndarray, base: np.ndarray, alpha: float = 0.5, where: np.ndarray | None = None) -> np.ndarray:
    """Blend a [0, 1] map (jet) over an RGB image; optionally only where ``where`` is true."""
    coloured = (colormaps["jet"](values)[..., :3] * 255).astype(np.float32)
    blend = (1 - alpha) * base.astype(np.float32) + alpha * coloured
    if where is not None:
        blend = np.where(where[..., None], blend, base)
    return blend.astype(np.uint8)


def write_cam_figures(
    images: list[Path], checkpoint: Path, out_dir: Path, settings: CamSettings, batch_size: int = 16
) -> list[tuple[Path, float, float]]:
    """Write one PNG per image; returns (png, tumour probability, τ) per image."""
    model, card = load_checkpoint(checkpoint)
    if not has_feature_map(model):
        raise ConfigError(
            f"{checkpoint}: {card.architecture} has no spatial feature map, so DT Grad-CAM is not defined"
        )
    size = card.tile_size_px
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(images), batch_size):
        paths = images[start : start + batch_size]
        tiles = np.stack([load_tile(p, size) for p in paths])
        batch = normalise(
            torch.from_numpy(tiles).permute(0, 3, 1, 2), card.normalisation["mean"], card.normalisation["std"]
        )
        logits, raw = logits_and_raw_cams(model, batch, card.positive_index)
        probabilities = torch.softmax(logits, 1)[:, card.positive_index].numpy()
        cams = dt_gradcam(raw, size, settings)
        for i, path in enumerate(paths):
            panels = [
                tiles[i],
                colourise(cams.gradcam[i], tiles[i]),
                colourise(cams.maps[i], tiles[i], where=cams.masks[i]),
            ]
            figure = Image.fromarray(np.concatenate(panels, axis=1))
            if size < MIN_PANEL_PX:  # small tiles enlarged whole-pixel, so the title fits and a cell shows
                scale = -(-MIN_PANEL_PX // size)
                figure = figure.resize((figure.width * scale, figure.height * scale), Image.Resampling.NEAREST)
            canvas = Image.new("RGB", (figure.width, figure.height + 30), "white")
            canvas.paste(figure, (0, 30))
            draw = ImageDraw.Draw(canvas)
            title = f"image | Grad-CAM | DT Grad-CAM ({settings.method}, tau={cams.thresholds[i]:.2f})"
            draw.text((4, 3), title, fill="black")
            draw.text((4, 16), f"p({card.positive_class}) = {probabilities[i]:.3f}", fill="black")
            target = cam_figure(out_dir, path)
            save_png_atomic(target, canvas)
            written.append((target, float(probabilities[i]), float(cams.thresholds[i])))
    return written
