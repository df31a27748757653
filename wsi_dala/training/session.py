"""One training run's setup, built once before the first epoch: seed, model, freezing, loss, optimiser,
schedule, the model card, the training stain; and the key that says which saved state it may resume."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_dala.core.config import TrainConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.identity import config_hash
from wsi_dala.model import ModelCard, build_model
from wsi_dala.model.devices import pick_device, resolve_precision
from wsi_dala.model.foundation_presets import PRESETS
from wsi_dala.model.registry import takes_encoder_weights
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.model.weights import pretrain_card
from wsi_dala.tissue.stain import REFERENCE_PROFILE
from wsi_dala.training.datasets import Sample, SampleDataset, class_counts
from wsi_dala.training.feature_cache import EncoderPass, cached_features, weights_identity
from wsi_dala.training.guidance import Guidance
from wsi_dala.training.loaders import TileLoader, make_loader
from wsi_dala.training.losses import class_balanced_weights, classification_loss
from wsi_dala.training.unlabelled import MPP_TOLERANCE

log = logging.getLogger(__name__)


@dataclass
class HeadData:
    """``--freeze-backbone``: the training and validation tiles as pooled encoder features [N, C]."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray


@dataclass
class Session:
    """What one training run works with, built once before the first epoch."""

    config: TrainConfig
    class_names: list[str]
    device: torch.device
    model: nn.Module
    frozen_modules: list[nn.Module]  # frozen by ``freeze_until``: kept in eval mode (frozen BatchNorm)
    criterion: nn.Module  # the training loss (class-balanced with imbalance="cb-loss")
    plain_criterion: nn.Module  # the validation loss: unweighted
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    card: ModelCard
    stain: StainNormaliser | None = None  # config.stain_normalise: training set's stain -> the reference
    features: HeadData | None = None  # config.freeze_backbone: the tiles' cached encoder features
    guidance: Guidance | None = None  # mask guidance and contrastive regulation, when asked for

    @property
    def mean(self) -> list[float]:
        return self.card.normalisation["mean"]

    @property
    def std(self) -> list[float]:
        return self.card.normalisation["std"]

    def loader(self, samples: list[Sample], train: bool, epoch: int) -> TileLoader:
        return make_loader(
            samples,
            input_size=self.config.input_size,
            batch_size=self.config.batch_size,
            train=train,
            n_classes=len(self.class_names),
            epoch=epoch,
            seed=self.config.seed,
            imbalance=self.config.imbalance,
            loader_workers=self.config.loader_workers,
            with_masks=train and self.guidance is not None and self.guidance.uses_masks,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    head: list[nn.Parameter] = []
    backbone: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_new = name.startswith(("head.", "attention.")) or ".fc." in name or name.startswith("model.fc.")
        (head if is_new else backbone).append(param)
    return [
        {"params": backbone, "lr": config.lr_backbone},
        {"params": head, "lr": config.lr_head},
    ]


def _freeze(model: nn.Module, freeze_until: str | None) -> list[nn.Module]:
    """Freeze parameters up to ``freeze_until``; returns modules to keep in eval mode (frozen BatchNorm)."""
    if not freeze_until:
        return []
    frozen_prefixes = getattr(model, "frozen_prefixes", None)
    prefixes: tuple[str, ...] = frozen_prefixes(freeze_until) if frozen_prefixes is not None else ()
    if not prefixes:
        raise ValueError(f"--freeze-until is supported for dalaresnet50 only, not {type(model).__name__}")
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return [module for name, module in model.named_children() if name in prefixes]


def _freeze_encoder(model: nn.Module) -> list[nn.Module]:
    """``freeze_backbone``: every encoder parameter fixed; only the linear head trains."""
    probe = getattr(model, "linear_probe_encoder", None)
    encoder = probe() if callable(probe) else None
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"--freeze-backbone: {type(model).__name__} has no encoder under a pooled linear head")
    encoder.requires_grad_(False)
    return [encoder]


def head_data(session: Session, train: list[Sample], val: list[Sample], cache_dir: Path, progress: bool) -> HeadData:
    """The pooled encoder features of the training and validation tiles, computed once.

    Slide tiles: from ``features.zarr`` beside each slide's tiles, the store ``wsi-dala features`` writes
    (computed or completed here; with ``--features``, read from the stores named and the encoder runs on no
    tile), so later heads, ``mil`` and ``run`` reuse them. Image files (no slide): the per-training cache."""
    from wsi_dala.training.stored_features import StoredFeatures, expected_encoder

    config = session.config
    encoder = session.frozen_modules[0]  # what --freeze-backbone froze: the linear probe's encoder
    expected = expected_encoder(config.arch, config.input_size, session.stain)
    samples = train + val
    if config.features:  # stored by `wsi-dala features` (or an earlier training): no encoder pass
        places = list(config.features)
    else:
        sources = sorted({s.source for s in samples if s.index >= 0})
        card = _slide_features_card(session, encoder) if sources else {}  # hashed once, not per slide
        places = [str(_write_slide_features(session, Path(s), encoder, card, progress)) for s in sources]
    stored = StoredFeatures(places, encoder, session.card, expected) if places else None
    if stored is not None:
        session.card.training_data["encoder"] = {
            **session.card.training_data.get("encoder", {}),
            "features_from": [str(s.path) for s in stored.stores],
        }
    files_description = {
        "arch": config.arch,
        "options": config.options,
        **weights_identity(config.pretrained),
        "seed": config.seed if config.pretrained == "none" else None,  # random weights depend on it
        "input_size": config.input_size,
        "normalisation": session.card.normalisation,
        "stain_normalise": config.stain_normalise,
        "precision": resolve_precision(config.precision, session.device),
    }
    how = EncoderPass(
        config.input_size, config.batch_size, session.device, session.mean, session.std, config.precision, session.stain
    )

    def features_of(part: list[Sample]) -> np.ndarray:
        tiles = [i for i, s in enumerate(part) if s.index >= 0]
        files = [i for i, s in enumerate(part) if s.index < 0]
        found: list[tuple[list[int], np.ndarray]] = []
        if tiles:
            assert stored is not None
            found.append((tiles, stored.token_means([part[i] for i in tiles])))
        if files:
            if config.features:
                image = part[files[0]].source
                raise ConfigError(f"--features: {image} is an image file; stored features are of slide tiles")
            images = [part[i] for i in files]
            found.append((files, cached_features(session.model, images, cache_dir, files_description, how, progress)))
        width = found[0][1].shape[1] if found else 0
        out = np.zeros((len(part), width), dtype=np.float32)
        for rows, values in found:
            out[rows] = values
        return out

    labels = [np.array([s.label for s in part], dtype=np.int64) for part in (train, val)]
    return HeadData(features_of(train), labels[0], features_of(val), labels[1])


def _slide_features_card(session: Session, encoder: nn.Module) -> dict[str, Any]:
    from wsi_dala.training.stored_features import training_encoder_card

    return training_encoder_card(session.model, encoder, session.config, session.card, session.device, session.stain)


def _write_slide_features(
    session: Session, tiles_store: Path, encoder: nn.Module, card: dict[str, Any], progress: bool
) -> Path:
    """Compute (or complete) the frozen encoder's features of one slide's training tiles, beside them."""
    from wsi_dala.core.layout import features_store_beside
    from wsi_dala.inference.features import write_features

    config = session.config
    preset = PRESETS.get(config.arch)
    result = write_features(
        tiles_store,
        features_store_beside(tiles_store),
        encoder if preset is not None else session.model,  # a CNN's or timm network's map is pooled in the model
        preset,
        card,
        batch_size=config.batch_size,
        progress=progress,
        device=session.device,
        stain=session.stain,
        replace_other=True,  # the training's own tiles folder: a store of another encoder is its own cache
    )
    what = "read" if result.chunks_computed == 0 else "computed"
    log.info("encoder features of %d tiles %s: %s", result.n_tiles, what, result.path)
    return result.path


def start_session(
    train_samples: list[Sample],
    class_names: list[str],
    positive_class: str,
    config: TrainConfig,
    card_fields: dict[str, Any],
) -> Session:
    """Seed, build the model, loss, optimiser, schedule and gradient scaler, and the model card."""
    n_classes = len(class_names)
    device = pick_device(config.device)
    seed_everything(config.seed)
    model = build_model(config.arch, n_classes, config.pretrained, config.options, config.input_size)
    frozen_modules = _freeze_encoder(model) if config.freeze_backbone else _freeze(model, config.freeze_until)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    counts = class_counts(train_samples, n_classes)
    weights = class_balanced_weights(counts, config.beta).to(device) if config.imbalance == "cb-loss" else None
    optimizer = torch.optim.AdamW(_param_groups(model, config), weight_decay=config.weight_decay)
    fp16_on_cuda = device.type == "cuda" and resolve_precision(config.precision, device) == "fp16"
    card = ModelCard(
        architecture=config.arch,
        class_names=list(class_names),
        positive_class=positive_class,
        tile_size_px=config.input_size,
        options=dict(config.options),
        **card_fields,
    )
    measured = training_stain(train_samples)
    stain = stain_normaliser(config, measured)
    card.stain_reference = REFERENCE_PROFILE.to_dict() if stain is not None else measured
    card.training_data = {**card.training_data, "stain_normalise": config.stain_normalise}
    pretraining = pretrain_card(Path(config.pretrained)) if config.pretrained not in ("none", "imagenet") else None
    if pretraining is not None:  # a `wsi-dala pretrain` backbone: the card says how it was made
        card.training_data["pretraining"] = pretraining
        if card.mpp and pretraining.get("mpp") and abs(pretraining["mpp"] - card.mpp) > MPP_TOLERANCE * card.mpp:
            log.warning(
                "%s was pre-trained on tiles at %.3g µm/px; these are at %.3g µm/px",
                config.pretrained,
                pretraining["mpp"],
                card.mpp,
            )
    preset = PRESETS.get(config.arch)
    if preset is not None:  # its own input normalisation (H-optimus: not ImageNet's), used in training and runs
        card.normalisation = {"mean": list(preset.mean), "std": list(preset.std)}
        card.training_data["foundation_model"] = {
            "preset": preset.name,
            "hf_repo": preset.hf_repo,
            "licence": preset.licence,
            "trained_at_mpp": preset.mpp,
            "embedding": f"{preset.embedding} ({preset.embedding_dim})",
        }
    if takes_encoder_weights(config.arch) or config.freeze_backbone:
        card.training_data["encoder"] = {
            **weights_identity(config.pretrained),
            "frozen": config.freeze_backbone,
            "head": "mean of the encoder's feature map (ViT: last-block patch tokens) -> linear",
            "augmentation": "none: features computed once, centre crop" if config.freeze_backbone else "as train",
        }
    guidance = Guidance(
        lesion_index=card.positive_index,
        hard_attention_floor=config.hard_attention_floor if config.mask_guided else 1.0,
        attention_loss_weight=config.attention_loss_weight if config.mask_guided else 0.0,
        contrastive_weight=config.contrastive_weight,
        contrastive_temperature=config.contrastive_temperature,
    )
    if guidance.active:
        card.training_data["guidance"] = {
            "mask_guided": config.mask_guided,
            "lesion_class": positive_class,
            "hard_attention_floor": guidance.hard_attention_floor,
            "attention_loss_weight": guidance.attention_loss_weight,
            "contrastive_weight": guidance.contrastive_weight,
            "contrastive_temperature": guidance.contrastive_temperature,
        }
    return Session(
        guidance=guidance if guidance.active else None,
        config=config,
        class_names=list(class_names),
        device=device,
        model=model,
        frozen_modules=frozen_modules,
        criterion=classification_loss(weights),
        plain_criterion=classification_loss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs)),
        scaler=torch.amp.GradScaler("cuda", enabled=fp16_on_cuda),
        card=card,
        stain=stain,
    )


STAIN_SAMPLE_IMAGES = 64  # training images the reference stain is measured on (evenly spread)


def training_stain(samples: list[Sample]) -> dict[str, Any] | None:
    """The training images' stain (Macenko vectors, L*a*b* statistics), measured as a slide's is
    (:func:`wsi_dala.tissue.stain.measure_tiles`), at the images' own resolution: the loaders crop, never resize,
    so that is the resolution the model sees. None when the images hold too little stain to measure."""
    from wsi_dala.tissue.stain import StainError, measure_tiles

    if not samples:
        return None
    dataset = SampleDataset(samples)
    picks = np.linspace(0, len(samples) - 1, min(STAIN_SAMPLE_IMAGES, len(samples))).round().astype(int)
    try:
        return measure_tiles([dataset.load(samples[i]) for i in sorted(set(picks))]).to_dict()
    except StainError as exc:
        log.warning("training images: stain not measured (%s)", exc)
        return None


def stain_normaliser(config: TrainConfig, measured: dict[str, Any] | None) -> StainNormaliser | None:
    """``config.stain_normalise``: training batches mapped from the training set's own stain to the
    published reference, which the model card then records as the model's (slides are mapped to it)."""
    if config.stain_normalise == "none":
        return None
    if measured is None:
        raise ConfigError("--stain-normalise: the training images' stain could not be measured (too little stain)")
    from wsi_dala.tissue.stain import REFERENCE_PROFILE, StainProfile

    return StainNormaliser(
        config.stain_normalise, StainProfile.from_dict(measured, "training images"), REFERENCE_PROFILE
    )


# Settings that may change between a run and its resumption (to train longer, or load data faster).
NOT_IN_RUN_KEY = ("epochs", "patience", "loader_workers")


def run_key(config: TrainConfig, class_names: list[str], train_samples: list[Sample]) -> str:
    """Identifies a run: a saved state is resumed only by the same settings on the same training data."""
    resumable = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_RUN_KEY}
    return config_hash(
        {
            "config": resumable,
            "classes": class_names,
            "train": [(s.source, s.index, s.label) for s in train_samples][:100000],
        }
    )
