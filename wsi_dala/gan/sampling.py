"""`wsi-dala gan sample`: generated tiles of one class as PNGs, and ``synthetic.json`` saying what they are.

The card is written last and atomically: a folder without it is an interrupted sampling, and
`train --synthetic` refuses it; it lists the files it describes, so stray files are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from wsi_dala.core.errors import CheckpointError, ConfigError
from wsi_dala.core.fileio import ensure_writable_dir, write_json_atomic
from wsi_dala.core.layout import SYNTHETIC_CARD_NAME
from wsi_dala.gan.figures import tiles_to_pngs
from wsi_dala.gan.networks import GanShape, Generator, generate
from wsi_dala.model.devices import pick_device
from wsi_dala.model.weights import GAN_CARD_KEY


def read_gan_card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: GAN checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(GAN_CARD_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())[:120]})") from exc
    if text is None:
        raise CheckpointError(f"{path}: not a `wsi-dala gan train` checkpoint (no GAN card)")
    card = json.loads(text)
    if not isinstance(card, dict) or "shape" not in card or "class_names" not in card:
        raise CheckpointError(f"{path}: its GAN card lacks the network shape or the class names")
    return card


def load_generator(path: Path, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """The EMA generator of a checkpoint (what samples), loaded strictly."""
    card = read_gan_card(path)
    generator = Generator(GanShape(**card["shape"]))
    weights = load_file(str(path))
    try:
        generator.load_state_dict({k[len("G_ema.") :]: v for k, v in weights.items() if k.startswith("G_ema.")})
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not match the card's shape ({' '.join(str(exc).split())[:160]})"
        ) from exc
    return generator.to(device).eval(), card


def sample_tiles(
    model: Path, class_name: str, n: int, out_dir: Path, truncation: float, seed: int, device_name: str = "auto"
) -> Path:
    """Write ``n`` tiles of ``class_name`` and their card into ``out_dir``; returns the card's path."""
    device = pick_device(device_name)
    generator, card = load_generator(model, device)
    names = card["class_names"]
    if class_name not in names:
        raise ConfigError(f"{model}: generates {', '.join(names)}; no class {class_name!r}")
    if class_name not in card.get("trained_classes", names):
        raise ConfigError(f"{model}: trained on {', '.join(card['trained_classes'])} only, not {class_name!r}")
    folder = ensure_writable_dir(out_dir)
    (folder / SYNTHETIC_CARD_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new card is written
    tiles = generate(generator, names.index(class_name), n, seed, device, truncation)
    files = tiles_to_pngs(tiles, folder, class_name, seed)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    synthetic = {
        "class": class_name,
        "tile_size_px": card["tile_size_px"],
        "mpp": card.get("mpp"),
        "generator": {
            "kind": card["kind"],
            "checkpoint": model.name,
            "sha256": digest,
            "steps": card["steps"],
            "kid": card.get("kid"),
            "seed": seed,
            "truncation": truncation,
        },
        "files": files,
    }
    write_json_atomic(folder / SYNTHETIC_CARD_NAME, synthetic)
    return folder / SYNTHETIC_CARD_NAME
