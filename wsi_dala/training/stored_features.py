"""``train --freeze-backbone --features DIR`` on a foundation model: the training tiles' encoder features read
from the stores ``wsi-dala features`` wrote, so the encoder (a ViT-L or ViT-g) runs on no training tile.

A preset's linear head pools the mean of the last block's patch tokens; each features store keeps that
mean per tile (``token_mean``). A training tile's row is found by its slide (the tile store's fingerprint
of it), its tile size and µm/px, and its level-0 coordinates, so the training run may tile the slide
itself (its own ``--min-tissue`` and annotations). Every tile must be found in a store of the same
encoder (preset, options, normalisation, and an equal SHA-256 over the encoder's tensors), else the
training is refused in one line naming the slide before any epoch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import nn

from wsi_dala.core.errors import ConfigError
from wsi_dala.model.card import ModelCard
from wsi_dala.model.foundation import encoder_state_sha256
from wsi_dala.tiling.features_store import TOKEN_MEAN, FeaturesStore, find_stores
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.datasets import Sample


class StoredFeatures:
    """The stores under ``places`` made by ``encoder`` (the session's), and rows read from them."""

    def __init__(self, places: list[str], encoder: nn.Module, card: ModelCard) -> None:
        stores = [FeaturesStore.open(path) for path in find_stores(places)]
        sha = encoder_state_sha256(encoder)
        self.places = places
        self.stores = [s for s in stores if _same_encoder(s.encoder, card, sha)]
        if not self.stores:
            found = ", ".join(sorted({str(s.encoder.get("preset")) for s in stores})) or "none"
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


def _same_encoder(encoder: dict[str, Any], card: ModelCard, sha: str) -> bool:
    weights = encoder.get("weights") if isinstance(encoder.get("weights"), dict) else {}
    assert isinstance(weights, dict)
    return (
        encoder.get("preset") == card.architecture
        and encoder.get("options") == card.options
        and encoder.get("mean") == list(card.normalisation["mean"])
        and encoder.get("std") == list(card.normalisation["std"])
        and weights.get("encoder_sha256") == sha
    )
