"""WSInfer's model format (a ``config.json`` and a TorchScript file), both ways.

WSInfer and QuPath's WSInfer extension load a folder holding ``config.json`` (the wsinfer-zoo model
config, spec 1.0: architecture, classes, patch size in pixels at a spacing in µm/px, and the
``Resize -> ToTensor -> Normalize`` transform) and ``torchscript_model.pt``, whose output are logits
(they apply the softmax). Our model card carries the same facts, so the card maps to the config and
back; what the config cannot say (temperature, CAM profile, stain reference) is folded into the
TorchScript (the temperature divides the logits) or lost (docs/models.md lists what).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.layout import TORCHSCRIPT_CARD_NAME
from wsi_dala.model.interface import as_split

SPEC_VERSION = "1.0"
CARD_EXTRA_FILE = TORCHSCRIPT_CARD_NAME  # our card, inside the TorchScript archive (torch.jit extra files)
TRANSFORMS = ("Resize", "ToTensor", "Normalize")
POSITIVE_NAMES = ("tumor", "tumour", "tumor-positive", "positive", "malignant", "cancer", "carcinoma")


class ScaledLogits(nn.Module):
    """The classifier as one module: logits divided by the card's temperature, so WSInfer's softmax of
    them equals our probability."""

    def __init__(self, model: nn.Module, temperature: float | None) -> None:
        super().__init__()
        self.model = model
        self.inverse_temperature = 1.0 / float(temperature or 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        split = as_split(self.model)
        return split.forward_head(split.forward_features(images)) * self.inverse_temperature


class Probabilities(nn.Module):
    """RGB in [0, 1], NCHW -> class probabilities: normalisation, the classifier and the softmax in one graph."""

    def __init__(self, model: nn.Module, temperature: float | None, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.logits = ScaledLogits(model, temperature)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits((rgb01 - self.mean) / self.std), dim=1)


def wsinfer_config(card: Any) -> dict[str, Any]:
    """The wsinfer-zoo ``config.json`` of a model card (refused without µm/px: WSInfer needs the spacing)."""
    if card.mpp is None:
        raise CheckpointError(
            "the checkpoint's card has no µm/px; WSInfer needs spacing_um_px (retrain from tiles of known µm/px)"
        )
    return {
        "spec_version": SPEC_VERSION,
        "architecture": card.architecture,
        "num_classes": len(card.class_names),
        "class_names": list(card.class_names),
        "patch_size_pixels": int(card.tile_size_px),
        "spacing_um_px": float(card.mpp),
        "transform": [
            {"name": "Resize", "arguments": {"size": int(card.tile_size_px)}},
            {"name": "ToTensor"},
            {
                "name": "Normalize",
                "arguments": {"mean": list(card.normalisation["mean"]), "std": list(card.normalisation["std"])},
            },
        ],
    }


def read_wsinfer_config(path: Path) -> dict[str, Any]:
    """A WSInfer ``config.json``, checked field by field (one-line errors naming the file and the field)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not found (a WSInfer model folder holds config.json)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a WSInfer model config (a JSON object is expected)")
    for field in ("num_classes", "class_names", "patch_size_pixels", "spacing_um_px", "transform"):
        if field not in config:
            raise CheckpointError(f"{path}: {field} is missing")
    names, classes = config["class_names"], config["num_classes"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise CheckpointError(f"{path}: class_names must be a list of names")
    if len(set(names)) != len(names) or classes != len(names):
        raise CheckpointError(f"{path}: num_classes ({classes}) must equal the number of distinct class_names")
    size, spacing = config["patch_size_pixels"], config["spacing_um_px"]
    if not (isinstance(size, int) and size > 0):
        raise CheckpointError(f"{path}: patch_size_pixels must be a positive whole number, not {size!r}")
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise CheckpointError(f"{path}: spacing_um_px must be a positive number, not {spacing!r}")
    if not isinstance(config["transform"], list) or not all(
        isinstance(t, dict) and t.get("name") in TRANSFORMS for t in config["transform"]
    ):
        raise CheckpointError(f"{path}: transform must list steps named {', '.join(TRANSFORMS)}")
    return config


def normalisation_of(config: dict[str, Any], source: str) -> dict[str, list[float]]:
    """Mean and std of the config's Normalize step (none: the identity, as WSInfer would do)."""
    for step in config["transform"]:
        if step.get("name") == "Normalize":
            arguments = step.get("arguments") or {}
            mean, std = arguments.get("mean"), arguments.get("std")
            if not (isinstance(mean, list) and isinstance(std, list) and _three_numbers(mean) and _three_numbers(std)):
                raise CheckpointError(f"{source}: Normalize needs three means and three stds")
            if not all(s > 0 for s in std):
                raise CheckpointError(f"{source}: Normalize's stds must be positive")
            return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def _three_numbers(values: Any) -> bool:
    return isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)


def positive_class_of(names: list[str], asked: str | None, source: str) -> str:
    """The class the heatmap shows: ``asked``, else the one name that reads as tumour, else an error."""
    if asked is not None:
        if asked not in names:
            raise CheckpointError(f"{source}: --positive-class {asked!r} is not one of {names}")
        return asked
    obvious = [n for n in names if n.lower().replace("_", "-") in POSITIVE_NAMES]
    if len(obvious) == 1:
        return obvious[0]
    if len(names) == 2 and any(n.lower().replace("_", "-").startswith(("no", "non", "benign")) for n in names):
        return next(n for n in names if not n.lower().replace("_", "-").startswith(("no", "non", "benign")))
    raise CheckpointError(f"{source}: which class is the positive one? pass --positive-class, one of {names}")
