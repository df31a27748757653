"""The card of an attention-MIL model (``wsi-dala mil train``): what it reads (which encoder's features, at
which tiles), what it answers (class names, the positive class, slide thresholds) and how it was trained.

Torch-free: ``run`` reads it to find the stored features it needs before any network is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wsi_dala import __version__
from wsi_dala.core.errors import CheckpointError, ConfigError
from wsi_dala.core.identity import config_hash
from wsi_dala.model.card import safetensors_metadata
from wsi_dala.model.slide_thresholds import SlideThresholds

MIL_CARD_KEY = "wsi_dala.mil_card"
MIL_KINDS = ("abmil",)


def encoder_identity(card: dict[str, Any]) -> str:
    """What makes two features stores comparable: the encoder and its weights (by their hash), not the
    engine or precision it ran at, the name of its weights file or the slide it ran on."""
    weights = card.get("weights")
    weights = {k: v for k, v in weights.items() if k != "file"} if isinstance(weights, dict) else weights
    return config_hash({**{k: v for k, v in card.items() if k not in ("precision", "engine")}, "weights": weights})


@dataclass
class MilCard:
    kind: str
    in_dim: int
    class_names: list[str]
    positive_class: str
    encoder: dict[str, Any]  # the features stores' encoder card
    encoder_key: str  # encoder_identity(encoder)
    tile_mpp: float  # the stores' tiles: µm/px and size, as the tiler made them
    tile_size_px: int
    feature: str = "embedding"  # the features store's array it reads: embedding | token_mean
    hidden: int = 256
    attention: int = 128
    dropout: float = 0.25
    slide_thresholds: dict[str, Any] = field(default_factory=dict)  # on "slide_probability"
    training: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=lambda: {"wsi_dala": __version__})
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    def validate(self, source: str) -> None:
        if self.kind not in MIL_KINDS:
            raise CheckpointError(f"{source}: MIL kind {self.kind!r} is not one of {MIL_KINDS}")
        if self.positive_class not in self.class_names or len(self.class_names) != 2:
            raise CheckpointError(f"{source}: a MIL model needs two classes, the positive one among them")
        if self.feature not in ("embedding", "token_mean"):
            raise CheckpointError(f"{source}: MIL feature {self.feature!r} is not embedding or token_mean")
        if not (isinstance(self.in_dim, int) and 0 < self.in_dim <= 65536):
            raise CheckpointError(f"{source}: input width {self.in_dim!r} is not usable")
        try:
            SlideThresholds.from_card(self.slide_thresholds, source)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)


def read_mil_card(path: str | os.PathLike) -> MilCard:
    """The MIL card from a safetensors header (no weights read); refused by name when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: MIL model not found")
    metadata = safetensors_metadata(path)  # a pickle is refused before anything is read
    if MIL_CARD_KEY not in metadata:
        raise CheckpointError(f"{path}: not a MIL model (`wsi-dala mil train` writes them)")
    try:
        data = json.loads(metadata[MIL_CARD_KEY])
        card = MilCard(**{k: v for k, v in data.items() if k in MilCard.__dataclass_fields__})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable MIL card ({exc})") from exc
    card.validate(str(path))
    return card
