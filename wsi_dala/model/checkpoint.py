"""Checkpoints: safetensors weights with a model card in the file's metadata (the card: ``model.card``).

Loading never executes code from a file: safetensors holds only tensors and a string map. A pickle
checkpoint (``.pt``, ``.pth``, ``.ckpt``, or any file that is not safetensors) is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save
from torch import nn

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.fileio import atomic_open
from wsi_dala.model.build import build_model
from wsi_dala.model.card import (
    CARD_KEY,
    GAN_CARD_KEY,
    PRETRAIN_CARD_KEY,
    KnownCheckpoint,
    ModelCard,
    _one_line,
    card_origin,
    read_card,
)
from wsi_dala.model.scripted import IMPORTED_TORCHSCRIPT, load_imported_scripted

# Re-exported: the card and its cheap reads live in the torch-free wsi_dala.model.card.
__all__ = [
    "CARD_KEY",
    "GAN_CARD_KEY",
    "PRETRAIN_CARD_KEY",
    "KnownCheckpoint",
    "ModelCard",
    "card_origin",
    "load_checkpoint",
    "read_card",
    "save_checkpoint",
    "store_in_half_precision",
    "write_untrained_checkpoint",
]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, card: ModelCard) -> Path:
    """Write weights + card atomically (a crash never leaves a half checkpoint)."""
    card.validate()
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as handle:
        handle.write(save(state, metadata={CARD_KEY: card.to_json()}))
    return path


FP16_MAX = 65504.0


def store_in_half_precision(path: str | os.PathLike[str]) -> Path:
    """Rewrite a checkpoint with its floating-point weights in fp16 (half the file; they load back into the fp32
    network, rounded by at most 2^-11 of each value). Tensors fp16 cannot hold stay fp32; the card says so."""
    from safetensors.torch import load_file

    path = Path(path)
    card = read_card(path)
    state = load_file(str(path))
    halved = {
        name: tensor.half() if tensor.is_floating_point() and tensor.abs().max() < FP16_MAX else tensor
        for name, tensor in state.items()
    }
    card.training_data["weights_stored_as"] = "float16 (loaded as float32)"
    with atomic_open(path, "wb") as handle:
        handle.write(save(halved, metadata={CARD_KEY: card.to_json()}))
    return path


def write_untrained_checkpoint(
    path: str | os.PathLike[str],
    architecture: str = "dalaresnet50",
    tile_size_px: int = 224,
    mpp: float | None = 0.5,
    class_names: tuple[str, ...] = ("Non-tumor", "Tumor"),
    positive_class: str = "Tumor",
    note: str = "untrained: randomly initialised weights, for benchmarks and tests",
) -> Path:
    """A checkpoint with random (or, for the colour reference scorer, fixed) weights and a valid card."""
    card = ModelCard(
        architecture=architecture,
        class_names=list(class_names),
        positive_class=positive_class,
        tile_size_px=tile_size_px,
        mpp=mpp,
        mpp_note=note,
    )
    model = build_model(architecture, len(class_names), "none", input_size=tile_size_px).eval()
    return save_checkpoint(path, model, card)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the architecture named in the card and load the weights exactly (strict)."""
    from safetensors.torch import load_file

    path = Path(path)
    card = read_card(path)
    if card.architecture == IMPORTED_TORCHSCRIPT:  # a WSInfer model we have no eager network for
        return load_imported_scripted(path, card.options).to(device), card
    model = build_model(card.architecture, len(card.class_names), "none", card.options, card.tile_size_px)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:  # e.g. a truncated file whose header still reads
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {card.architecture} ({_one_line(exc)})") from exc
    return model.to(device).eval(), card
