"""Deep Pneumonia's training aids: mask-guided hard attention, attention supervision, contrastive regulation.

All three act on one training step and only there (inference needs no mask):

- **hard attention** (``hard_attention_floor`` < 1): for tiles of the lesion class that have a lesion mask,
  the feature map is multiplied by ``floor + (1 - floor) * m``, ``m`` the share of each feature cell inside
  the lesion, before the head: the head learns from the lesion, and the floor keeps some context (0.1 by
  default: outside features are damped, not erased);
- **attention supervision** (``attention_loss_weight`` > 0): the model's spatial attention is pulled toward
  the mask by binary cross-entropy on the same tiles. The attention is DALAResNet50's spatial gate (mean over
  channels of its last gate, for the ``gate`` and ``cbam-spatial`` kinds), else the differentiable Grad-CAM
  of the lesion class (gradients with ``create_graph``), normalised by its peak;
- **contrastive regulation** (``contrastive_weight`` > 0): a supervised-contrastive loss (Khosla et al. 2020)
  on the L2-normalised pooled features of the batch: tiles of one class pulled together, others apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsi_dala.model.interface import as_split
from wsi_dala.training.losses import binary_cross_entropy, supervised_contrastive_loss


@dataclass(frozen=True)
class Guidance:
    lesion_index: int  # the class the masks outline (the positive class)
    hard_attention_floor: float = 1.0  # 1: off
    attention_loss_weight: float = 0.0  # 0: off
    contrastive_weight: float = 0.0  # 0: off
    contrastive_temperature: float = 0.1

    @property
    def uses_masks(self) -> bool:
        return self.hard_attention_floor < 1.0 or self.attention_loss_weight > 0.0

    @property
    def active(self) -> bool:
        return self.uses_masks or self.contrastive_weight > 0.0


def guided_logits_and_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor | None,
    guidance: Guidance,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one training batch and the extra loss (0 when nothing adds one). ``masks``: [N, 1, H, W]
    lesion masks in [0, 1] (all zero for tiles without one)."""
    split = as_split(model)
    gate = _GateCapture(model) if guidance.attention_loss_weight > 0 else None
    try:
        features = split.forward_features(images)
    finally:
        if gate is not None:
            gate.remove()
    extra = features.new_zeros((), dtype=torch.float32)
    guided = features
    if masks is not None and guidance.uses_masks:
        cells = F.adaptive_avg_pool2d(
            masks.to(features.dtype), (features.shape[-2], features.shape[-1])
        )  # lesion share per cell
        lesion = (targets == guidance.lesion_index) & (masks.flatten(1).amax(dim=1) > 0)
        if guidance.hard_attention_floor < 1.0 and lesion.any():
            keep = guidance.hard_attention_floor + (1.0 - guidance.hard_attention_floor) * cells
            guided = torch.where(lesion[:, None, None, None], features * keep, features)
        if guidance.attention_loss_weight > 0 and lesion.any():
            attention = gate.spatial if gate is not None and gate.spatial is not None else None
            if attention is None:
                attention = _differentiable_cam(model, features, guidance.lesion_index)
            extra = extra + guidance.attention_loss_weight * binary_cross_entropy(attention[lesion], cells[lesion, 0])
    logits = split.forward_head(guided)
    if guidance.contrastive_weight > 0:
        pooled = F.normalize(features.float().mean(dim=(2, 3)), dim=1)
        extra = extra + guidance.contrastive_weight * supervised_contrastive_loss(
            pooled, targets, guidance.contrastive_temperature
        )
    return logits, extra


def _differentiable_cam(model: nn.Module, features: torch.Tensor, index: int) -> torch.Tensor:
    """Grad-CAM of class ``index`` as a function of the weights (create_graph), each map over its peak."""
    head = as_split(model).forward_head
    logits = head(features)
    (gradients,) = torch.autograd.grad(logits[:, index].sum(), features, create_graph=True)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    channels = getattr(model, "cam_channels", None)
    cam = torch.relu((weights * features)[:, :channels].sum(dim=1))
    return cam / (cam.flatten(1).amax(dim=1)[:, None, None] + 1e-6)


class _GateCapture:
    """DALAResNet50's last spatial gate during one forward pass (None for a model without one, or for a
    channel-only gate such as SE or ECA, whose attention has no spatial extent)."""

    def __init__(self, model: nn.Module) -> None:
        self.spatial: torch.Tensor | None = None
        attention = getattr(model, "attention", None)
        last = attention[-1] if isinstance(attention, nn.ModuleList) and len(attention) else None
        self._handle = last.register_forward_hook(self._hook) if last is not None else None

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        attention = getattr(module, "attention", None)
        gate = attention(inputs[0]) if callable(attention) else None
        if isinstance(gate, torch.Tensor) and gate.shape[-2:] == inputs[0].shape[-2:]:
            self.spatial = gate.mean(dim=1)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
