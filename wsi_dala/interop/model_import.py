"""WSInfer model folders (``config.json`` + TorchScript) as wsi-dala checkpoints, so ``run --model DIR`` works.

The folder is converted once into a safetensors checkpoint with a model card, cached beside it in
``DIR/.wsi-dala/`` (or ``~/.cache/wsi-dala/imported/`` when the folder is read-only) and named by the
hash of both files; everything downstream (engines, scoring, DT Grad-CAM, run keys) then sees an
ordinary checkpoint. The TorchScript's weights are loaded into the eager network its ``architecture``
names, so Grad-CAM has its feature map: ResNet-18/34/50 (torchvision's and timm's share parameter
names). Other architectures score through their TorchScript as it is (``wsi_dala.model.scripted``):
probabilities without DT Grad-CAM, the heatmap's tumour layer then being the probability layer.

``torch.jit.load`` runs no Python from the file (TorchScript is its own interpreted language), but it
runs the model's own code: a model folder is trusted input, like any model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.fileio import ensure_writable_dir
from wsi_dala.core.identity import file_sha256
from wsi_dala.core.layout import IMPORT_CACHE_DIR, WSInferModelLayout, imported_torchscript, writing_path
from wsi_dala.interop.wsinfer_geometry import input_size, network_mpp
from wsi_dala.model import ModelCard, build_model, save_checkpoint
from wsi_dala.model.registry import WSINFER_IMPORTS
from wsi_dala.model.scripted import IMPORTED_TORCHSCRIPT, SHA256_OPTION, load_torchscript
from wsi_dala.model.wsinfer_format import (
    CARD_EXTRA_FILE,
    normalisation_of,
    positive_class_of,
    read_wsinfer_config,
    wsinfer_config,
)

log = logging.getLogger(__name__)


def is_wsinfer_folder(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and WSInferModelLayout(Path(path)).config_json.exists()


def torchscript_file(folder: Path) -> Path:
    """``torchscript_model.pt``, or the folder's only ``.pt`` file."""
    named = WSInferModelLayout(folder).torchscript
    if named.exists():
        return named
    candidates = sorted(folder.glob("*.pt"))
    if len(candidates) != 1:
        raise CheckpointError(f"{folder}: no {named.name} (a WSInfer model folder holds config.json and it)")
    return candidates[0]


def imported_checkpoint(
    folder: str | os.PathLike[str], positive_class: str | None = None, origin: dict[str, Any] | None = None
) -> Path:
    """The wsi-dala checkpoint of a WSInfer model folder: converted on first use, then reused.

    ``origin`` (a hub model's repository, commit, licence...) goes into the card; such a folder is a Hugging
    Face snapshot, so the checkpoint is kept in the user's import cache, never written into it."""
    folder = Path(folder)
    layout = WSInferModelLayout(folder)
    config_path = layout.config_json
    config = read_wsinfer_config(config_path)
    script = torchscript_file(folder)
    names = list(config["class_names"])
    digest = hashlib.sha256()
    hub_identity = f"{origin['hf_repo_id']}@{origin['hf_revision']}" if origin else ""
    for part in (config_path.read_bytes(), script.read_bytes(), (positive_class or "").encode(), hub_identity.encode()):
        digest.update(hashlib.sha256(part).digest())
    cache = ensure_writable_dir(IMPORT_CACHE_DIR.expanduser()) if origin else _cache_dir(layout)
    name = re.sub(r"[^\w.-]+", "-", origin["name"].removeprefix("hf:")) if origin else None
    target = layout.imported_checkpoint(cache, digest.hexdigest(), name)
    if target.exists():
        return target
    scripted, extra_files = load_torchscript(script)
    extra = extra_files[CARD_EXTRA_FILE]
    if extra:  # written by `wsi-dala export-model`: our own card and network, whatever the architecture
        card = ModelCard.from_json(extra, f"{script} (its wsi-dala model card)")
        _warn_if_config_edited(config_path, card, script)
        if positive_class is not None:
            card.positive_class = positive_class_of(card.class_names, positive_class, str(config_path))
        model = _our_model(scripted, card, script)
    else:
        architecture = str(config.get("architecture", ""))
        ours = WSINFER_IMPORTS.get(architecture.lower())
        positive = positive_class_of(names, positive_class, str(config_path))  # our exports' cards know theirs
        if ours is None:  # no eager network: the TorchScript scores as it is, without DT Grad-CAM
            _check_scripted_output(scripted, config, len(names), script)
            log.warning(
                "%s: architecture %r has no eager network here (DT Grad-CAM needs one: %s); it scores "
                "without CAM and the tumour layer is its probability",
                config_path,
                architecture,
                ", ".join(WSINFER_IMPORTS),
            )
            card = _card(config, IMPORTED_TORCHSCRIPT, names, positive, config_path, origin)
            return _save_scripted(target, script, card)
        model = _torchvision_model(scripted, script, ours, len(names))
        card = _card(config, ours, names, positive, config_path, origin)
    if origin:
        card.training_data["origin"] = origin
    _save(target, model, card)
    return target


def _warn_if_config_edited(config_path: Path, card: ModelCard, script: Path) -> None:
    """A folder written by ``export-model`` carries its card inside the TorchScript, and that card is what
    scores; an edit to config.json (other classes, another spacing) would otherwise be ignored without a word."""
    try:
        written = wsinfer_config(card)
    except CheckpointError:
        return
    found = json.loads(config_path.read_text())
    edited = [key for key, value in written.items() if json.dumps(found.get(key)) != json.dumps(value)]
    if edited:
        log.warning(
            "%s: %s differ from the model card inside %s, which wins (it is what the network was trained with); "
            "to change them, export the model again",
            config_path,
            ", ".join(edited),
            script.name,
        )


def _save(target: Path, model: torch.nn.Module, card: ModelCard) -> None:
    partial = writing_path(target, os.getpid())
    try:
        save_checkpoint(partial, model, card)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _save_scripted(target: Path, script: Path, card: ModelCard) -> Path:
    """A card-only checkpoint and, beside it, a copy of the TorchScript whose SHA-256 the card records (the
    copy, so a later change to the model folder cannot change what this checkpoint scores with)."""
    copy = imported_torchscript(target)
    partial = writing_path(copy, os.getpid())
    try:
        shutil.copyfile(script, partial)
        os.replace(partial, copy)
    finally:
        partial.unlink(missing_ok=True)
    card.options = {SHA256_OPTION: file_sha256(copy)}
    card.training_data["note"] = "TorchScript only: no eager network, so no DT Grad-CAM"
    _save(target, torch.nn.Module(), card)
    return target


def _check_scripted_output(scripted: torch.jit.ScriptModule, config: dict, n_classes: int, script: Path) -> None:
    """One forward pass on a blank patch: the model must take [1, 3, H, W] and give [1, n_classes] logits."""
    size = input_size(config, script)
    try:
        with torch.no_grad():
            out = scripted(torch.zeros(1, 3, size, size))
    except Exception as exc:
        why = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"{script}: does not run on a {size} x {size} patch ({why})") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, n_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(f"{script}: gives {shape} for one patch, not [1, {n_classes}] class logits")


def _cache_dir(layout: WSInferModelLayout) -> Path:
    try:
        return ensure_writable_dir(layout.import_dir)
    except Exception:  # a read-only model folder (a shared models share): the user's cache instead
        return ensure_writable_dir(IMPORT_CACHE_DIR.expanduser())


def _our_model(scripted: torch.jit.ScriptModule, card: ModelCard, script: Path) -> torch.nn.Module:
    """Our network rebuilt from its card, with the traced module's weights (``model.`` below the wrapper)."""
    state = {k.removeprefix("model."): v for k, v in scripted.state_dict().items() if k.startswith("model.")}
    model = build_model(card.architecture, len(card.class_names), "none", card.options, card.tile_size_px)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        why = str(exc).splitlines()[0]
        raise CheckpointError(f"{script}: its weights do not fit {card.architecture} ({why})") from exc
    return model.eval()


def _torchvision_model(scripted: torch.jit.ScriptModule, script: Path, architecture: str, n: int) -> torch.nn.Module:
    """Our split network with a torchvision-layout TorchScript's weights (every parameter named and shaped alike)."""
    from torchvision import models as tvm

    state = {k: v for k, v in scripted.state_dict().items() if not k.endswith("num_batches_tracked")}
    network = getattr(tvm, architecture)(weights=None, num_classes=n)
    expected = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
    if set(state) != expected:
        stray = sorted(set(state) ^ expected)[:3]
        raise CheckpointError(f"{script}: its weights do not fit {architecture} (e.g. {', '.join(stray)})")
    try:
        network.load_state_dict(state, strict=False)  # the BN step counters are not in every export
    except RuntimeError as exc:
        raise CheckpointError(f"{script}: its weights do not fit {architecture} ({str(exc).splitlines()[0]})") from exc
    model = build_model(architecture, n, "none")
    features, head = model.features, model.head
    assert isinstance(features, torch.nn.Module) and isinstance(head, torch.nn.Sequential)
    features.load_state_dict(torch.nn.Sequential(*list(network.children())[:-2]).state_dict())
    head[-1].load_state_dict(network.fc.state_dict())
    return model.eval()


def _card(
    config: dict, architecture: str, names: list[str], positive: str, source: Path, origin: dict[str, Any] | None
) -> ModelCard:
    """The model card: the Resize step sets the network's input size, so the tile's µm/px is the patch's
    spacing scaled by patch size / input size."""
    size = input_size(config, source)
    patch_px, spacing = int(config["patch_size_pixels"]), float(config["spacing_um_px"])
    card = ModelCard(
        architecture=architecture,
        class_names=names,
        positive_class=positive,
        tile_size_px=size,
        mpp=network_mpp(config, source),
        mpp_note=f"from WSInfer config.json: {patch_px} px at {spacing:g} µm/px, resized to {size} px",
        normalisation=normalisation_of(config, str(source)),
        training_data={"imported_from": "wsinfer", "config": source.name, **({"origin": origin} if origin else {})},
    )
    card.validate(str(source))
    return card
