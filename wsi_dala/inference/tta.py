"""Test-time augmentation and MC dropout: a tile seen several ways, and how much its score moves.

Views are elements of the dihedral group D4 (turns by 90° and a mirror), which leave H&E's meaning
unchanged: a tile has no "up". ``flips`` is the four-element subgroup {identity, mirror left-right,
mirror top-bottom, half turn}; ``d4`` all eight. Each view's Grad-CAM is mapped back into the tile's own
frame (the exact inverse) before the maps are averaged, so the CAM still points at the tile's tissue.

MC dropout re-runs only the head with its dropout on (the backbone's features are computed once per
view), so it costs a few per cent, not N forward passes. Either gives each tile a standard deviation
of its tumour probability: how much the answer depends on how the tile is looked at.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from wsi_dala.core.errors import ConfigError

MC_SEED = 20_240_611  # dropout masks are drawn from this seed in every batch: a rerun gives the same numbers


class View(NamedTuple):
    """Mirror left-right first (when ``mirror``), then turn by ``quarter_turns`` x 90° anticlockwise."""

    quarter_turns: int
    mirror: bool


VIEWS: dict[str, tuple[View, ...]] = {
    "none": (View(0, False),),
    "flips": (View(0, False), View(0, True), View(2, True), View(2, False)),  # id, LR, TB (= LR + half turn), 180°
    "d4": tuple(View(turns, mirror) for mirror in (False, True) for turns in range(4)),
}


def views(kind: str) -> tuple[View, ...]:
    if kind not in VIEWS:
        raise ConfigError(f"--tta {kind!r}: one of {', '.join(VIEWS)}")
    return VIEWS[kind]


def require_square(height: int, width: int, where: str) -> None:
    """Turning a tile by 90° needs a square one (and a square feature map to map the CAM back)."""
    if height != width:
        raise ConfigError(f"{where}: --tta needs square tiles; these are {width} x {height} px")


def apply_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """The view of an NCHW (or N x h x w) batch."""
    if view.mirror:
        images = torch.flip(images, dims=(-1,))
    return torch.rot90(images, view.quarter_turns, dims=(-2, -1)) if view.quarter_turns else images


def undo_view(maps: torch.Tensor, view: View) -> torch.Tensor:
    """Maps [N, h, w] computed on a view, back in the tile's frame (apply_view's exact inverse)."""
    if view.quarter_turns:
        maps = torch.rot90(maps, -view.quarter_turns, dims=(-2, -1))
    return torch.flip(maps, dims=(-1,)) if view.mirror else maps


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The model's dropout layers that drop something (p > 0)."""
    kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
    return [m for m in model.modules() if isinstance(m, kinds) and float(getattr(m, "p", 0.0)) > 0]


def require_dropout(model: nn.Module, where: str) -> None:
    if not dropout_modules(model):
        raise ConfigError(f"{where}: --mc-dropout needs dropout in the model's head; {type(model).__name__} has none")


# One cached model serves every thread of a worker, and MC dropout switches its dropout layers on: while
# one thread does that, no other may run the model at all (scoring holds this around each batch).
MODEL_LOCK = threading.RLock()


@contextmanager
def dropout_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Dropout layers in training mode (BatchNorm untouched), a private random stream seeded with
    MC_SEED, and every layer's mode as it was afterwards. Holds MODEL_LOCK (re-entrant: the caller
    scoring the batch holds it too)."""
    modules = dropout_modules(model)
    before = [module.training for module in modules]
    devices = [device] if device.type == "cuda" else []
    with MODEL_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(MC_SEED)
        for module in modules:
            module.train()
        try:
            yield
        finally:
            for module, training in zip(modules, before, strict=True):
                module.train(training)


def describe(tta: str, mc_dropout: int) -> str:
    """What ``score_sd`` is the spread over, for the store's scoring record ("none" when nothing)."""
    parts = ([f"tta:{tta}"] if tta != "none" else []) + ([f"mc-dropout:{mc_dropout}"] if mc_dropout else [])
    return "+".join(parts) or "none"
