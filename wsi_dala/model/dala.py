"""DALAResNet50: ResNet50 with a lightweight attention module in layer4 and a dual-activated head.

What the paper fixes: an ImageNet-pretrained ResNet50, attention embedded in layer4, and two fully
connected layers with LeakyReLU and ReLU. Everything else here is our default (see
``shared/model-spec.md``) and is an option in :class:`DalaOptions`.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` … ``layer4``), so ImageNet
weights load by name. The model is split into ``forward_features`` (up to layer4 + attention, the
DT Grad-CAM target) and ``forward_head`` (the part that back-propagation for a CAM has to cross).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50

from wsi_dala.core.errors import CheckpointError
from wsi_dala.model.attention import make_attention
from wsi_dala.model.registry import ATTENTION_KINDS, ATTENTION_POSITIONS, GATE_MODES


@dataclass(frozen=True)
class DalaOptions:
    """Our defaults where the paper is silent; every one can be changed."""

    attention_position: str = "end"
    attention_kind: str = "gate"
    gate_mode: str = "x*a"
    reduction: int = 8
    hidden_1: int = 512
    hidden_2: int = 256
    dropout: float = 0.5
    leaky_slope: float = 0.01

    def __post_init__(self) -> None:
        if self.attention_position not in ATTENTION_POSITIONS:
            raise ValueError(f"attention_position must be one of {ATTENTION_POSITIONS}")
        if self.attention_kind not in ATTENTION_KINDS:
            raise ValueError(f"attention_kind must be one of {ATTENTION_KINDS}")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}")

    def to_dict(self) -> dict:
        return asdict(self)


class DualActivatedHead(nn.Module):
    """GAP → FC → LeakyReLU → Dropout → FC → ReLU → Dropout → FC (logits, no activation)."""

    def __init__(self, in_features: int, num_classes: int, options: DalaOptions):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_features, options.hidden_1)
        self.act1 = nn.LeakyReLU(options.leaky_slope)
        self.drop1 = nn.Dropout(options.dropout)
        self.fc2 = nn.Linear(options.hidden_1, options.hidden_2)
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(options.dropout)
        self.fc3 = nn.Linear(options.hidden_2, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(features), 1)
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.fc3(x)


class DALAResNet50(nn.Module):
    """ResNet50 + attention in layer4 + dual-activated head."""

    spatial_features = True  # forward_features gives [N, C, h, w]: Grad-CAM applies

    def __init__(self, num_classes: int = 2, options: DalaOptions | None = None):
        super().__init__()
        self.options = options or DalaOptions()
        base = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = base.conv1, base.bn1, base.relu, base.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = base.layer1, base.layer2, base.layer3, base.layer4
        count = 1 if self.options.attention_position == "end" else len(self.layer4)
        self.attention = nn.ModuleList(
            make_attention(self.options.attention_kind, 2048, self.options.reduction, self.options.gate_mode)
            for _ in range(count)
        )
        self.head = DualActivatedHead(2048, num_classes, self.options)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Layer4 output after attention: the DT Grad-CAM target layer."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.options.attention_position == "end":
            return self.attention[0](self.layer4(x))
        for block, attention in zip(self.layer4, self.attention, strict=True):
            x = attention(block(x))
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def frozen_prefixes(self, freeze_until: str | None) -> tuple[str, ...]:
        """Parameter-name prefixes to freeze for ``freeze_until`` in (None, 'layer2', 'layer3')."""
        order = ("conv1", "bn1", "layer1", "layer2", "layer3")
        if freeze_until is None:
            return ()
        if freeze_until not in order[2:]:
            raise ValueError(f"freeze_until must be one of layer1, layer2, layer3, got {freeze_until!r}")
        return order[: order.index(freeze_until) + 1]


def build_dala(arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int) -> DALAResNet50:
    """The registry's builder for ``dalaresnet50``: ImageNet weights go into the ResNet50 part, the attention
    and head start random."""
    from wsi_dala.model.weights import torchvision_imagenet_state

    known = {f.name for f in fields(DalaOptions)}
    unknown = set(options) - known
    if unknown:
        raise CheckpointError(f"unknown DALAResNet50 options: {sorted(unknown)}")
    model = DALAResNet50(num_classes, DalaOptions(**options))
    if pretrained == "imagenet":
        state = torchvision_imagenet_state("resnet50")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        stray = list(unexpected) + [k for k in missing if not k.startswith(("attention.", "head."))]
        if stray:
            raise CheckpointError(f"ImageNet ResNet50 weights do not fit DALAResNet50: {stray[:5]}")
    return model
