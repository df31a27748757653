"""The interface every model here offers: features, then a head.

Grad-CAM differentiates only the head, scoring runs the features under autocast, precise-BN runs only
the features: all of them need the two halves. ``nn.Module`` types its attributes as ``Tensor | Module``,
so code that holds a plain module gets the typed interface through ``as_split``, which checks it.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import nn


class SplitModel(Protocol):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor) -> torch.Tensor: ...


def as_split(model: nn.Module) -> SplitModel:
    """``model`` as features + head; every architecture ``build_model`` makes has both (timm's too)."""
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise TypeError(f"{type(model).__name__} has no forward_features/forward_head split")
    return cast(SplitModel, model)


def has_feature_map(model: nn.Module) -> bool:
    """Whether ``forward_features`` gives a spatial map [N, C, h, w] on which DT Grad-CAM is defined. Models
    without one (a ViT baseline's tokens, a TorchScript-only import) score without CAM."""
    return bool(getattr(model, "spatial_features", False))


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The architecture's features averaged over space (maps) or tokens: [N, C] (contrastive pre-training,
    feature distances)."""
    return pool(as_split(model).forward_features(images))


def pool(features: torch.Tensor) -> torch.Tensor:
    """Features [N, C, h, w] averaged over space, or tokens [N, T, C] over tokens: [N, C]."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    return features
