"""The training loop: seeded, resumable, imbalance-aware, best checkpoint by validation balanced accuracy.

Imbalance is handled by the class-balanced loss of Cui et al. 2019 (weight ∝ (1−β)/(1−β^n_c),
normalised to sum to the number of classes) or by a weighted sampler, never both. Early stopping
watches the validation loss. Every file of a run is named by :class:`wsi_dala.core.layout.TrainLayout`: each
epoch appends to the metrics table, redraws the curves and saves the resume state (loaded with
``weights_only=True``), from which an interrupted run resumes. At the end, the best checkpoint's temperature
and Grad-CAM profile are fitted on the validation split and written into its model card.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsi_dala.core.config import TrainConfig
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.fileio import atomic_open, ensure_writable_dir, write_json_atomic
from wsi_dala.core.identity import config_hash
from wsi_dala.core.layout import TrainLayout
from wsi_dala.model import ModelCard, build_model, load_checkpoint, save_checkpoint
from wsi_dala.model.calibration import check_labels
from wsi_dala.model.devices import autocast, normalise, pick_device, resolve_precision
from wsi_dala.model.interface import as_split
from wsi_dala.model.registry import TIMM_PREFIX
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.model.weights import pretrain_card
from wsi_dala.tissue.stain import REFERENCE_PROFILE
from wsi_dala.training.calibrate import (
    CamProfile,
    calibrated_card,
    fit_calibration,
    positive_cam_profile,
    sample_folds,
    uncalibrated_card,
    write_reliability,
)
from wsi_dala.training.datasets import Sample, SampleDataset, class_counts
from wsi_dala.training.feature_cache import EncoderPass, cached_features, weights_identity
from wsi_dala.training.guidance import Guidance, guided_logits_and_loss
from wsi_dala.training.loaders import TileLoader, feature_loader, make_loader
from wsi_dala.training.metrics import classification_metrics
from wsi_dala.training.plots import plot_curves
from wsi_dala.training.predict import Predictions, predict
from wsi_dala.training.unlabelled import MPP_TOLERANCE

log = logging.getLogger(__name__)
VALIDATION = "validation split"  # what the temperature of a trained model is fitted on
# Settings that may change between a run and its resumption (to train longer, or load data faster).
_NOT_IN_RUN_KEY = ("epochs", "patience", "loader_workers")


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, float]]
    resumed_from_epoch: int


@dataclass
class TrainState:
    """Where a run stands after its last finished epoch; saved (with the weights) as the resume point."""

    run_key: str  # the run this state belongs to: a state of another run is never resumed
    epoch: int = 0  # epochs finished, i.e. the 0-based index of the next epoch
    best_score: float = -1.0  # best validation balanced accuracy so far
    best_epoch: int = -1  # 1-based epoch of the best checkpoint
    best_val_loss: float = math.inf
    stale: int = 0  # epochs since the validation loss last improved (early stopping)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class HeadData:
    """``--freeze-backbone``: the training and validation tiles as pooled encoder features [N, C]."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray


@dataclass
class _Session:
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


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: w_c ∝ (1−β)/(1−β^n_c), normalised so the weights sum to the number of classes."""
    counts_t = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    effective = (1.0 - torch.pow(beta, counts_t)) / (1.0 - beta)
    weights = 1.0 / effective
    return (weights / weights.sum() * len(counts)).float()


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


def _head_data(session: _Session, train: list[Sample], val: list[Sample], cache_dir: Path, progress: bool) -> HeadData:
    """The pooled encoder features of the training and validation tiles, from the cache or computed once."""
    config = session.config
    description = {
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

    def features_of(samples: list[Sample]) -> np.ndarray:
        return cached_features(session.model, samples, cache_dir, description, how, progress)

    labels = [np.array([s.label for s in part], dtype=np.int64) for part in (train, val)]
    return HeadData(features_of(train), labels[0], features_of(val), labels[1])


def recalibrate_batchnorm(
    model: nn.Module,
    loader: TileLoader,
    device: torch.device,
    mean: list[float],
    std: list[float],
    batches: int,
    frozen_modules: list[nn.Module],
    stain: StainNormaliser | None = None,
) -> None:
    """ "Precise BN": replace running statistics by an exact average over ``batches`` training batches.

    Short runs (few steps, weights still moving fast) otherwise validate with statistics that lag
    far behind the weights: the model looks random in eval mode while it is already right in train mode.
    """
    frozen = {id(m) for top in frozen_modules for m in top.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: an exact mean over the batches seen
        norm.train()
    features = as_split(model)
    with torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i >= batches:
                break
            images = images.to(device)
            features.forward_features(normalise(stain(images) if stain is not None else images, mean, std))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def train_model(
    train_samples: list[Sample],
    val_samples: list[Sample],
    class_names: list[str],
    positive_class: str,
    config: TrainConfig,
    out_dir: str | Path,
    card_fields: dict[str, Any],
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    feature_cache_dir: Path | None = None,
) -> TrainResult:
    """Train, validate every epoch, keep the best checkpoint, then calibrate it on the validation split;
    resume from ``out_dir`` when it can.

    ``on_epoch_end(row)`` is called after each epoch's state is saved. ``feature_cache_dir``: where
    ``freeze_backbone`` keeps the encoder features (default: the run folder's ``features``).
    """
    layout = TrainLayout(ensure_writable_dir(out_dir))
    session = _start_session(train_samples, class_names, positive_class, config, card_fields)
    if config.freeze_backbone:
        session.features = _head_data(
            session, train_samples, val_samples, feature_cache_dir or layout.features_dir, progress
        )
    state = _load_state(layout, session, _run_key(config, class_names, train_samples))
    resumed_from = state.epoch
    while state.epoch < config.epochs and state.stale < config.patience:
        row = _run_epoch(session, state, layout, train_samples, val_samples, progress)
        if on_epoch_end is not None:
            on_epoch_end(row)
    _calibrate_best(session, layout, val_samples, progress)
    _write_train_json(layout, session, positive_class, train_samples, val_samples, state)
    return TrainResult(layout.best_checkpoint, state.best_epoch, state.best_metrics, state.history, resumed_from)


def read_validation_groups(train_dir: str | Path) -> list[str]:
    """The patients/slides a training run held out for validation (``val_groups`` of its summary)."""
    path = TrainLayout(Path(train_dir)).train_json
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; is {train_dir} the --out folder of a training run?") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable training summary ({exc})") from exc
    groups = summary.get("val_groups") if isinstance(summary, dict) else None
    if not isinstance(groups, list):
        raise ConfigError(f"{path}: no list of validation groups (val_groups) in this training summary")
    return [str(group) for group in groups]


def _start_session(
    train_samples: list[Sample],
    class_names: list[str],
    positive_class: str,
    config: TrainConfig,
    card_fields: dict[str, Any],
) -> _Session:
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
    if config.arch.startswith(TIMM_PREFIX) or config.freeze_backbone:
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
    return _Session(
        guidance=guidance if guidance.active else None,
        config=config,
        class_names=list(class_names),
        device=device,
        model=model,
        frozen_modules=frozen_modules,
        criterion=nn.CrossEntropyLoss(weight=weights),
        plain_criterion=nn.CrossEntropyLoss(),
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


def _run_key(config: TrainConfig, class_names: list[str], train_samples: list[Sample]) -> str:
    """Identifies a run: a saved state is resumed only by the same settings on the same training data."""
    resumable = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_RUN_KEY}
    return config_hash(
        {
            "config": resumable,
            "classes": class_names,
            "train": [(s.source, s.index, s.label) for s in train_samples][:100000],
        }
    )


def _run_epoch(
    session: _Session,
    state: TrainState,
    layout: TrainLayout,
    train_samples: list[Sample],
    val_samples: list[Sample],
    progress: bool,
) -> dict[str, float]:
    """Train and validate epoch ``state.epoch``; update the best checkpoint, the table, the curves, the state."""
    epoch, config = state.epoch, session.config
    started = time.perf_counter()
    torch.manual_seed(config.seed * 1000 + epoch)  # augmentations replay identically after a resume
    desc = f"epoch {epoch + 1}/{config.epochs}"
    if session.features is not None:
        train_loss, train_accuracy = _train_head_epoch(session, session.features, epoch, desc, progress)
    else:
        train_loss, train_accuracy = _train_one_epoch(
            session, session.loader(train_samples, True, epoch), desc, progress
        )
    session.scheduler.step()
    if session.features is not None:
        metrics, val_loss = _validate_head(session, session.features)
    else:
        metrics, val_loss = _validate(session, train_samples, val_samples, epoch)
    row = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "val_loss": val_loss,
        "val_accuracy": metrics["accuracy"],
        "val_balanced_accuracy": metrics["balanced_accuracy"],
        "lr_head": session.optimizer.param_groups[1]["lr"],
        "seconds": time.perf_counter() - started,
    }
    state.history.append(row)
    log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
    if metrics["balanced_accuracy"] > state.best_score:
        state.best_score, state.best_epoch, state.best_metrics = metrics["balanced_accuracy"], epoch + 1, metrics
        session.card.validation_metrics = {"epoch": epoch + 1, **_summary(metrics)}
        save_checkpoint(layout.best_checkpoint, session.model, session.card)
    if val_loss < state.best_val_loss - 1e-6:
        state.best_val_loss, state.stale = val_loss, 0
    else:
        state.stale += 1
    state.epoch = epoch + 1
    _write_history(layout.metrics_csv, state.history)
    plot_curves(layout.curves_png, state.history)
    _save_state(layout.last_state, session, state)
    return row


def _train_one_epoch(session: _Session, loader: TileLoader, desc: str, progress: bool) -> tuple[float, float]:
    """One pass over the training data; the mean loss and the accuracy (of the augmented batches)."""
    model, device = session.model, session.device
    model.train()
    for module in session.frozen_modules:
        module.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device)
        masks = batch[2].to(device) if len(batch) > 2 else None
        if session.stain is not None:
            images = session.stain(images)
        images = normalise(images, session.mean, session.std)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(session.config.precision, device):
            if session.guidance is not None:
                logits, extra = guided_logits_and_loss(model, images, targets, masks, session.guidance)
            else:
                logits, extra = model(images), None
        loss = session.criterion(logits.float(), targets)
        if extra is not None:
            loss = loss + extra.float()
        session.optimizer.zero_grad(set_to_none=True)
        session.scaler.scale(loss).backward()
        session.scaler.step(session.optimizer)
        session.scaler.update()
        loss_sum += float(loss.detach()) * len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
    return loss_sum / max(1, seen), correct / max(1, seen)


def _train_head_epoch(session: _Session, data: HeadData, epoch: int, desc: str, progress: bool) -> tuple[float, float]:
    """One pass of the head over the cached training features (the encoder does not run)."""
    config, model = session.config, session.model
    model.train()
    session.frozen_modules[0].eval()
    loader = feature_loader(
        data.train,
        data.train_labels,
        batch_size=config.batch_size,
        train=True,
        n_classes=len(session.class_names),
        epoch=epoch,
        seed=config.seed,
        imbalance=config.imbalance,
    )
    head = as_split(model)
    loss_sum, correct, seen = 0.0, 0, 0
    for features, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
        features, targets = features.to(session.device), targets.to(session.device)
        logits = head.forward_head(features[:, :, None, None])
        loss = session.criterion(logits, targets)
        session.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        session.optimizer.step()
        loss_sum += float(loss.detach()) * len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
    return loss_sum / max(1, seen), correct / max(1, seen)


def _head_predictions(session: _Session, model: nn.Module, data: HeadData) -> Predictions:
    """The head's raw logits on the cached validation features, as :func:`predict` returns them."""
    model.eval()
    with torch.no_grad():
        features = torch.from_numpy(data.val).to(session.device)
        logits = as_split(model).forward_head(features[:, :, None, None]).float()
        labels = torch.from_numpy(data.val_labels).to(session.device)
        loss = float(session.plain_criterion(logits, labels)) if len(labels) else 0.0
    return Predictions(logits.cpu().numpy(), data.val_labels, loss)


def _validate_head(session: _Session, data: HeadData) -> tuple[dict[str, Any], float]:
    predictions = _head_predictions(session, session.model, data)
    probs, labels = predictions.probabilities, predictions.labels
    metrics = classification_metrics(labels, probs.argmax(1), session.class_names, session.card.positive_index, probs)
    return metrics, predictions.loss


def _validate(
    session: _Session, train_samples: list[Sample], val_samples: list[Sample], epoch: int
) -> tuple[dict[str, Any], float]:
    """Validation metrics and loss (after re-estimating BatchNorm statistics when asked to)."""
    config = session.config
    if config.precise_bn_batches > 0:
        recalibrate_batchnorm(
            session.model,
            session.loader(train_samples, False, epoch),
            session.device,
            session.mean,
            session.std,
            config.precise_bn_batches,
            session.frozen_modules,
            session.stain,
        )
    predictions = predict(
        session.model,
        session.loader(val_samples, False, epoch),
        session.device,
        session.mean,
        session.std,
        config.precision,
        session.plain_criterion,
        stain=session.stain,
    )
    probs, labels = predictions.probabilities, predictions.labels
    metrics = classification_metrics(labels, probs.argmax(1), session.class_names, session.card.positive_index, probs)
    return metrics, predictions.loss


def _calibrate_best(session: _Session, layout: TrainLayout, val_samples: list[Sample], progress: bool) -> None:
    """Fit the best checkpoint's temperature and CAM profile on the validation tiles and re-save it, with its
    reliability diagram. From the checkpoint's own weights and raw logits, so a resumed run that has nothing
    left to train refits to the same card. Never fails the run: validation that fits no temperature (empty,
    one class) is recorded in the card as the reason there is none."""
    path = layout.best_checkpoint
    if not path.exists():
        return
    model, card = load_checkpoint(path, session.device)
    profile = CamProfile(None, 0)
    try:
        check_labels(np.array([s.label for s in val_samples]), VALIDATION, session.class_names)
        if session.features is not None:  # the cached features: no encoder pass, and so no CAM profile
            predictions = _head_predictions(session, model, session.features)
        else:
            predictions = predict(
                model,
                session.loader(val_samples, False, 0),
                session.device,
                session.mean,
                session.std,
                session.config.precision,
                progress=progress,
                stain=session.stain,
                cam_class=card.positive_index,
            )
        profile = positive_cam_profile(predictions, card.positive_index)
        folds = sample_folds(val_samples, predictions.labels)
        calibration = fit_calibration(predictions, session.class_names, VALIDATION, folds=folds)
    except ConfigError as exc:
        log.warning("%s; the model stays uncalibrated (T = 1)", exc)
        save_checkpoint(path, model, uncalibrated_card(card, str(exc), profile))
        layout.reliability_png.unlink(missing_ok=True)  # an earlier run's figure would describe another model
        return
    save_checkpoint(path, model, calibrated_card(card, calibration, profile, VALIDATION))
    write_reliability(layout.reliability_png, calibration, "the validation split")


def _save_state(path: Path, session: _Session, state: TrainState) -> None:
    """The resume point. Plain tensors, numbers and strings only, so ``torch.load(weights_only=True)`` reads it:
    the best metrics (nested dicts, lists) travel as a JSON string."""
    saved = {
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "epoch": state.epoch - 1,  # the last finished epoch, 0-based
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "stale": state.stale,
        "run_key": state.run_key,
        "best_metrics_json": json.dumps(state.best_metrics),
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def _load_state(layout: TrainLayout, session: _Session, run_key: str) -> TrainState:
    """Resume from the run's saved state when it belongs to this run (weights, optimiser and schedule restored
    into ``session``); otherwise a fresh state."""
    path = layout.last_state
    if not path.exists():
        return TrainState(run_key)
    saved = torch.load(path, map_location=session.device, weights_only=True)
    if saved.get("run_key") != run_key:
        log.info("%s belongs to another run; starting afresh", path)
        return TrainState(run_key)
    session.model.load_state_dict(saved["model"])
    session.optimizer.load_state_dict(saved["optimizer"])
    session.scheduler.load_state_dict(saved["scheduler"])
    start_epoch = int(saved["epoch"]) + 1
    metrics_text = saved.get("best_metrics_json")
    log.info("resuming from epoch %d", start_epoch)
    return TrainState(
        run_key=run_key,
        epoch=start_epoch,
        best_score=float(saved["best_score"]),
        best_epoch=int(saved["best_epoch"]),
        best_val_loss=float(saved["best_val_loss"]),
        stale=int(saved["stale"]),
        best_metrics=json.loads(metrics_text) if isinstance(metrics_text, str) and metrics_text else {},
        history=_read_history(layout.metrics_csv)[:start_epoch],
    )


def _write_train_json(
    layout: TrainLayout,
    session: _Session,
    positive_class: str,
    train_samples: list[Sample],
    val_samples: list[Sample],
    state: TrainState,
) -> None:
    """The run's summary: settings, classes, counts, the best epoch and the split (by group)."""
    n_classes = len(session.class_names)
    write_json_atomic(
        layout.train_json,
        {
            "config": session.config.to_dict(),
            "class_names": session.class_names,
            "positive_class": positive_class,
            "counts": {"train": class_counts(train_samples, n_classes), "val": class_counts(val_samples, n_classes)},
            "best_epoch": state.best_epoch,
            "best_validation": state.best_metrics,
            "history": state.history,
            "train_groups": sorted({s.group for s in train_samples}),
            "val_groups": sorted({s.group for s in val_samples}),
        },
    )


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "balanced_accuracy", "macro", "weighted", "binary", "roc_auc")
    return {k: metrics[k] for k in keep if k in metrics}


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
