"""``wsi-dala features``: a foundation model's (or a wsi-dala classifier's backbone's) tile features for a slide or
an archive, stored once.

Each slide is tiled at the model's µm/px and input size (``tiles.zarr``, resumable), then its tiles go
through the encoder into ``features.zarr`` beside them (``wsi_dala.inference.features``). The weights
are resolved and checked against the network once, before any slide is read; the encoder is built once
for all slides. In an archive a slide that fails is reported and the others go on; the folder of each
slide is locked while it is written, as a run's is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zarr

from wsi_dala.core.config import TilingConfig, build
from wsi_dala.core.errors import OutputError, WsiDalaError
from wsi_dala.core.fileio import ensure_writable_dir
from wsi_dala.core.identity import config_hash, file_sha256
from wsi_dala.core.layout import RunLayout, encoder_engine_anchor
from wsi_dala.core.locks import exclusive_lock
from wsi_dala.inference.features import (
    EncoderEngine,
    FeaturesResult,
    checkpoint_encoder_card,
    encoder_card,
    plan_encoder_engine,
    write_features,
)
from wsi_dala.model.devices import resolve_precision
from wsi_dala.model.foundation import (
    check_weights,
    create_encoder,
    embedding_width,
    encoder_state_sha256,
    load_strict,
)
from wsi_dala.model.foundation_presets import PRESETS, FoundationPreset
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import tile_slide

log = logging.getLogger(__name__)
LOCK_STALE_S = 6 * 3600.0


@dataclass(frozen=True)
class FeatureSettings:
    preset: str | None  # a foundation model's preset, or None with ``checkpoint``
    weights: str = "hub"  # hub | none | a file
    options: dict[str, Any] = field(default_factory=dict)  # the preset's arguments overridden
    patch_tokens: bool = False
    batch_size: int = 8
    precision: str = "auto"
    min_tissue: float = TilingConfig().min_tissue
    checkpoint: str | None = None  # a wsi-dala classifier whose backbone is the encoder (features --model)
    backend: str = "auto"  # the engine: auto measures the installed ones on the first slide's tiles


@dataclass
class Encoder:
    preset: FoundationPreset | None  # None: a classifier's backbone
    network: torch.nn.Module
    card: dict[str, Any]
    tile_mpp: float
    tile_size_px: int
    engine_anchor: Path  # where its engine files are kept (inference.engines.exports.engine_layout)
    engine_sha256: str  # what they are named by (the first 16 hex digits): the encoder's identity
    engine: EncoderEngine | None = None  # chosen on the first slide's tiles


def classifier_encoder(settings: FeatureSettings) -> Encoder:
    """A wsi-dala classifier's backbone as the encoder: its pooled last feature map, at its own µm/px and tile
    size (what an attention-MIL model on DALAResNet50 features reads)."""
    from wsi_dala.model.checkpoint import load_checkpoint
    from wsi_dala.model.interface import pooled_features

    path = Path(str(settings.checkpoint))
    network, card = load_checkpoint(path)
    if card.mpp is None:
        raise WsiDalaError(f"{path}: its card has no µm/px; features need the tiles it was trained on")
    precision = resolve_precision(settings.precision, "cpu")
    with torch.inference_mode():
        width = int(pooled_features(network.eval(), torch.zeros(1, 3, card.tile_size_px, card.tile_size_px)).shape[1])
    weights = {"file": path.name, "sha256": file_sha256(path)}
    normalisation = card.normalisation
    encoder_card = checkpoint_encoder_card(
        card.architecture, weights, card.tile_size_px, normalisation["mean"], normalisation["std"], width, precision
    )
    return Encoder(
        None, network.eval(), encoder_card, float(card.mpp), card.tile_size_px, path, weights["sha256"]
    )  # the engine files are the checkpoint's own, which `run` exports too


def prepare_encoder(settings: FeatureSettings) -> Encoder:
    """The encoder with its weights (fetched from its repository for ``hub``), checked before any slide."""
    if settings.checkpoint is not None:
        return classifier_encoder(settings)
    preset = PRESETS.get(str(settings.preset))
    if preset is None:
        raise WsiDalaError(f"--arch {settings.preset}: not a foundation model (one of {', '.join(PRESETS)})")
    weights: dict[str, Any] = {}
    path = None
    if settings.weights == "hub":
        from wsi_dala.interop.foundation_weights import fetch_foundation_weights

        path, origin = fetch_foundation_weights(preset)
        weights = {"hf_revision": origin["hf_revision"]}
    elif settings.weights != "none":
        path = Path(settings.weights)
    else:
        weights = {"weights": "none (random)"}
    options = dict(settings.options)
    if path is not None:
        check_weights(preset, options, path)  # on the meta device: a misfit is refused before any slide is read
        weights = {**weights, "file": path.name, "sha256": file_sha256(path)}
    else:
        torch.manual_seed(0)  # random weights: the same features on every run (benchmarks, tests)
    network = create_encoder(preset, options)
    if path is not None:
        load_strict(network, path, preset)
    weights["encoder_sha256"] = encoder_state_sha256(network)  # what `run` matches a head's encoder against
    precision = resolve_precision(settings.precision, "cpu")
    card = encoder_card(preset, weights, options, precision, embedding_width(preset, network))
    identity = config_hash({k: v for k, v in card.items() if k != "precision"})  # network, weights, input
    return Encoder(
        preset, network.eval(), card, preset.mpp, preset.resize_px, encoder_engine_anchor(preset.name), identity
    )


def features_for_slide(
    slide: Path, out_dir: Path, settings: FeatureSettings, encoder: Encoder, progress: bool = True
) -> FeaturesResult:
    """Tile ``slide`` at the model's µm/px (or reuse its tiles) and store its features."""
    tiling = build(
        TilingConfig,
        {"mpp": encoder.tile_mpp, "tile_size_px": encoder.tile_size_px, "min_tissue": settings.min_tissue},
        "tiling",
    )
    layout = RunLayout.for_slide(out_dir, slide)
    ensure_writable_dir(layout.root)
    with exclusive_lock(layout.lock, LOCK_STALE_S) as holder:
        if holder is not None:
            raise OutputError(f"{layout.root}: in use by {holder.describe()}; wait for it or choose another --out")
        tiled = tile_slide(slide, layout.root, tiling, progress=progress, layout=layout)
        card, forward = _engine_for(layout.features_store, tiled.store, settings, encoder)
        return write_features(
            tiled.store,
            layout.features_store,
            encoder.network,
            encoder.preset,
            card,
            batch_size=settings.batch_size,
            patch_tokens=settings.patch_tokens,
            progress=progress,
            forward=forward,
        )


def _engine_for(
    features_store: Path, tiles_store: Path, settings: FeatureSettings, encoder: Encoder
) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor] | None]:
    """The card and engine of one slide's features: the engine chosen on the first slide's tiles, except for a
    store begun by torch (an earlier release, or --backend torch), which is finished by torch."""
    if settings.backend == "torch":
        return encoder.card, None
    if features_store.exists():
        try:
            begun = zarr.open_group(features_store, mode="r").attrs.get("encoder")
        except Exception:  # damaged: write_features names it
            begun = None
        if isinstance(begun, dict) and "engine" not in begun:
            log.info("%s: begun on torch; finished on torch", features_store)
            return encoder.card, None
    if encoder.engine is None:
        sample = TileStore(tiles_store).tiles(slice(0, settings.batch_size))
        encoder.engine = plan_encoder_engine(
            encoder.network,
            encoder.preset,
            encoder.card,
            sample,
            settings.backend,
            encoder.engine_anchor,
            encoder.engine_sha256,
        )
        log.info("features: %s (%s)", encoder.engine.label, encoder.engine.reason)
    return encoder.engine.card, encoder.engine.forward
