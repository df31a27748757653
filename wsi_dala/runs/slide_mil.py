"""``run --mil MODEL``: an attention-MIL model's slide probability and attention, beside the tile classifier's
answer.

The MIL model reads its encoder's stored tile features of this slide: a ``features.zarr`` given with
``--features`` or already in the run folder (``wsi-dala features SLIDE --out`` the same folder), matched by
the encoder's identity and the slide's fingerprint. When the MIL model's encoder is the run's own
classifier (``features --model`` of this checkpoint) and the run tiles as it did, the run computes the
features itself into its folder. Anything else is refused in one line, naming the command that makes the
features, before any output is written.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_dala.core.config import PipelineConfig, TilingConfig
from wsi_dala.core.errors import ConfigError, OutputError
from wsi_dala.core.identity import file_sha256, slide_fingerprint
from wsi_dala.core.layout import RunLayout
from wsi_dala.model.card import KnownCheckpoint
from wsi_dala.model.mil_card import MilCard, encoder_identity, read_mil_card
from wsi_dala.tiling.features_store import COORDS, FeaturesStore, find_stores

log = logging.getLogger(__name__)
ATTENTION_MEASUREMENT = "MIL attention (x even share)"


@dataclass(frozen=True)
class MilPlan:
    model: Path
    card: MilCard
    sha256: str
    store: Path  # the features store it reads (made by the run when ``compute``)
    compute: bool


@dataclass(frozen=True)
class MilAnswer:
    probability: float
    coords_l0: np.ndarray  # [N, 2] the features' tiles
    tile_size_l0: float
    relative_attention: np.ndarray  # [N] attention x N: 1 is an even share

    def summary(self, plan: MilPlan) -> dict[str, object]:
        return {
            "model": str(plan.model.resolve()),
            "sha256": plan.sha256,
            "features": str(plan.store.resolve()),
            "features_computed_by_run": plan.compute,
            "slide_probability": round(self.probability, 6),
            "tiles": len(self.relative_attention),
            "max_attention_x_even": round(float(self.relative_attention.max(initial=0.0)), 3),
        }


def _fits(store_path: Path, card: MilCard, fingerprint: dict[str, object]) -> str | None:
    """Why this store is not the MIL model's features of this slide (None: it is)."""
    try:
        store = FeaturesStore.open(store_path)
    except OutputError as exc:
        return str(exc)
    if encoder_identity(store.encoder) != card.encoder_key:
        return f"{store_path}: features of another encoder than the MIL model's"
    if store.tiling.slide.fingerprint != fingerprint:
        return f"{store_path}: features of another slide"
    return None


def plan_mil(
    config: PipelineConfig, slide_path: Path, layout: RunLayout, known: KnownCheckpoint, tiling: TilingConfig
) -> MilPlan:
    """Where the MIL model's features of this slide come from; refused before any output when nowhere."""
    model = Path(str(config.mil))
    card = read_mil_card(model)
    fingerprint = slide_fingerprint(slide_path)
    candidates = find_stores([config.features]) if config.features else []
    if layout.features_store.exists():
        candidates.append(layout.features_store)
    reasons = []
    for candidate in candidates:
        why = _fits(candidate, card, fingerprint)
        if why is None:
            return MilPlan(model, card, file_sha256(model), candidate, compute=False)
        reasons.append(why)
    weights = card.encoder.get("weights")
    own_encoder = isinstance(weights, dict) and weights.get("sha256") == known.sha256
    same_mpp = math.isclose(tiling.mpp or 0.0, card.tile_mpp, rel_tol=0.02)
    same_tiles = same_mpp and tiling.tile_size_px == card.tile_size_px
    if own_encoder and same_tiles and not layout.features_store.exists():
        return MilPlan(model, card, file_sha256(model), layout.features_store, compute=True)
    make = (
        f"`wsi-dala features {slide_path} --model CKPT --out {layout.root.parent}`"
        if card.encoder.get("preset") is None
        else f"`wsi-dala features {slide_path} --arch {card.encoder.get('preset')} --out {layout.root.parent}`"
    )
    found = f" ({reasons[-1]})" if reasons else ""
    raise ConfigError(
        f"{model}: no features of its encoder for {slide_path.name}{found}; make them with {make} or give --features"
    )


def apply_mil(plan: MilPlan, layout: RunLayout, known: KnownCheckpoint, progress: bool) -> MilAnswer:
    """The slide probability and each tile's attention (features computed first when the plan says so)."""
    from wsi_dala.runs.mil import load_mil
    from wsi_dala.training.mil import predict

    if plan.compute:
        from wsi_dala.inference.features import write_features
        from wsi_dala.runs.features import FeatureSettings, classifier_encoder

        encoder = classifier_encoder(FeatureSettings(preset=None, checkpoint=str(known.path)))
        write_features(layout.tiles_store, plan.store, encoder.network, None, encoder.card, progress=progress)
    store = FeaturesStore.open(plan.store)
    model, card = load_mil(plan.model)
    features = store.array(card.feature).astype(np.float32)
    if features.shape[1] != card.in_dim:
        raise ConfigError(f"{plan.store}: {card.feature} is {features.shape[1]} wide; {plan.model} reads {card.in_dim}")
    probability, attention = predict(model, features, card.positive_index)
    tiling = store.tiling
    return MilAnswer(probability, store.array(COORDS), tiling.tile_size_l0, attention * len(attention))


def attention_per_tile(answer: MilAnswer, coords_l0: np.ndarray) -> np.ndarray:
    """The attention of each of the run's tiles (NaN where the MIL model's tiles are others)."""
    index = {(int(x), int(y)): row for row, (x, y) in enumerate(answer.coords_l0)}
    rows = np.array([index.get((int(x), int(y)), -1) for x, y in coords_l0], dtype=np.int64)
    values = np.full(len(rows), np.nan, dtype=np.float64)
    values[rows >= 0] = answer.relative_attention[rows[rows >= 0]]
    return values
