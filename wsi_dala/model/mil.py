"""Gated attention multiple-instance learning (ABMIL; Ilse, Tomczak & Welling 2018, "Attention-based Deep
Multiple Instance Learning", eq. 9): a slide is a bag of tile embeddings, and its label the only supervision.

    h_k = ReLU(W_in x_k)                                 (a smaller space for the attention; dropout)
    a_k = softmax_k( w^T (tanh(V h_k) ⊙ sigmoid(U h_k)) ) (the gate lets the attention ignore some features)
    z   = Σ_k a_k h_k ;  logits = W_out z

The attention a_k says which tiles the slide's answer rests on: ``run`` draws it as a heatmap layer. Written
here rather than taken from a library: it is twenty lines, and CLAM's and TransMIL's packages are not
installable libraries (research repositories with pinned, old dependencies).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, attention: int = 128, dropout: float = 0.25):
        super().__init__()
        # Standardised by the training tiles' mean and spread (set by training, kept in the weights file).
        self.feature_mean: torch.Tensor
        self.feature_std: torch.Tensor
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def standardise(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.feature_mean.copy_(torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.feature_std.copy_(torch.from_numpy(np.asarray(std, dtype=np.float32)))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``bag`` [N, in_dim] → (logits [n_classes], attention [N], summing to 1)."""
        h = self.project((bag - self.feature_mean) / self.feature_std)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        return self.classifier(attention @ h), attention
