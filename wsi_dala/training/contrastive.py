"""Contrastive losses on L2-normalised embeddings: supervised (SupCon, Khosla et al. 2020) for
`train --contrastive-weight`, and SimCLR's NT-Xent for `wsi-dala pretrain`.

NT-Xent is SupCon where each view's only positive is the other view of its tile, so one function serves
both (no library: the loss is ten lines, and ``lightly`` would bring pytorch-lightning with it).
"""

from __future__ import annotations

import torch


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
