"""What the viewer draws over the slide: each heatmap layer as one transparent PNG at the map's own cell size
(the browser scales it onto the slide, smoothing between cells as ``overlay.png`` does), its colour bar, and
a tile's measurements and Grad-CAM on a click.

A layer is one image, not a tile pyramid: a 40,000 x 30,000 slide at 16 µm cells is a 1,250 x 940 image
(about 1 MB), painted at once at every zoom; the slide itself is what needs Deep Zoom tiles.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from wsi_dala.core.errors import OutputError
from wsi_dala.tiling.store import TileStore


@dataclass(frozen=True)
class LayerStyle:
    colour_map: str
    label: str
    top: float | None  # None: the 99th percentile of the layer (at least 2): attention


STYLES = {
    "tumour": LayerStyle("inferno", "tumour probability", 1.0),
    "probability": LayerStyle("inferno", "tile tumour probability", 1.0),
    "uncertainty": LayerStyle("viridis", "probability SD", 0.5),
    "qc_flagged": LayerStyle("cool", "share of QC-flagged tiles", 1.0),
    "attention": LayerStyle("viridis", "MIL attention (x even share)", None),
}


@dataclass(frozen=True)
class LayerImage:
    png: bytes
    top: float
    style: LayerStyle


def heatmap_layers(heatmap_store: Path) -> tuple[list[str], float]:
    """The layers a heatmap store holds (in its order) and its level-0 cell size in slide pixels."""
    try:
        group = zarr.open_group(heatmap_store, mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:  # a damaged or missing store: named
        raise OutputError(f"{heatmap_store}: not a readable heatmap ({exc})") from exc
    layers = attrs.get("layers")
    names = [name for name in layers if name in STYLES] if isinstance(layers, dict) else []
    cell = attrs.get("cell_l0")
    if not isinstance(cell, (int, float)):
        raise OutputError(f"{heatmap_store}: no cell size in its attributes")
    return names, float(cell)


def render_layer(heatmap_store: Path, name: str) -> LayerImage:
    """The layer's level 0 as an RGBA PNG: coloured by its colour map, transparent where it has no value; low
    values fainter (as in overlay.png), so the tissue shows through."""
    from matplotlib import colormaps

    style = STYLES[name]
    values = np.asarray(zarr.open_array(Path(heatmap_store) / name / "0", mode="r")[:], dtype=np.float32)
    finite = np.isfinite(values)
    top = style.top
    if top is None:
        top = max(2.0, float(np.percentile(values[finite], 99))) if finite.any() else 2.0
    scaled = np.clip(np.nan_to_num(values, nan=0.0) / top, 0.0, 1.0)
    rgba = (colormaps[style.colour_map](scaled) * 255).astype(np.uint8)
    alpha = np.where(finite, 0.25 + 0.75 * scaled, 0.0) if name != "qc_flagged" else np.where(scaled >= 0.5, 0.8, 0.0)
    rgba[..., 3] = (alpha * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", optimize=False, compress_level=3)
    return LayerImage(buffer.getvalue(), top, style)


def colour_stops(colour_map: str, count: int = 11) -> list[str]:
    """CSS colours along the map, for the page's colour bar."""
    from matplotlib import colormaps

    return [
        "#{:02x}{:02x}{:02x}".format(*(int(255 * c) for c in colormaps[colour_map](i / (count - 1))[:3]))
        for i in range(count)
    ]


def tile_at(tiles_store: Path, x_l0: float, y_l0: float) -> dict[str, Any] | None:
    """The measurements of the tile under a level-0 point (the last in store order where tiles overlap), with
    its Grad-CAM as a PNG data URL; None where no tile lies."""
    store = TileStore(tiles_store)
    info = store.info
    if info.n_tiles == 0 or not math.isfinite(x_l0) or not math.isfinite(y_l0):
        return None
    coords = store.coords().astype(np.float64)
    size = info.tile_size_l0
    inside = (
        (coords[:, 0] <= x_l0) & (x_l0 < coords[:, 0] + size) & (coords[:, 1] <= y_l0) & (y_l0 < coords[:, 1] + size)
    )
    inside &= store.usable_tiles()
    rows = np.flatnonzero(inside)
    if len(rows) == 0:
        return None
    row = int(rows[-1])
    one = slice(row, row + 1)

    def number(values: np.ndarray) -> float | None:
        value = float(values[0])
        return round(value, 4) if math.isfinite(value) else None

    found: dict[str, Any] = {
        "tile": row,
        "x": int(coords[row, 0]),
        "y": int(coords[row, 1]),
        "size_l0": round(size, 2),
        "tumour_probability": number(store.positive_scores(one)),
        "probability_sd": number(store.score_sd(one)) if info.scoring and info.scoring.uncertainty != "none" else None,
        "tissue_fraction": number(store.tissue_fraction(one)),
        "blur": number(store.qc_blur(one)),
        "fold": number(store.qc_fold(one)),
        "ink": number(store.qc_ink(one)),
        "flagged": bool(store.qc_flags(one)[0] > 0),
    }
    if info.scoring is not None and info.scoring.has_cams:
        found["cam_png"] = _cam_png(np.asarray(store.cams(one)[0], dtype=np.float32))
    return found


def _cam_png(cam: np.ndarray) -> str:
    """The raw Grad-CAM of one tile, scaled to its own maximum, as an inferno PNG data URL (128 px)."""
    from matplotlib import colormaps

    top = float(cam.max()) if np.isfinite(cam).any() and cam.max() > 0 else 1.0
    rgb = (colormaps["inferno"](np.clip(np.nan_to_num(cam) / top, 0, 1))[..., :3] * 255).astype(np.uint8)
    image = Image.fromarray(rgb).resize((128, 128), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
