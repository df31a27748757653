"""A transparent reference scorer: tumour probability from H&E colour, with a spatial map.

Not a learned model. It exists to validate the pipeline end to end with a known answer: on slides
whose tumour is dense, dark-purple (haematoxylin-rich) tissue — as in ``wsi_dala.slides.synthetic`` — its
probabilities and its Grad-CAM follow the tumour exactly, so exported regions can be compared with the
planted truth. It runs through the same checkpoint, scoring, CAM and export code as DALAResNet50.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_dala.model.normalisation import IMAGENET_MEAN, IMAGENET_STD

CLASS_NAMES = ["Non-tumor", "Tumor"]


class ColourReferenceScorer(nn.Module):
    """Features: per cell (``cells`` x ``cells`` per tile), how purple the cell's mean colour is.
    Head: the share of purple cells, squashed to a probability around ``half_fraction``."""

    spatial_features = True
    # Buffers (registered in __init__): declared so their type is Tensor, not nn.Module.__getattr__'s union.
    mean: torch.Tensor
    std: torch.Tensor
    half_fraction: torch.Tensor
    steepness: torch.Tensor

    def __init__(self, num_classes: int = 2, cells: int = 8, half_fraction: float = 0.05, steepness: float = 60.0):
        super().__init__()
        if num_classes != 2:
            raise ValueError("the colour reference scorer has exactly two classes: Non-tumor, Tumor")
        self.cells = cells
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("half_fraction", torch.tensor(float(half_fraction)))
        self.register_buffer("steepness", torch.tensor(float(steepness)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        rgb = F.adaptive_avg_pool2d(x.float() * self.std + self.mean, self.cells)
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        k = 40.0
        purple = torch.sigmoid(k * (0.52 - g)) * torch.sigmoid(k * (r - g - 0.05)) * torch.sigmoid(k * (b - g - 0.05))
        return purple[:, None]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        share = features.mean(dim=(1, 2, 3))
        tumour = self.steepness * (share - self.half_fraction)
        return torch.stack([torch.zeros_like(tumour), tumour], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_colour(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> ColourReferenceScorer:
    """The registry's builder for ``colour-reference`` (no weights to load)."""
    return ColourReferenceScorer(num_classes, **options)
