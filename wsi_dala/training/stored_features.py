"""``train --freeze-backbone`` on slide tiles: the training tiles' encoder features read from ``features.zarr``
stores, so the encoder (a ViT-L or ViT-g) runs once per tile and never again for another head.

The stores are the ones ``wsi-dala features`` writes: named with ``--features DIR``, or computed by the
training itself beside each slide's training tiles (``OUT/tiles/<slide>/features.zarr``), which a later
training, ``mil train`` or ``run`` may then name. A linear head pools the mean of the encoder's last map
(a preset's: its last block's patch tokens); each features store keeps that mean per tile (``token_mean``).

A training tile's row is found by its slide (the tile store's fingerprint of it), its tile size and µm/px,
and its level-0 coordinates, so the training run may tile the slide itself (its own ``--min-tissue`` and
annotations). Every tile must be found in a store of the same encoder (architecture, options,
normalisation, input size, stain mapping, and an equal SHA-256 over the encoder's tensors), else the
training is refused in one line naming the slide before any epoch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_dala.core.config import TrainConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.identity import file_sha256
from wsi_dala.model.card import ModelCard
from wsi_dala.model.devices import resolve_precision
from wsi_dala.model.foundation import embedding_width, encoder_state_sha256
from wsi_dala.model.foundation_presets import PRESETS
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.tiling.features_store import TOKEN_MEAN, FeaturesStore, find_stores
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.datasets import Sample


class StoredFeatures:
    """The stores under ``places`` made by ``encoder`` (the session's), and rows read from them."""

    def __init__(self, places: list[str], encoder: nn.Module, card: ModelCard, expected: dict[str, Any]) -> None:
        stores = [FeaturesStore.open(path) for path in find_stores(places)]
        sha = encoder_state_sha256(encoder)
        self.places = places
        self.stores = [s for s in stores if _same_encoder(s.encoder, card, sha, expected)]
        if not self.stores:
            found = ", ".join(sorted({_made_by(s.encoder) for s in stores})) or "none"
            raise ConfigError(
                f"--features {' '.join(places)}: no features store of this encoder ({card.architecture}, options "
                f"{card.options}, these weights); stores found: {len(stores)} (encoders: {found})"
            )

    def token_means(self, samples: list[Sample]) -> np.ndarray:
        """[len(samples), C] float32: each training tile's mean patch token, in the samples' order."""
        by_source: dict[str, list[int]] = {}
        for position, sample in enumerate(samples):
            if sample.index < 0:
                raise ConfigError(f"--features: {sample.source} is an image file; stored features are of slide tiles")
            by_source.setdefault(sample.source, []).append(position)
        out: np.ndarray | None = None
        for source, positions in by_source.items():
            tiles = TileStore(source)
            coords = tiles.coords()[[samples[p].index for p in positions]]
            values = self._rows(tiles, coords)
            if out is None:
                out = np.zeros((len(samples), values.shape[1]), dtype=np.float32)
            out[positions] = values
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def _rows(self, tiles: TileStore, coords: np.ndarray) -> np.ndarray:
        tiling = tiles.info.tiling
        for store in self.stores:
            theirs = store.tiling
            if (
                theirs.slide.fingerprint != tiling.slide.fingerprint
                or theirs.tile_size_px != tiling.tile_size_px
                or not math.isclose(theirs.effective_mpp, tiling.effective_mpp, rel_tol=1e-3)
            ):
                continue
            rows = store.rows_at(coords)
            if rows is not None:
                return store.array(TOKEN_MEAN)[rows].astype(np.float32)
        raise ConfigError(
            f"{tiling.slide.name}: no features store in --features {' '.join(self.places)} holds its "
            f"{len(coords)} training tiles ({tiling.tile_size_px} px at {tiling.effective_mpp:.3g} µm/px) from "
            "this encoder; run `wsi-dala features` on it with the same settings"
        )


def expected_encoder(arch: str, input_size: int, stain: StainNormaliser | None) -> dict[str, Any]:
    """What a store's encoder card must say besides the architecture and weights: the encoder's input size (a
    preset's own; else the training's) and the stain mapping applied first (None: none)."""
    preset = PRESETS.get(arch)
    return {"input_px": preset.input_px if preset else input_size, "stain": stain_description(stain)}


def stain_description(stain: StainNormaliser | None) -> dict[str, Any] | None:
    if stain is None:
        return None
    return {"method": stain.method, "source": stain.source.to_dict(), "target": stain.target.to_dict()}


def training_encoder_card(
    model: nn.Module,
    encoder: nn.Module,
    config: TrainConfig,
    card: ModelCard,
    device: torch.device,
    stain: StainNormaliser | None,
) -> dict[str, Any]:
    """The encoder card a training writes into a slide's ``features.zarr``: as ``wsi-dala features`` writes it
    for a preset (its own transform), or for another frozen encoder its architecture, options, input size and
    normalisation; always the SHA-256 over the encoder's tensors, and the stain mapping when there is one."""
    from wsi_dala.inference.features import checkpoint_encoder_card, encoder_card

    weights = _weights_record(config.pretrained, card)
    weights["encoder_sha256"] = encoder_state_sha256(encoder)
    precision = resolve_precision(config.precision, device)
    preset = PRESETS.get(config.arch)
    if preset is not None:
        made = encoder_card(preset, weights, dict(config.options), precision, embedding_width(preset, encoder))
    else:
        mean, std = list(card.normalisation["mean"]), list(card.normalisation["std"])
        width = _head_width(model)
        made = checkpoint_encoder_card(config.arch, weights, config.input_size, mean, std, width, precision)
        made["options"] = dict(config.options)
    described = stain_description(stain)
    if described is not None:  # only then: a store without a mapping keeps the key `features` gives it
        made["stain"] = described
    return made


def _weights_record(pretrained: str, card: ModelCard) -> dict[str, Any]:
    """The weights as ``wsi-dala features`` records them (its hub revision, file name and SHA-256, or random
    weights), so a store a training wrote and one ``features`` wrote name the same encoder alike."""
    if pretrained == "none":
        return {"weights": "none (random)"}
    if pretrained == "imagenet":
        return {"weights": "imagenet"}
    origin = card.training_data.get("encoder_origin")
    revision = origin.get("hf_revision") if isinstance(origin, dict) else None
    path = Path(pretrained)
    return {**({"hf_revision": revision} if revision else {}), "file": path.name, "sha256": file_sha256(path)}


def _head_width(model: nn.Module) -> int:
    """The width of the pooled features the linear head reads."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"--freeze-backbone: {type(model).__name__} has no linear head")
    return int(linears[-1].in_features)


def _made_by(encoder: dict[str, Any]) -> str:
    return str(encoder.get("preset") or encoder.get("architecture"))


def _same_encoder(encoder: dict[str, Any], card: ModelCard, sha: str, expected: dict[str, Any]) -> bool:
    weights = encoder.get("weights") if isinstance(encoder.get("weights"), dict) else {}
    assert isinstance(weights, dict)
    return (
        _made_by(encoder) == card.architecture
        and encoder.get("input_px") == expected["input_px"]
        and encoder.get("stain") == expected["stain"]
        and encoder.get("options") == card.options
        and encoder.get("mean") == list(card.normalisation["mean"])
        and encoder.get("std") == list(card.normalisation["std"])
        and weights.get("encoder_sha256") == sha
    )
