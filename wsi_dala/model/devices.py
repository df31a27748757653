"""Devices and numerics shared by training, evaluation and scoring: where to run, at which precision, and
the input normalisation (done per batch on the device, not per sample).

One precision setting everywhere (``--precision auto|fp32|bf16|fp16``): ``auto`` is fp16 autocast on
CUDA, bf16 autocast on CPUs with native bf16 (AVX-512 BF16 or AMX), fp32 otherwise.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import get_args

import torch

from wsi_dala.core.config import Precision
from wsi_dala.core.errors import ConfigError

PRECISIONS: tuple[str, ...] = get_args(Precision)


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_device(name: str = "auto") -> torch.device:
    return torch.device(resolve_device(name))


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``fp16``) that ``auto`` means on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: str | torch.device) -> AbstractContextManager[object]:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    concrete = resolve_precision(precision, device)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if concrete == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if concrete == "bf16" else torch.float16)


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, 3, H, W] → float, normalised (done on the batch, not per sample: cheaper)."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
