"""A worked example of adding an architecture (docs/architecture.md): EfficientNet-B0 from torchvision.

One module with a builder, one registry entry. tests/test_model.py registers this entry and builds it, so
the example stays true.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tvm

from wsi_dala.model.baselines import SplitClassifier
from wsi_dala.model.registry import Architecture


def build_efficientnet(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> nn.Module:
    """The registry calls every builder with these five arguments; ``pretrained`` is "imagenet", "none" or a
    weights file (a file is loaded by build_model afterwards, unless the entry says loads_own_weights)."""
    weights = tvm.EfficientNet_B0_Weights.IMAGENET1K_V1 if pretrained == "imagenet" else None
    network = tvm.efficientnet_b0(weights=weights)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(1280, num_classes))
    return SplitClassifier(network.features, head, spatial_features=True)


ENTRY = Architecture(
    name="efficientnet_b0",
    summary="EfficientNet-B0 (torchvision)",
    builder="docs.examples.efficientnet:build_efficientnet",  # in the package: "wsi_dala.model.<module>:<function>"
    feature_dim=1280,
    cam_layer="features (last MBConv stage)",
    linear_probe=True,  # mean-pool -> one linear layer: --freeze-backbone can train it on cached features
    imagenet_weights="torchvision efficientnet_b0 IMAGENET1K_V1",
)
