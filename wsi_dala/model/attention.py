"""Lightweight attention modules for ResNet50's layer4 (2048 channels).

``gate`` is our default reading of the paper's "lightweight attention module": a per-position,
per-channel sigmoid gate from a 1x1 bottleneck. ``se``, ``eca`` and ``cbam-spatial`` are the usual
alternatives, selectable so a user with the full paper can match it.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from wsi_dala.model.registry import ATTENTION_KINDS, GATE_MODES


class _Gated(nn.Module, abc.ABC):
    """Applies ``y = x * a`` or ``y = x * (1 + a)``; the second keeps pretrained feature scale at start."""

    def __init__(self, gate_mode: str):
        super().__init__()
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        self.gate_mode = gate_mode

    def apply_gate(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x * a if self.gate_mode == "x*a" else x * (1 + a)

    @abc.abstractmethod
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The gate ``a`` in [0, 1], broadcastable to ``x``; each kind defines its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_gate(x, self.attention(x))


class GateAttention(_Gated):
    """a = sigmoid(conv1x1_{C/r→C}(ReLU(conv1x1_{C→C/r}(x)))), per position and channel."""

    def __init__(self, channels: int, reduction: int = 8, gate_mode: str = "x*a"):
        super().__init__(gate_mode)
        hidden = channels // reduction
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.expand(torch.relu(self.reduce(x))))


class SEAttention(GateAttention):
    """Squeeze-and-excitation: the same bottleneck gate, on globally pooled features (one gate per channel)."""

    def __init__(self, channels: int, reduction: int = 16, gate_mode: str = "x*a"):
        super().__init__(channels, reduction, gate_mode)
        self.register_load_state_dict_pre_hook(_renamed_se_weights)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return super().attention(x.mean(dim=(2, 3), keepdim=True))


def _renamed_se_weights(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """Checkpoints written before 0.2 named SE's two convolutions fc1/fc2 (now reduce/expand)."""
    for old, new in (("fc1.", "reduce."), ("fc2.", "expand.")):
        for key in [k for k in state if k.startswith(prefix + old)]:
            state[prefix + new + key[len(prefix + old) :]] = state.pop(key)


class ECAAttention(_Gated):
    """Efficient channel attention: a 1-D convolution across pooled channels (no bottleneck)."""

    def __init__(self, channels: int, gamma: int = 2, beta: int = 1, gate_mode: str = "x*a"):
        super().__init__(gate_mode)
        k = int(abs((math.log2(channels) + beta) / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=k // 2, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))[:, None, :]
        return torch.sigmoid(self.conv(pooled))[:, 0, :, None, None]


class SpatialAttention(_Gated):
    """CBAM's spatial branch: a 7x7 convolution over channel-mean and channel-max maps."""

    def __init__(self, channels: int, kernel_size: int = 7, gate_mode: str = "x*a"):
        super().__init__(gate_mode)
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


def make_attention(kind: str, channels: int, reduction: int = 8, gate_mode: str = "x*a") -> nn.Module:
    """Build one attention module by name."""
    if kind == "gate":
        return GateAttention(channels, reduction, gate_mode)
    if kind == "se":
        return SEAttention(channels, max(1, reduction * 2), gate_mode)
    if kind == "eca":
        return ECAAttention(channels, gate_mode=gate_mode)
    if kind == "cbam-spatial":
        return SpatialAttention(channels, gate_mode=gate_mode)
    raise ValueError(f"attention_kind must be one of {ATTENTION_KINDS}, got {kind!r}")
