"""A WSInfer model of an architecture we have no eager network for: its TorchScript, scored as it is.

Such a model gives logits and nothing else, so DT Grad-CAM is not defined for it: it scores without CAM
(the heatmap's tumour layer is then its probability layer) and runs on torch in fp32, as traced (it
cannot be re-exported to ONNX, and autocast does not reach into a traced graph reliably).

Loading TorchScript runs the model's own TorchScript code (never Python). A model folder is trusted input,
so the TorchScript is loaded only from the import cache made from one (a model folder's ``.wsi-dala/`` or
``~/.cache/wsi-dala/imported/``), and only when its SHA-256 is the one the checkpoint's card records: a
safetensors checkpoint found elsewhere never makes wsi-dala run TorchScript.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.identity import file_sha256
from wsi_dala.core.layout import imported_torchscript, is_import_cache

IMPORTED_TORCHSCRIPT = "torchscript"  # the card's architecture for these models
SHA256_OPTION = "torchscript_sha256"


class ScriptedClassifier(nn.Module):
    """Logits from a TorchScript module, behind the features/head split: the "features" are the logits
    as a 1 x 1 map, the head flattens them."""

    spatial_features = False  # no feature map: no Grad-CAM
    exportable = False  # scored by torch as traced, in fp32

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.scripted(x.float()).float()[:, :, None, None]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def load_torchscript(script: Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """The module and the extra files asked for (empty strings when absent)."""
    from wsi_dala.model.wsinfer_format import CARD_EXTRA_FILE

    extra = {CARD_EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x
            scripted = torch.jit.load(str(script), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError, ValueError... for a file that is not TorchScript
        why = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"{script}: not a loadable TorchScript file ({why})") from exc
    return scripted, {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in extra.items()}


def load_imported_scripted(checkpoint: Path, options: dict[str, object]) -> ScriptedClassifier:
    """The TorchScript model beside ``checkpoint``, checked as the module docstring says."""
    if not is_import_cache(checkpoint.parent):
        raise CheckpointError(
            f"{checkpoint}: a checkpoint that runs TorchScript is loaded only from the import cache of a WSInfer "
            "model folder; give the folder itself: run --model DIR"
        )
    script = imported_torchscript(checkpoint)
    if not script.is_file():
        raise CheckpointError(
            f"{checkpoint}: its TorchScript {script.name} is missing; delete the checkpoint to re-import"
        )
    if file_sha256(script) != options.get(SHA256_OPTION):
        raise CheckpointError(f"{script}: changed since it was imported (SHA-256); delete it and {checkpoint.name}")
    scripted, _ = load_torchscript(script)
    return ScriptedClassifier(scripted.eval()).eval()
