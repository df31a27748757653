"""Pretrained weights: ImageNet through torchvision's weights API, and weights files of our own or others.

``--pretrained imagenet`` uses torchvision's weights API (timm's hub for the timm baselines): on a connected
machine the file is downloaded to the torch cache once. Offline, the error names the file and the folder to
put it in. ``--pretrained PATH`` loads a state dict from a safetensors file (or a torch file, with
``weights_only=True``): nothing in a weights file runs code.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from wsi_dala.core.errors import CheckpointError
from wsi_dala.model.card import GAN_CARD_KEY, PRETRAIN_CARD_KEY
from wsi_dala.model.encoder import read_weights_file

# torchvision's constructor and ImageNet weights for each architecture it provides (DALAResNet50 and
# ResViT-GANNet take resnet50's and vit_b_16's).
TORCHVISION = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    "densenet121": (tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1),
    "vgg16": (tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1),
    "vit_b_16": (tvm.vit_b_16, tvm.ViT_B_16_Weights.IMAGENET1K_V1),
    "swin_t": (tvm.swin_t, tvm.Swin_T_Weights.IMAGENET1K_V1),
}
log = logging.getLogger(__name__)
OFFLINE_ENV = "WSI_DALA_OFFLINE"  # set to 1 to fail at once instead of trying a download


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision's weights API caches ImageNet weights for ``arch``."""
    _, weights = TORCHVISION[arch]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def require_online(what: str, where: str) -> None:
    if os.environ.get(OFFLINE_ENV) == "1":
        raise CheckpointError(
            f"pretrained weights {what} are not available offline ({OFFLINE_ENV}=1): put them in {where}, "
            "or use --pretrained PATH or --pretrained none"
        )


def torchvision_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    _, weights = TORCHVISION[arch]
    target = imagenet_weights_file(arch)
    if not target.exists():
        require_online(target.name, str(target.parent))
    try:
        # Downloads into the torch cache when missing; loads with weights_only (no code execution).
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        raise CheckpointError(
            f"could not load ImageNet weights for {arch}: {type(exc).__name__}: {exc}; download {weights.url} "
            f"and put it at {target}, or use --pretrained PATH or --pretrained none"
        ) from exc


def load_pretrained_file(model: nn.Module, path: Path, arch: str) -> None:
    """Load backbone weights from a file; keys that do not fit (the new head) are left as built. A
    `wsi-dala pretrain` backbone is checked to be of ``arch`` first; other files by their tensor names."""
    if _metadata_key(path, GAN_CARD_KEY) is not None:
        raise CheckpointError(
            f"{path}: a GAN checkpoint (wsi-dala gan train), not backbone weights; use `wsi-dala gan sample` "
            "to make tiles from it, and `wsi-dala pretrain` for a backbone"
        )
    card = pretrain_card(path)
    if card is not None and card.get("architecture") != arch:
        raise CheckpointError(
            f"{path}: a backbone pre-trained for {card.get('architecture')}, not {arch}; use --arch "
            f"{card.get('architecture')} or pre-train {arch}"
        )
    state = read_weights_file(path, what="pretrained weights", instead="--pretrained none")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"{path}: no tensor in this file matches the model's parameter names")
    if card is not None and len(usable) < len(state):
        unfit = sorted(set(state) - set(usable))
        raise CheckpointError(
            f"{path}: {len(unfit)} of its {len(state)} tensors (e.g. {unfit[0]}) do not fit this {arch}; it was "
            f"pre-trained with options {card.get('options') or {}}: give train the same architecture options"
        )
    model.load_state_dict(usable, strict=False)
    if card is not None:
        log.info("%s: %d of %d tensors from %s pre-training", path, len(usable), len(own), card.get("method"))


def _metadata_key(path: Path, key: str) -> str | None:
    """One entry of a safetensors file's metadata (None: no such entry, or not a readable safetensors file)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(key)
    except (SafetensorError, OSError):
        return None  # read_weights_file words the error


def pretrain_card(path: Path) -> dict[str, Any] | None:
    """The card of a `wsi-dala pretrain` backbone (None for any other file)."""
    text = _metadata_key(path, PRETRAIN_CARD_KEY)
    if text is None:
        return None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its pre-training card is not JSON ({exc})") from exc
    return card if isinstance(card, dict) else None
