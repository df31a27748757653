"""The model card and the cheap reads of a checkpoint: its card from the safetensors header, its hash.

Torch-free on purpose: a run reads the card, picks the tiling and starts reading tiles while torch is
still importing in the background (``wsi_dala.runs.pipeline``); the weights are checked against the
architecture in ``wsi_dala.model.checkpoint``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from wsi_dala import __version__
from wsi_dala.core.config import MIN_TILE_SIZE_PX
from wsi_dala.core.errors import CheckpointError, ConfigError
from wsi_dala.model.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE
from wsi_dala.model.normalisation import IMAGENET_MEAN, IMAGENET_STD
from wsi_dala.model.slide_thresholds import SlideThresholds
from wsi_dala.tissue.stain import StainProfile

PRETRAIN_CARD_KEY = "wsi_dala.pretrain_card"  # safetensors metadata of a `wsi-dala pretrain` backbone
GAN_CARD_KEY = "wsi_dala.gan_card"  # ... and of a `wsi-dala gan train` checkpoint (never a backbone)


def _torch_version() -> str:
    """torch's version without importing torch (seconds at start-up)."""
    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


CARD_KEY = "wsi_dala.model_card"


@dataclass
class ModelCard:
    """What travels with every checkpoint: enough to use the model correctly on a new slide."""

    architecture: str
    class_names: list[str]
    positive_class: str
    tile_size_px: int
    mpp: float | None  # µm/px of the training images; None if unknown
    mpp_note: str = ""  # where the µm/px comes from (measured by the tiler, or an assumption)
    options: dict[str, Any] = field(default_factory=dict)
    normalisation: dict[str, list[float]] = field(
        default_factory=lambda: {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    )
    training_data: dict[str, Any] = field(default_factory=dict)
    # The training tiles' stain (wsi_dala.tissue.stain.StainProfile.to_dict()): what --stain-normalise maps slides to.
    stain_reference: dict[str, Any] | None = None
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    # Temperature scaling (one scalar, fitted on validation tiles by NLL): probabilities are softmax(logits / T).
    # None: uncalibrated, used as T = 1. ``calibration`` says where it was fitted and ECE/Brier/NLL before/after.
    temperature: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    # The mean Grad-CAM over a tile of the positive class (g x g, mean 1), measured on validation tiles: how much
    # weaker the CAM is at a tile's borders; the heatmap divides it out (wsi_dala.explain.border_profile).
    # None: not measured.
    cam_profile: list[list[float]] | None = None
    # Slide-level thresholds on one slide measure, chosen from slide labels (wsi_dala.model.slide_thresholds);
    # empty: every slide call is "indeterminate".
    slide_thresholds: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=lambda: {"wsi_dala": __version__, "torch": _torch_version()})
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    def validate(self, source: str = "model card") -> None:
        if self.positive_class not in self.class_names:
            raise CheckpointError(f"{source}: positive class {self.positive_class!r} not in {self.class_names}")
        if self.tile_size_px < MIN_TILE_SIZE_PX:
            raise CheckpointError(f"{source}: tile size {self.tile_size_px} is not usable")
        if self.mpp is not None and not 0.01 <= self.mpp <= 100:
            raise CheckpointError(f"{source}: µm/px {self.mpp} is implausible")
        if self.temperature is not None and not (
            isinstance(self.temperature, (int, float)) and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE
        ):
            raise CheckpointError(
                f"{source}: temperature {self.temperature!r} is not from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}"
            )
        if not _plain_json(self.calibration):
            raise CheckpointError(f"{source}: calibration must be a small record of names, numbers and text")
        if self.cam_profile is not None:
            profile = np.asarray(self.cam_profile, dtype=object)
            try:
                values = np.asarray(self.cam_profile, dtype=np.float64)
            except (TypeError, ValueError):
                values = np.zeros(0)
            if (
                profile.ndim != 2
                or values.ndim != 2
                or values.shape[0] != values.shape[1]
                or not (np.isfinite(values).all() and (values > 0).all())
            ):
                raise CheckpointError(f"{source}: cam_profile must be a square grid of positive numbers")
        if not _plain_json(self.slide_thresholds):
            raise CheckpointError(f"{source}: slide_thresholds must be a small record of names, numbers and text")
        try:
            SlideThresholds.from_card(self.slide_thresholds, source)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc
        if self.stain_reference is not None:
            try:
                StainProfile.from_dict(self.stain_reference, f"{source}: stain_reference")
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from exc

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str = "model card") -> ModelCard:
        try:
            data = json.loads(text)
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            card = cls(**known)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: unreadable model card ({exc})") from exc
        card.validate(source)
        return card


def _plain_json(value: Any, depth: int = 0) -> bool:
    """A dict of short names to finite numbers, short text, lists and such dicts, a few levels deep: what
    a card's free-form records may hold before they are copied into run.json (never trusted as is)."""
    if depth > 4:
        return False
    if isinstance(value, dict):
        return (depth > 0 or len(value) <= 64) and all(
            isinstance(k, str) and len(k) <= 64 and _plain_json(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list):
        return len(value) <= 256 and all(_plain_json(v, depth + 1) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 500
    return value is None or isinstance(value, (bool, int))


@dataclass(frozen=True)
class KnownCheckpoint:
    """A checkpoint as one run knows it: read and hashed once, then handed to every stage that needs its card
    or its identity (the run key, the scoring key, the engine cache)."""

    path: Path
    card: ModelCard
    sha256: str

    @classmethod
    def read(cls, path: str | os.PathLike, card: ModelCard | None = None) -> KnownCheckpoint:
        from wsi_dala.core.identity import file_sha256

        return cls(Path(path), card if card is not None else read_card(path), file_sha256(Path(path)))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's header metadata (cards live there), read without the weights; a pickle, a file
    cut short or not safetensors at all is refused by name."""
    path = _check_safetensors(Path(path))
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from exc


def read_card(path: str | os.PathLike) -> ModelCard:
    """The model card alone (cheap: reads the header only)."""
    path = Path(path)
    metadata = safetensors_metadata(path)
    if CARD_KEY not in metadata:
        if GAN_CARD_KEY in metadata:
            raise CheckpointError(
                f"{path}: a GAN checkpoint (wsi-dala gan train), not a classifier: sample tiles from it"
            )
        if PRETRAIN_CARD_KEY in metadata:
            raise CheckpointError(
                f"{path}: a pre-trained backbone (wsi-dala pretrain), not a classifier: train one with "
                f"`wsi-dala train --pretrained {path.name}` first"
            )
        raise CheckpointError(f"{path}: safetensors file without a wsi-dala model card")
    return ModelCard.from_json(metadata[CARD_KEY], source=str(path))


def write_with_card(source: str | os.PathLike, target: str | os.PathLike, card: ModelCard) -> Path:
    """Copy checkpoint ``source`` to ``target`` with ``card`` in place of its own: the header is rewritten, the
    weights' bytes are copied as they are (no torch, nothing loaded), atomically."""
    from wsi_dala.core.fileio import atomic_open

    card.validate(str(target))
    source = _check_safetensors(Path(source))
    with open(source, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        header["__metadata__"] = {**header.get("__metadata__", {}), CARD_KEY: card.to_json()}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        with atomic_open(target, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            while chunk := handle.read(1 << 24):
                out.write(chunk)
    return Path(target)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def _check_safetensors(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as handle:
        head = handle.read(16)
    # A safetensors file opens with its JSON header's length (u64, little-endian) and then "{": checked
    # first, because that length can itself begin with the bytes of a pickle's protocol marker.
    header_length = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    size = path.stat().st_size
    looks_safetensors = head[8:9] == b"{" and 0 < header_length <= size - 8
    if head[8:9] == b"{" and header_length > size - 8 and path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: a safetensors file cut short (its header says {header_length} bytes, the file has {size}); "
            "copy it again"
        )
    looks_pickle = head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04"
    if (looks_pickle and not looks_safetensors) or path.suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"):
        raise CheckpointError(
            f"{path}: pickle checkpoints can run code when loaded and are refused; "
            "use a .safetensors checkpoint written by wsi-dala train"
        )
    if len(head) < 8 or int.from_bytes(head[:8], "little") > 100_000_000:
        raise CheckpointError(f"{path}: not a safetensors file")
    return path


def card_origin(card: ModelCard) -> dict[str, Any]:
    """Where the model came from, and what it is for: a hub model's repository, commit and licence as its card
    records them; for our own checkpoints, what they were trained on."""
    origin = card.training_data.get("origin")
    if isinstance(origin, dict):
        return origin
    imported = card.training_data.get("imported_from") == "wsinfer"
    return {
        "from": "WSInfer model folder" if imported else "trained with wsi-dala",
        "training_data": card.training_data.get("source", "unknown"),
        "licence": "unknown" if imported else "set by whoever trained it",
        "tissue": "unknown",
        "intended_use": "unknown" if imported else "see training_data",
    }
