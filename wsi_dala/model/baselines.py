"""The paper's comparison models behind DALAResNet50's interface.

torchvision provides ResNet50, DenseNet121, VGG16, ViT-B/16 and Swin-T (with its weights API);
timm provides SEResNet50 and DINOv2 ViT-B/14, which torchvision lacks. Each model exposes
``forward_features`` / ``forward_head``; ``spatial_features`` says whether the features are a
[N, C, h, w] map on which Grad-CAM is defined (CNNs, Swin) or tokens (ViT, DINOv2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.extras import require
from wsi_dala.model.interface import as_split
from wsi_dala.model.weights import TORCHVISION, require_online, torchvision_imagenet_state


class SplitClassifier(nn.Module):
    """A backbone split into features and head."""

    def __init__(self, features: nn.Module, head: nn.Module, spatial_features: bool):
        super().__init__()
        self.features = features
        self.head = head
        self.spatial_features = spatial_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def linear_probe_encoder(self) -> nn.Module | None:
        """The part ``train --freeze-backbone`` freezes: the features, when the head is mean-pool -> linear
        (it then trains on the pooled features alone); None for any other head."""
        head = list(self.head.children())
        pooled_linear = len(head) == 3 and isinstance(head[0], nn.AdaptiveAvgPool2d) and isinstance(head[2], nn.Linear)
        return self.features if pooled_linear else None


def _pool_head(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes))


class _NHWCtoNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class _TorchvisionViTFeatures(nn.Module):
    def __init__(self, vit: tvm.VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit._process_input(x)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, x], dim=1))


def torchvision_baseline(arch: str, num_classes: int, backbone: nn.Module) -> SplitClassifier:
    """Split a torchvision model (already built, maybe with ImageNet weights) and give it a new last layer."""
    # Each branch names the torchvision class that ``arch`` builds, for its attributes (features,
    # classifier, hidden_dim...); torchvision ships no type information, so mypy sees these classes as Any.
    if arch in ("resnet18", "resnet34", "resnet50"):
        resnet: tvm.ResNet = backbone
        features = nn.Sequential(*list(resnet.children())[:-2])
        return SplitClassifier(features, _pool_head(resnet.fc.in_features, num_classes), True)
    if arch == "densenet121":
        densenet: tvm.DenseNet = backbone
        features = nn.Sequential(densenet.features, nn.ReLU(inplace=False))
        return SplitClassifier(features, _pool_head(1024, num_classes), True)
    if arch == "vgg16":
        vgg: tvm.VGG = backbone
        classifier = list(vgg.classifier.children())
        classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
        head = nn.Sequential(vgg.avgpool, nn.Flatten(1), *classifier)
        return SplitClassifier(vgg.features, head, True)
    if arch == "swin_t":
        swin: tvm.SwinTransformer = backbone
        features = nn.Sequential(swin.features, swin.norm, _NHWCtoNCHW())
        return SplitClassifier(features, _pool_head(768, num_classes), True)
    if arch == "vit_b_16":
        vit: tvm.VisionTransformer = backbone
        head = nn.Sequential(_ClassToken(), nn.Linear(vit.hidden_dim, num_classes))
        return SplitClassifier(_TorchvisionViTFeatures(vit), head, False)
    raise ValueError(f"not a torchvision baseline: {arch}")


class _ClassToken(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


class TimmClassifier(nn.Module):
    """A timm model (created with the right ``num_classes``) with the same split interface."""

    def __init__(self, model: nn.Module, spatial_features: bool):
        super().__init__()
        self.model = model
        self.spatial_features = spatial_features

    # timm's create_model is typed as returning nn.Module; every timm model has the split (as_split checks).
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return as_split(self.model).forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return as_split(self.model).forward_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_torchvision(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> nn.Module:
    """The registry's builder for the torchvision baselines."""
    constructor, _ = TORCHVISION[arch]
    backbone = constructor(weights=None)
    if pretrained == "imagenet":
        backbone.load_state_dict(torchvision_imagenet_state(arch))
    return torchvision_baseline(arch, num_classes, backbone)


_TIMM = {"seresnet50": ("seresnet50", True), "dinov2_vitb14": ("vit_base_patch14_dinov2", False)}


def build_timm_baseline(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> TimmClassifier:
    """The registry's builder for the two baselines timm provides (SE-ResNet-50, DINOv2 ViT-B/14)."""
    timm = require("timm", f"--arch {arch}")
    name, spatial = _TIMM[arch]
    kwargs: dict[str, Any] = {"img_size": input_size} if arch == "dinov2_vitb14" else {}
    if pretrained == "imagenet":
        require_online(f"timm/{name}", "the Hugging Face hub cache (~/.cache/huggingface/hub)")
        try:
            net = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as exc:
            raise CheckpointError(
                f"could not fetch pretrained weights for {arch} (timm/{name}): {exc}; on a connected machine "
                f"run once to fill ~/.cache/huggingface/hub, or use --pretrained PATH or --pretrained none"
            ) from exc
    else:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return TimmClassifier(net, spatial)
