"""Training attention MIL on slide labels and stored tile features (``wsi-dala mil train``).

Bags are the ``embedding`` rows of each slide's ``features.zarr`` (``wsi-dala features``); labels come from a
slide-labels CSV. Cross-validation is by slide (stratified folds; a slide is never in two folds): each
slide's out-of-fold probability is pooled for ``mil evaluate`` and for the slide thresholds of the card. The
model kept is trained on every slide with the same settings. The loss is class-balanced (each class weighs
the same however many slides it has), as archives hold far more tumour-free slides than tumour ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from wsi_dala.core.errors import ConfigError
from wsi_dala.model.mil import GatedAttentionMIL
from wsi_dala.model.mil_card import MilCard, encoder_identity
from wsi_dala.tiling.features_store import COORDS, EMBEDDING, FeaturesStore, find_stores
from wsi_dala.training.slide_labels import SlideLabel, slide_key

log = logging.getLogger(__name__)
POSITIVE_WORDS = ("tumour", "tumor", "malignant", "cancer", "carcinoma", "metastasis", "positive")


@dataclass(frozen=True)
class MilSettings:
    folds: int = 5
    epochs: int = 40
    lr: float = 2e-4
    weight_decay: float = 1e-4
    hidden: int = 256
    attention: int = 128
    dropout: float = 0.25
    max_tiles: int = 2048  # tiles drawn per slide per training step (all of them when predicting)
    feature: str = EMBEDDING  # which row of the store: the encoder's embedding, or token_mean (patch tokens' mean)
    seed: int = 0


@dataclass(frozen=True)
class Bag:
    slide: str
    label: int
    features: np.ndarray  # [N, D] float32
    coords: np.ndarray  # [N, 2] level-0
    store: Path


@dataclass(frozen=True)
class Bags:
    bags: list[Bag]
    class_names: list[str]
    positive_class: str
    encoder: dict[str, Any]
    tile_mpp: float
    tile_size_px: int


def positive_of(names: list[str], given: str | None, source: str) -> str:
    if given is not None:
        if given not in names:
            raise ConfigError(f"{source}: --tumour-label {given!r} is not one of its labels {names}")
        return given
    found = [name for name in names if name.lower().replace("-", " ") in POSITIVE_WORDS]
    if len(found) != 1:
        raise ConfigError(f"{source}: cannot tell which label is tumour among {names}; give --tumour-label")
    return found[0]


def load_bags(
    labels: list[SlideLabel],
    places: list[str],
    source: str,
    positive: str | None = None,
    class_names: list[str] | None = None,
    encoder_key: str | None = None,
    feature: str = EMBEDDING,
) -> Bags:
    """Each labelled slide's bag; refused in one line for labels without features, one class only, a label
    not in ``class_names`` (a trained model's), two stores of one slide, stores of different encoders."""
    stores: dict[str, FeaturesStore] = {}
    for path in find_stores(places):
        store = FeaturesStore.open(path)
        key = slide_key(store.tiling.slide.path)
        if key in stores:
            raise ConfigError(f"{path}: slide {key!r} has two features stores (also {stores[key].path}); keep one")
        stores[key] = store
    missing = [entry.slide for entry in labels if entry.key not in stores]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{source}: labels for slides without features: {', '.join(missing[:3])}{more}")
    names = sorted({entry.label for entry in labels})
    if class_names is not None:
        unknown = [name for name in names if name not in class_names]
        if unknown:
            raise ConfigError(f"{source}: label {unknown[0]!r} is not one of the model's classes {class_names}")
        names = list(class_names)
    elif len(names) != 2:
        raise ConfigError(
            f"{source}: slide labels hold {len(names)} class(es) ({', '.join(names)}); MIL needs two, tumour and not"
        )
    positive = positive_of(names, positive, source)
    chosen = [stores[entry.key] for entry in labels]
    first = chosen[0]
    wanted = encoder_key or encoder_identity(first.encoder)
    for store in chosen:
        if encoder_identity(store.encoder) != wanted:
            made_by = store.encoder.get("preset", "unknown")
            raise ConfigError(f"{store.path}: a features store of another encoder ({made_by}) than the others/model")
    bags = [
        Bag(
            entry.slide,
            names.index(entry.label),
            store.array(feature).astype(np.float32),
            store.array(COORDS),
            store.path,
        )
        for entry, store in zip(labels, chosen, strict=True)
    ]
    empty = [bag.slide for bag in bags if len(bag.features) == 0]
    if empty:
        raise ConfigError(f"{source}: slide {empty[0]} has no tiles in its features store")
    spread = float(np.concatenate([bag.features[:256] for bag in bags]).std(axis=0).mean())
    if spread < 1e-4:
        log.warning(
            "%s: the %s rows barely differ between tiles (spread %.2g): an encoder with random weights? "
            "token_mean may hold more",
            source,
            feature,
            spread,
        )
    tiling = first.tiling
    return Bags(bags, names, positive, first.encoder, tiling.effective_mpp, tiling.tile_size_px)


def new_model(in_dim: int, settings: MilSettings) -> GatedAttentionMIL:
    return GatedAttentionMIL(in_dim, 2, settings.hidden, settings.attention, settings.dropout)


def train_bags(bags: list[Bag], positive_index: int, settings: MilSettings, seed: int) -> GatedAttentionMIL:
    """One model on ``bags``, class-balanced cross-entropy, Adam, one slide per step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = new_model(bags[0].features.shape[1], settings)
    every_tile = np.concatenate([bag.features for bag in bags])
    model.standardise(every_tile.mean(axis=0), np.maximum(every_tile.std(axis=0), 1e-6))
    counts = np.bincount([bag.label for bag in bags], minlength=2).astype(np.float64)
    weights = torch.tensor(len(bags) / (2 * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    tensors = [torch.from_numpy(bag.features) for bag in bags]
    model.train()
    for _ in range(settings.epochs):
        for index in rng.permutation(len(bags)):
            bag = tensors[index]
            if len(bag) > settings.max_tiles:
                bag = bag[torch.from_numpy(rng.choice(len(bag), settings.max_tiles, replace=False))]
            logits, _ = model(bag)
            loss = loss_fn(logits[None], torch.tensor([bags[index].label]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def predict(model: GatedAttentionMIL, features: np.ndarray, positive_index: int) -> tuple[float, np.ndarray]:
    """(the slide's tumour probability, each tile's attention)."""
    with torch.inference_mode():
        logits, attention = model(torch.from_numpy(np.asarray(features, dtype=np.float32)))
    return float(torch.softmax(logits, dim=0)[positive_index]), attention.numpy()


def fold_of(bags: list[Bag], folds: int, seed: int) -> np.ndarray:
    """Each slide's fold: stratified by label, as many folds as the smaller class allows (at least 2)."""
    labels = np.array([bag.label for bag in bags])
    smaller = int(np.bincount(labels, minlength=2).min())
    if smaller < 2:
        raise ConfigError("cross-validation needs at least two slides of each class")
    splitter = StratifiedKFold(n_splits=min(folds, smaller), shuffle=True, random_state=seed)
    assigned = np.zeros(len(bags), dtype=np.int64)
    for number, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        assigned[held] = number
    return assigned


def cross_validate(data: Bags, settings: MilSettings) -> tuple[np.ndarray, np.ndarray]:
    """(each slide's out-of-fold tumour probability, its fold)."""
    positive = data.class_names.index(data.positive_class)
    folds = fold_of(data.bags, settings.folds, settings.seed)
    probability = np.full(len(data.bags), math.nan)
    for number in range(int(folds.max()) + 1):
        train = [bag for bag, fold in zip(data.bags, folds, strict=True) if fold != number]
        model = train_bags(train, positive, settings, settings.seed + 1 + number)
        for index in np.flatnonzero(folds == number):
            probability[index], _ = predict(model, data.bags[index].features, positive)
        log.info("fold %d of %d done", number + 1, int(folds.max()) + 1)
    return probability, folds


def mil_card(data: Bags, settings: MilSettings, thresholds: dict[str, Any], training: dict[str, Any]) -> MilCard:
    return MilCard(
        kind="abmil",
        in_dim=int(data.bags[0].features.shape[1]),
        class_names=data.class_names,
        positive_class=data.positive_class,
        encoder=data.encoder,
        encoder_key=encoder_identity(data.encoder),
        tile_mpp=float(data.tile_mpp),
        tile_size_px=int(data.tile_size_px),
        feature=settings.feature,
        hidden=settings.hidden,
        attention=settings.attention,
        dropout=settings.dropout,
        slide_thresholds=thresholds,
        training=training,
    )
