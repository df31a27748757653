"""Adaptive discriminator augmentation (Karras et al. 2020, "Training GANs with limited data").

Every image the discriminator sees, real or generated, is augmented with probability ``p`` per
transform: mirror, 90° turn, integer translation (reflect-padded), brightness, contrast, saturation.
All are differentiable, so the generator learns through them, and at ``p`` below ~0.8 they do not leak
into what it generates. ``p`` follows the overfitting heuristic r_t = E[sign(D(real))]: above the
target (0.6) the discriminator is too sure of the training tiles, and ``p`` rises; below it ``p``
falls, at a rate that could take it from 0 to 1 in ``speed_images`` images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AdaptiveAugment:
    p: float = 0.0
    target: float = 0.6
    speed_images: int = 100_000  # NVIDIA's default is 500k; CPU-sized runs see fewer images
    interval: int = 4  # steps between adjustments
    pending_signs: list[float] = field(default_factory=list)  # since the last adjustment (saved on resume)

    def observe(self, real_logits: torch.Tensor) -> None:
        """Record the discriminator's signs on (augmented) real tiles; adjust ``p`` every ``interval`` steps."""
        self.pending_signs.append(float(torch.sign(real_logits.detach()).mean()))
        if len(self.pending_signs) >= self.interval:
            r_t = sum(self.pending_signs) / len(self.pending_signs)
            step = len(real_logits) * len(self.pending_signs) / self.speed_images
            self.p = min(max(self.p + math.copysign(step, r_t - self.target), 0.0), 1.0)
            self.pending_signs.clear()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return augment(images, self.p) if self.p > 0 else images


def _chosen(n: int, p: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, 1, 1, 1, device=device) < p).float()


def augment(images: torch.Tensor, p: float) -> torch.Tensor:
    """Images in [-1, 1], [N, 3, H, W]; each transform applied to each image with probability ``p``."""
    n, _, size, _ = images.shape
    device = images.device
    flip = _chosen(n, p, device)
    images = flip * images.flip(3) + (1 - flip) * images
    turns = torch.randint(0, 4, (n,), device=device) * (torch.rand(n, device=device) < p)
    every = torch.arange(n, device=device)
    images = torch.stack([images.rot90(k, dims=(2, 3)) for k in range(4)])[turns, every]
    shift = max(1, size // 8)
    moved = torch.rand(n, device=device) < p
    offsets = torch.randint(-shift, shift + 1, (n, 2), device=device) * moved[:, None]
    padded = F.pad(images, (shift, shift, shift, shift), mode="reflect")
    window = torch.arange(size, device=device) + shift
    rows, columns = offsets[:, :1] + window, offsets[:, 1:] + window  # [N, size] each
    channels = torch.arange(images.shape[1], device=device)
    images = padded[
        every[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None], columns[:, None, None, :]
    ]
    brightness = torch.randn(n, 1, 1, 1, device=device) * 0.2 * _chosen(n, p, device)
    images = images + brightness
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.exp2(torch.randn(n, 1, 1, 1, device=device) * 0.5 * _chosen(n, p, device))
    images = (images - mean) * contrast + mean
    luma = images.mean(dim=1, keepdim=True)
    saturation = torch.exp2(torch.randn(n, 1, 1, 1, device=device) * _chosen(n, p, device))
    return (images - luma) * saturation + luma
