"""Build any supported architecture by name, with ImageNet, local or no pretrained weights.

``--pretrained imagenet`` uses torchvision's weights API (or timm's hub for the two timm models):
on a connected machine the file is downloaded to the torch cache once. Offline, the error names the
file and the folder to put it in. ``--pretrained none`` starts from random weights; ``--pretrained
PATH`` loads a state dict from a safetensors file (or a torch file, with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from wsi_dala.core.errors import CheckpointError
from wsi_dala.model.baselines import TimmClassifier, torchvision_baseline
from wsi_dala.model.colour import ColourReferenceScorer
from wsi_dala.model.dala import DalaOptions, DALAResNet50
from wsi_dala.model.encoder import build_encoder_classifier, read_weights_file
from wsi_dala.model.registry import TIMM_PREFIX, architecture_problem
from wsi_dala.model.resvit import ResVitGanNet, resvit_options

_TORCHVISION = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    "densenet121": (tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1),
    "vgg16": (tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1),
    "vit_b_16": (tvm.vit_b_16, tvm.ViT_B_16_Weights.IMAGENET1K_V1),
    "swin_t": (tvm.swin_t, tvm.Swin_T_Weights.IMAGENET1K_V1),
}
_TIMM = {"seresnet50": ("seresnet50", True), "dinov2_vitb14": ("vit_base_patch14_dinov2", False)}
log = logging.getLogger(__name__)
OFFLINE_ENV = "WSI_DALA_OFFLINE"  # set to 1 to fail at once instead of trying a download


def build_model(
    arch: str = "dalaresnet50",
    num_classes: int = 2,
    pretrained: str = "none",
    options: dict[str, Any] | None = None,
    input_size: int = 224,
) -> nn.Module:
    """A model ready to train or to receive a checkpoint's weights."""
    problem = architecture_problem(arch)
    if problem is not None:
        raise CheckpointError(f"unknown architecture {arch!r}: {problem}")
    options = dict(options or {})
    if arch.startswith(TIMM_PREFIX):
        return build_encoder_classifier(arch, num_classes, pretrained, options, input_size)
    if arch == "colour-reference":
        return ColourReferenceScorer(num_classes, **options)
    if arch == "dalaresnet50":
        known = {f.name for f in fields(DalaOptions)}
        unknown = set(options) - known
        if unknown:
            raise CheckpointError(f"unknown DALAResNet50 options: {sorted(unknown)}")
        model: nn.Module = DALAResNet50(num_classes, DalaOptions(**options))
        if pretrained == "imagenet":
            state = _torchvision_imagenet_state("resnet50")
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            stray = list(unexpected) + [k for k in missing if not k.startswith(("attention.", "head."))]
            if stray:
                raise CheckpointError(f"ImageNet ResNet50 weights do not fit DALAResNet50: {stray[:5]}")
    elif arch == "resvit-gannet":
        model = ResVitGanNet(num_classes, resvit_options(options), input_size)
        if pretrained == "imagenet":
            _load_resvit_imagenet(model, input_size)
    elif arch in _TORCHVISION:
        constructor, _ = _TORCHVISION[arch]
        backbone = constructor(weights=None)
        if pretrained == "imagenet":
            backbone.load_state_dict(_torchvision_imagenet_state(arch))
        model = torchvision_baseline(arch, num_classes, backbone)
    else:
        import timm

        name, spatial = _TIMM[arch]
        kwargs: dict[str, Any] = {"img_size": input_size} if arch == "dinov2_vitb14" else {}
        if pretrained == "imagenet":
            _require_online(f"timm/{name}", "the Hugging Face hub cache (~/.cache/huggingface/hub)")
            try:
                net = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
            except Exception as exc:
                raise CheckpointError(
                    f"could not fetch pretrained weights for {arch} (timm/{name}): {exc}; on a connected machine "
                    f"run once to fill ~/.cache/huggingface/hub, or use --pretrained PATH or --pretrained none"
                ) from exc
        else:
            net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        model = TimmClassifier(net, spatial)
    if pretrained not in ("none", "imagenet"):
        load_pretrained_file(model, Path(pretrained), arch)
    return model


def _load_resvit_imagenet(model: ResVitGanNet, input_size: int) -> None:
    """ImageNet weights into both branches: torchvision's ResNet50 and (for vit_b_16) ViT-B/16, its position
    embedding interpolated when the tile is not 224 px; a timm ViT takes no download (train from none)."""
    cnn, vit = model.imagenet_parts()
    resnet = tvm.resnet50(weights=None)
    resnet.load_state_dict(_torchvision_imagenet_state("resnet50"))
    cnn.load_state_dict(nn.Sequential(*list(resnet.children())[:-2]).state_dict())
    if vit is None:
        log.warning("resvit-gannet: ImageNet weights for the ResNet50 branch only; the timm ViT starts random")
        return
    state = _torchvision_imagenet_state("vit_b_16")
    if input_size != 224:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(input_size, 16, state)
    vit.load_state_dict(state)


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision's weights API caches ImageNet weights for ``arch``."""
    _, weights = _TORCHVISION[arch]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _require_online(what: str, where: str) -> None:
    if os.environ.get(OFFLINE_ENV) == "1":
        raise CheckpointError(
            f"pretrained weights {what} are not available offline ({OFFLINE_ENV}=1): put them in {where}, "
            "or use --pretrained PATH or --pretrained none"
        )


def _torchvision_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    _, weights = _TORCHVISION[arch]
    target = imagenet_weights_file(arch)
    if not target.exists():
        _require_online(target.name, str(target.parent))
    try:
        # Downloads into the torch cache when missing; loads with weights_only (no code execution).
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        raise CheckpointError(
            f"could not load ImageNet weights for {arch}: {type(exc).__name__}: {exc}; download {weights.url} "
            f"and put it at {target}, or use --pretrained PATH or --pretrained none"
        ) from exc


PRETRAIN_CARD_KEY = "wsi_dala.pretrain_card"  # safetensors metadata of a `wsi-dala pretrain` backbone
GAN_CARD_KEY = "wsi_dala.gan_card"  # ... and of a `wsi-dala gan train` checkpoint (never a backbone)


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
