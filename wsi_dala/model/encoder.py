"""Any timm network as a frozen-or-trainable encoder with a small linear head (``--arch timm:NAME``).

Foundation models for pathology (UNI's ViT-L/16, CONCH, Virchow, Phikon...) and plain CNNs all come as
timm networks with local weights. The head pools the encoder's *spatial* output — a CNN's last feature
map, or a ViT's last-block patch tokens (after the final norm) reshaped to the patch grid — and applies
one linear layer. Pooling patch tokens rather than reading the class token is a choice: it makes the
logit a linear function of every location, so DT Grad-CAM differentiated through the head alone is
exact (Grad-CAM equals CAM here) and means the same for a ViT as for a CNN. A class token's output
would not depend on the last block's patch tokens at all.

Weights come only from a local file (``--weights``): safetensors, or a torch file read with
``weights_only=True``. Nothing is downloaded. Common wrapper prefixes (``module.``, ``model.``) are
stripped, classifier tensors the encoder has no place for are dropped, a ViT's position embedding is
resampled (timm's own ``resample_abs_pos_embed``) when the file was trained at another input size,
and a file that lacks any of the encoder's tensors is refused by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.extras import require
from wsi_dala.model.interface import as_split
from wsi_dala.model.registry import TIMM_PREFIX

log = logging.getLogger(__name__)
_WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "backbone.")


class EncoderClassifier(nn.Module):
    """``encoder`` (a timm network without its classifier) and ``head``: mean over locations, then linear."""

    spatial_features = True  # forward_features gives [N, C, h, w]: DT Grad-CAM applies

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        width = getattr(encoder, "num_features", None)  # timm's pooled feature width
        if not isinstance(width, int):
            raise CheckpointError(f"{type(encoder).__name__} does not say its feature width (num_features)")
        self.head = nn.Linear(width, num_classes)
        self._prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 0) or 0)
        self._channels_last = getattr(encoder, "output_fmt", "NCHW") == "NHWC"  # timm's Swin, for one

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = as_split(self.encoder).forward_features(x)
        if out.ndim == 3:  # ViT tokens [N, prefix + h*w, C] -> [N, C, h, w]
            return self._token_grid(out, x.shape[-2], x.shape[-1])
        if out.ndim == 4 and self._channels_last:
            return out.permute(0, 3, 1, 2)
        return out

    def linear_probe_encoder(self) -> nn.Module:
        """The part ``train --freeze-backbone`` freezes: the whole timm network."""
        return self.encoder

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _token_grid(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        patches = tokens[:, self._prefix_tokens :]
        patch_h, patch_w = _patch_size(self.encoder)
        grid_h, grid_w = height // patch_h, width // patch_w
        if grid_h * grid_w != patches.shape[1]:
            raise ValueError(
                f"{patches.shape[1]} patch tokens do not form the {grid_h}x{grid_w} grid of a {height}x{width} input"
            )
        # unflatten, not reshape(len(tokens), ...): a traced export must keep the batch dimension free
        return patches.transpose(1, 2).unflatten(2, (grid_h, grid_w))


def _patch_size(encoder: nn.Module) -> tuple[int, int]:
    patch_embed = getattr(encoder, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        raise ValueError(f"{type(encoder).__name__} returns tokens but has no patch_embed.patch_size")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def timm_name(arch: str) -> str:
    """``timm:vit_large_patch16_224`` -> ``vit_large_patch16_224``."""
    return arch[len(TIMM_PREFIX) :]


def build_encoder_classifier(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> EncoderClassifier:
    """The timm network ``arch`` names, built with ``options`` as timm keyword arguments (e.g. UNI's
    ``init_values``), its weights from the local file ``pretrained`` (or random with ``none``)."""
    timm = require("timm", f"--arch {arch}")

    name = timm_name(arch)
    if not timm.is_model(name):
        raise CheckpointError(f"--arch {arch}: timm {timm.__version__} has no model {name!r} (see timm.list_models())")
    if pretrained == "imagenet":
        raise CheckpointError(
            f"--arch {arch}: give the encoder's weights as a local file with --weights FILE (nothing is "
            "downloaded), or --weights none for random weights"
        )
    encoder = _create(timm, name, options, input_size)
    if pretrained != "none":
        load_encoder_weights(encoder, Path(pretrained), arch)
    return EncoderClassifier(encoder, num_classes)


def _create(timm: Any, name: str, options: dict[str, Any], input_size: int) -> nn.Module:
    kwargs = {"num_classes": 0, **options}
    try:
        # Transformers take the input size (their position embedding depends on it); CNNs refuse the keyword.
        return timm.create_model(name, pretrained=False, **{"img_size": input_size, **kwargs})
    except TypeError:
        pass
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"--arch timm:{name}: timm cannot build it with options {options} ({exc})") from exc


def read_weights_file(
    path: Path, lazy: bool = False, what: str = "encoder weights", instead: str = "--weights none"
) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file without executing code (``weights_only``).
    ``lazy``: tensors on the meta device (safetensors) or memory-mapped (torch), for checking shapes.
    ``what`` and ``instead`` word the error for a missing file (which file, and the option to do without)."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: {what} file not found; put the model's weights (.safetensors, .bin or .pth) "
            f"there, or use {instead} for random weights"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if lazy:
                with safe_open(str(path), framework="pt") as handle:
                    return {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}  # noqa: SIM118
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except Exception as exc:  # pickle errors of every kind: refused, never executed
        raise CheckpointError(f"{path}: not a weights-only torch file ({' '.join(str(exc).split())[:200]})") from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return loaded


def check_encoder_weights(arch: str, options: dict[str, Any], path: Path, input_size: int) -> None:
    """Refuse a weights file that does not fit ``arch`` before any data is read (tiling slides takes long):
    the network is built on the meta device (no memory) and the file read lazily (``mmap``)."""
    timm = require("timm", f"--arch {arch}")

    with torch.device("meta"):
        encoder = _create(timm, timm_name(arch), options, input_size)
    state = strip_wrappers(read_weights_file(path, lazy=True))
    _raise_for_misfit(encoder.state_dict(), state, path, arch)


def load_encoder_weights(encoder: nn.Module, path: Path, arch: str) -> None:
    """Load ``path`` into ``encoder``; every encoder tensor must come from the file."""
    state = strip_wrappers(read_weights_file(path))
    own = encoder.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
    _resample_position_embedding(state, own)
    _raise_for_misfit(own, state, path, arch)
    unused = [k for k in state if k not in own]
    if unused:
        log.warning("%s: %d tensors the encoder does not use, ignored (e.g. %s)", path, len(unused), unused[:3])
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)


def _raise_for_misfit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Every tensor of the encoder must be in the file with its shape (a ViT's position embedding may
    differ in length: it is resampled)."""
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape and k != "pos_embed"]
    if missing or wrong:
        example = (missing or wrong)[:3]
        raise CheckpointError(
            f"{path}: does not fit {arch} ({len(missing)} of its {len(own)} tensors missing, {len(wrong)} of "
            f"another shape, e.g. {example}); are these the weights of another network, or does it need "
            "--timm-option settings (e.g. init_values=1e-5 for UNI)?"
        )


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _resample_position_embedding(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """A ViT trained at another input size: its absolute position embedding resampled to this grid."""
    key = "pos_embed"
    if key not in state or key not in own or state[key].shape == own[key].shape:
        return
    from timm.layers import resample_abs_pos_embed

    source, target = state[key], own[key]
    prefix = 0
    for n in range(0, 9):  # class and register tokens come first; the rest is a square grid
        side = round((source.shape[1] - n) ** 0.5)
        if side * side == source.shape[1] - n:
            prefix = n
            break
    target_side = round((target.shape[1] - prefix) ** 0.5)
    state[key] = resample_abs_pos_embed(source, [target_side, target_side], num_prefix_tokens=prefix)
