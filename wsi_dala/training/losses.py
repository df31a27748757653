"""Every loss the program trains with, in one place.

- classification: cross-entropy, class-balanced by Cui et al. 2019 (w_c ∝ (1−β)/(1−β^n_c), normalised to sum
  to the number of classes) under ``imbalance: cb-loss``, plain for validation;
- mask guidance: binary cross-entropy between DALAResNet50's attention and the lesion mask
  (wsi_dala.training.guidance computes the attention and CAM it compares);
- contrastive: supervised (SupCon, Khosla et al. 2020) for ``train --contrastive-weight`` and SimCLR's NT-Xent
  for ``wsi-dala pretrain``. NT-Xent is SupCon where each view's only positive is the other view of its tile,
  so one function serves both (no library: the loss is ten lines, and ``lightly`` would bring
  pytorch-lightning with it);
- the GAN: the non-saturating logistic loss of StyleGAN2 and its R1 gradient penalty on real tiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: w_c ∝ (1−β)/(1−β^n_c), normalised so the weights sum to the number of classes."""
    counts_t = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    effective = (1.0 - torch.pow(beta, counts_t)) / (1.0 - beta)
    weights = 1.0 / effective
    return (weights / weights.sum() * len(counts)).float()


def classification_loss(weights: torch.Tensor | None = None) -> nn.Module:
    """Cross-entropy over class logits, weighted per class when ``weights`` are given (class-balanced)."""
    return nn.CrossEntropyLoss(weight=weights)


def binary_cross_entropy(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy written out in fp32 (``F.binary_cross_entropy`` refuses to run under autocast)."""
    p, t = probability.float().clamp(1e-6, 1 - 1e-6), target.float()
    return -(t * torch.log(p) + (1 - t) * torch.log1p(-p)).mean()


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon over a batch of L2-normalised embeddings [N, D]; anchors without a positive are left out."""
    n = len(embeddings)
    similarity = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_probability = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not anchors.any():
        return embeddings.new_zeros(())
    summed = log_probability.masked_fill(~positives, 0.0).sum(dim=1)
    return -(summed[anchors] / counts[anchors]).mean()


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for two views [N, D] (L2-normalised) of the same N tiles: row i of each is the other's
    positive, the other 2N - 2 embeddings its negatives."""
    pairs = torch.arange(len(first), device=first.device)
    return supervised_contrastive_loss(torch.cat([first, second]), torch.cat([pairs, pairs]), temperature)


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's non-saturating logistic loss for the discriminator: softplus(D(fake)) + softplus(−D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """... and for the generator: softplus(−D(fake))."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminate: Callable[[torch.Tensor], torch.Tensor], reals: torch.Tensor) -> torch.Tensor:
    """Mescheder et al. 2018: the squared gradient of D at real tiles, mean over the batch."""
    penalised = reals.detach().requires_grad_(True)
    (gradients,) = torch.autograd.grad(discriminate(penalised).sum(), penalised, create_graph=True)
    return gradients.square().sum(dim=(1, 2, 3)).mean()
