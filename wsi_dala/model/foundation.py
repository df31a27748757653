"""Pathology foundation models by name (``--arch uni``, ``virchow2``, ...), built from their presets
(``wsi_dala.model.foundation_presets``) as encoders with a linear head on the mean of their patch tokens
(``wsi_dala.model.encoder.EncoderClassifier``: the heatmap's DT Grad-CAM is then exact on the token grid).

Weights are loaded strictly: every tensor of the encoder must be in the file with its shape and the file
may hold nothing else (a wrapper prefix such as ``module.`` is stripped); a misfit is refused by name. The
file is read without running code (safetensors, or torch's ``weights_only``). ``options`` override the
preset's arguments (``depth``, ``embed_dim``, ``num_heads``...): the tests build small networks of the same
family, and a checkpoint records them in its card so it is rebuilt the same.

``embed`` applies the preset's own embedding rule (the CLS token; for Virchow2 the CLS token concatenated
with the mean of the patch tokens): what stored features hold, which is not what the linear head of a
classifier here pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.extras import require
from wsi_dala.model.encoder import EncoderClassifier, read_weights_file, strip_wrappers
from wsi_dala.model.foundation_presets import PRESETS, FoundationPreset


def foundation_preset(arch: str) -> FoundationPreset:
    found = PRESETS.get(arch)
    if found is None:
        raise CheckpointError(f"{arch!r} is not a foundation-model preset (one of {', '.join(PRESETS)})")
    return found


def _timm_arguments(preset: FoundationPreset, options: dict[str, Any]) -> dict[str, Any]:
    """The preset's timm arguments with ``options`` over them, layer names resolved to timm's classes."""
    from timm.layers import SwiGLUPacked

    named = {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    arguments = {"num_classes": 0, **preset.arguments, **options}
    for key in ("mlp_layer", "act_layer"):
        if isinstance(arguments.get(key), str):
            arguments[key] = named[arguments[key]]
    return arguments


class Dinov2Tokens(nn.Module):
    """A ``transformers`` Dinov2Model with the face of a timm ViT: ``forward_features`` gives every token
    after the final norm; ``num_features``, ``num_prefix_tokens`` and ``patch_embed.patch_size`` say the rest."""

    def __init__(self, model: nn.Module, width: int, patch_px: int) -> None:
        super().__init__()
        self.model = model
        self.num_features = width
        self.num_prefix_tokens = 1
        self.patch_px = patch_px

    @property
    def patch_embed(self) -> Any:
        return type("PatchEmbed", (), {"patch_size": (self.patch_px, self.patch_px)})()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


def create_encoder(preset: FoundationPreset, options: dict[str, Any] | None = None) -> nn.Module:
    """The preset's encoder with random weights (on the current default device: ``meta`` costs nothing)."""
    options = dict(options or {})
    if preset.library == "transformers":
        transformers = require("transformers", f"--arch {preset.name}")
        config = transformers.Dinov2Config(**{**preset.arguments, **options})
        model = transformers.Dinov2Model(config)
        return Dinov2Tokens(model, config.hidden_size, config.patch_size)
    timm = require("timm", f"--arch {preset.name}")
    try:
        return timm.create_model(preset.constructor, pretrained=False, **_timm_arguments(preset, options))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"--arch {preset.name}: timm cannot build it with options {options} ({exc})") from exc


def load_strict(encoder: nn.Module, path: Path, preset: FoundationPreset) -> None:
    """``path``'s tensors into ``encoder``: the same names and shapes, nothing missing, nothing extra."""
    state = strip_wrappers(read_weights_file(path, what=f"{preset.name} weights", instead="--weights hub"))
    raise_for_misfit(encoder, state, path, preset)
    if isinstance(encoder, Dinov2Tokens):
        encoder.model.load_state_dict(state, strict=True)
    else:
        encoder.load_state_dict(state, strict=True)


def check_weights(preset: FoundationPreset, options: dict[str, Any], path: Path) -> None:
    """Refuse a misfit before any slide or tile is read: the encoder on the meta device, the file read lazily."""
    with torch.device("meta"):
        encoder = create_encoder(preset, options)
    raise_for_misfit(encoder, strip_wrappers(read_weights_file(path, lazy=True)), path, preset)


def raise_for_misfit(encoder: nn.Module, state: dict[str, torch.Tensor], path: Path, preset: FoundationPreset) -> None:
    own = (encoder.model if isinstance(encoder, Dinov2Tokens) else encoder).state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)}, not {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:2]})" if missing else ""]
        parts += [f"{len(extra)} not of this network (e.g. {extra[:2]})" if extra else ""]
        parts += [f"{len(wrong)} of another shape (e.g. {wrong[:2]})" if wrong else ""]
        raise CheckpointError(
            f"{path}: not the weights of {preset.name} ({preset.hf_repo}, {len(own)} tensors): "
            + "; ".join(p for p in parts if p)
        )


def build_foundation_classifier(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> EncoderClassifier:
    """The registry's builder: the preset's encoder, its weights from the file ``pretrained`` (``none``:
    random), and a linear head on the mean of its patch tokens."""
    preset = foundation_preset(arch)
    if pretrained in ("imagenet", "hub"):
        raise CheckpointError(
            f"--arch {arch}: its weights come from {preset.hf_repo} (`--weights hub`, fetched before the model is "
            "built) or a local file (--weights FILE)"
        )
    if input_size % preset.patch_px:
        raise CheckpointError(
            f"--arch {arch}: the input size {input_size} px is not a multiple of its {preset.patch_px} px patches"
        )
    options = {**options, "img_size": input_size} if preset.library == "timm" else options
    encoder = create_encoder(preset, options)
    if pretrained != "none":
        load_strict(encoder, Path(pretrained), preset)
    return EncoderClassifier(encoder, num_classes)


def embed(preset: FoundationPreset, tokens: torch.Tensor) -> torch.Tensor:
    """The preset's tile embedding from its last-block tokens [N, prefix + patches, C] (after the final norm)."""
    if preset.embedding == "cls":
        return tokens[:, 0]
    if preset.embedding == "cls+mean":  # Virchow2: registers (tokens 1..R) left out of the mean
        return torch.cat([tokens[:, 0], tokens[:, 1 + preset.register_tokens :].mean(dim=1)], dim=-1)
    raise ValueError(f"{preset.name}: unknown embedding rule {preset.embedding!r}")


def embedding_width(preset: FoundationPreset, encoder: nn.Module) -> int:
    """The width ``embed`` gives for this encoder (the preset's, unless options changed the token width)."""
    width = int(getattr(encoder, "num_features", preset.embed_dim))
    return 2 * width if preset.embedding == "cls+mean" else width


def encoder_state_sha256(encoder: nn.Module) -> str:
    """The identity of an encoder's weights: SHA-256 over each tensor's name, dtype, shape and bytes, in name
    order. The same for the network ``features`` ran and the encoder inside a head's checkpoint built on it."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
