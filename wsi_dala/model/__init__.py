"""Networks and checkpoints: the registry of architectures, DALAResNet50 and the baselines, model cards,
calibration, devices and input normalisation.

The names below are loaded on first use (PEP 562), so the torch-free modules here (``registry``,
``calibration``) can be imported without torch.

May import: core, tissue (a card carries the training stain).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_dala.model.build import build_model
    from wsi_dala.model.card import ModelCard, read_card
    from wsi_dala.model.checkpoint import load_checkpoint, save_checkpoint, write_untrained_checkpoint
    from wsi_dala.model.dala import DalaOptions, DALAResNet50
    from wsi_dala.model.registry import ARCHITECTURES

_HOMES = {
    "build_model": "build",
    "ModelCard": "card",
    "load_checkpoint": "checkpoint",
    "read_card": "card",
    "save_checkpoint": "checkpoint",
    "write_untrained_checkpoint": "checkpoint",
    "DalaOptions": "dala",
    "DALAResNet50": "dala",
    "ARCHITECTURES": "registry",
}

__all__ = [
    "ARCHITECTURES",
    "DALAResNet50",
    "DalaOptions",
    "ModelCard",
    "build_model",
    "load_checkpoint",
    "read_card",
    "save_checkpoint",
    "write_untrained_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
