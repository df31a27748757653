"""A foundation-model head scored from the slide's stored patch tokens: no encoder pass.

``wsi-dala features --patch-tokens`` keeps, per tile, the encoder's last-block patch tokens. A head built on
that encoder (``--arch uni`` and the other presets: a linear layer on the mean of the patch tokens) needs
nothing else: its logits are the head applied to their mean, and its DT Grad-CAM is the head's weights
applied to each token (``explain.cam.head_logits_and_raw_cams`` on the token grid, exactly what the encoder
pass computes). So ``run`` with such a head, in the folder ``features`` wrote, reads the tokens instead of
running a ViT-L or ViT-g over every tile: the second head of a slide costs seconds.

Used only when every one of these holds, else the encoder runs as usual and the log says why: the model is
a preset's; the store is complete, from the same tiles (tiling key), with patch tokens; its encoder is the
head's (the same preset, options, normalisation, and an equal hash of the encoder's weights,
``model.foundation.encoder_state_sha256``); and the run asks for no test-time augmentation, MC dropout or
stain mapping (each needs the tiles themselves).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from wsi_dala.core.config import ScoringConfig
from wsi_dala.explain.cam import head_logits_and_raw_cams
from wsi_dala.inference.scoring import ScoringResult, cached_model
from wsi_dala.model.card import KnownCheckpoint
from wsi_dala.model.foundation import encoder_state_sha256
from wsi_dala.model.foundation_presets import PRESETS
from wsi_dala.tiling.features_store import PATCH_TOKENS
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.store_records import ScoringRecord

log = logging.getLogger(__name__)
ENGINE = "stored features"


def why_not_stored(features_path: Path, tiling_key: str, known: KnownCheckpoint, config: ScoringConfig) -> str | None:
    """None when the head can be scored from ``features_path``; else why not (said in the log)."""
    card = known.card
    if card.architecture not in PRESETS:
        return "the model is not the head of a foundation-model preset"
    if config.tta != "none" or config.mc_dropout or config.stain_normalise != "none":
        return "--tta, --mc-dropout and --stain-normalise need the tiles themselves"
    try:
        group = zarr.open_group(features_path, mode="r")
        attrs = dict(group.attrs)
    except Exception:  # not a store, or damaged: the encoder runs
        return "not a readable features store"
    encoder = attrs.get("encoder") if isinstance(attrs.get("encoder"), dict) else {}
    assert isinstance(encoder, dict)
    if not attrs.get("complete") or PATCH_TOKENS not in group:
        return "unfinished, or holds no patch tokens (wsi-dala features --patch-tokens)"
    if attrs.get("tiles_key") != tiling_key:
        return "computed on other tiles (another slide or tiling)"
    same = (
        encoder.get("preset") == card.architecture
        and encoder.get("options") == card.options
        and encoder.get("mean") == list(card.normalisation["mean"])
        and encoder.get("std") == list(card.normalisation["std"])
    )
    if not same:
        return f"features of another encoder ({encoder.get('preset')}, options {encoder.get('options')})"
    model, _ = cached_model(str(known.path), "cpu")
    stored = (encoder.get("weights") or {}).get("encoder_sha256")
    head_encoder = getattr(model, "encoder", None)
    if not isinstance(head_encoder, torch.nn.Module) or stored != encoder_state_sha256(head_encoder):
        return "computed with other encoder weights than this head's"
    return None


def score_from_features(
    store_path: Path, features_path: Path, known: KnownCheckpoint, progress: bool = True
) -> ScoringResult:
    """Score every tile of ``store_path`` with ``known``'s head on the stored patch tokens; resumable."""
    from tqdm import tqdm

    started = time.perf_counter()
    model, card = cached_model(str(known.path), "cpu")
    store = TileStore(store_path, mode="r+")
    group = zarr.open_group(features_path, mode="r")
    tokens = group[PATCH_TOKENS]
    assert isinstance(tokens, zarr.Array)
    n, patches, _width = tokens.shape
    grid = round(patches**0.5)
    n_classes, temperature = len(card.class_names), card.temperature or 1.0
    features_key = str(group.attrs.get("features_key"))
    done = store.prepare_scores(n_classes, grid, scoring_key=f"{known.sha256[:16]}:{ENGINE}:{features_key[:16]}")
    chunk, resumed = store.info.chunk_tiles, int(done.sum())
    todo = [i for i in range(len(done)) if not done[i]]
    for index in tqdm(todo, unit="chunk", desc="scoring (stored features)", disable=not progress, leave=False):
        rows = slice(index * chunk, min(n, (index + 1) * chunk))
        values = torch.from_numpy(np.asarray(tokens[rows], dtype=np.float32))
        features = values.transpose(1, 2).unflatten(2, (grid, grid))  # the token grid, as forward_features gives it
        logits, raw = head_logits_and_raw_cams(model, features, card.positive_index)
        probabilities = torch.softmax(logits.float() / temperature, dim=1)
        store.write_scores(index, probabilities.numpy(), raw.numpy())
        store.mark_score_chunk_done(index, done)
    made_by = dict(group.attrs).get("encoder")
    encoder_precision = made_by.get("precision", "unknown") if isinstance(made_by, dict) else "unknown"
    precision = f"{encoder_precision} encoder, float16 tokens"
    record = ScoringRecord(card.class_names, card.positive_class, grid, precision, temperature=card.temperature)
    store.mark_scores_complete(record)
    backend: dict[str, Any] = {
        "engine": ENGINE,
        "precision": precision,
        "reason": f"the encoder's patch tokens read from {features_path.name}, no encoder pass",
        "features_store": str(features_path),
        "features_key": features_key,
    }
    return ScoringResult(n, time.perf_counter() - started, resumed, not todo, precision, "cpu", backend)
