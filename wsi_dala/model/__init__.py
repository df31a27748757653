"""Models: DALAResNet50, the paper's baselines, and checkpoints with model cards."""

from wsi_dala.model.build import build_model
from wsi_dala.model.checkpoint import (
    ModelCard,
    load_checkpoint,
    read_card,
    save_checkpoint,
    write_untrained_checkpoint,
)
from wsi_dala.model.dala import DalaOptions, DALAResNet50
from wsi_dala.model_choices import ARCHITECTURES

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
