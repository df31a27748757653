"""Build any architecture by name: the registry says which function builds it; weights follow.

``pretrained`` is ``imagenet`` (each builder fetches its own, see wsi_dala.model.weights), ``none`` (random
weights) or a weights file, loaded here for every architecture whose builder does not load it itself.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

from torch import nn

from wsi_dala.core.errors import CheckpointError
from wsi_dala.model.registry import architecture
from wsi_dala.model.weights import load_pretrained_file


def build_model(
    arch: str = "dalaresnet50",
    num_classes: int = 2,
    pretrained: str = "none",
    options: dict[str, Any] | None = None,
    input_size: int = 224,
) -> nn.Module:
    """A model ready to train or to receive a checkpoint's weights."""
    try:
        entry = architecture(arch)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    module, function = entry.builder.split(":")
    model: nn.Module = getattr(import_module(module), function)(
        arch, num_classes, pretrained, dict(options or {}), input_size
    )
    if pretrained not in ("none", "imagenet") and not entry.loads_own_weights:
        load_pretrained_file(model, Path(pretrained), arch)
    return model
