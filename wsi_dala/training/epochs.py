"""One epoch: train (on tiles, or the head alone on cached features), validate, keep the best checkpoint,
write the table, the curves and the resume state."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from wsi_dala.core.layout import TrainLayout
from wsi_dala.model import save_checkpoint
from wsi_dala.model.devices import autocast, normalise
from wsi_dala.model.interface import as_split
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.training.datasets import Sample
from wsi_dala.training.guidance import guided_logits_and_loss
from wsi_dala.training.loaders import TileLoader, feature_loader
from wsi_dala.training.metrics import classification_metrics
from wsi_dala.training.plots import plot_curves
from wsi_dala.training.predict import Predictions, predict
from wsi_dala.training.resume import TrainState, save_state, write_history
from wsi_dala.training.session import HeadData, Session

log = logging.getLogger(__name__)


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


def run_epoch(
    session: Session,
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
        session.card.validation_metrics = {"epoch": epoch + 1, **metrics_summary(metrics)}
        save_checkpoint(layout.best_checkpoint, session.model, session.card)
    if val_loss < state.best_val_loss - 1e-6:
        state.best_val_loss, state.stale = val_loss, 0
    else:
        state.stale += 1
    state.epoch = epoch + 1
    write_history(layout.metrics_csv, state.history)
    plot_curves(layout.curves_png, state.history)
    save_state(layout.last_state, session, state)
    return row


def _train_one_epoch(session: Session, loader: TileLoader, desc: str, progress: bool) -> tuple[float, float]:
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


def _train_head_epoch(session: Session, data: HeadData, epoch: int, desc: str, progress: bool) -> tuple[float, float]:
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


def head_predictions(session: Session, model: nn.Module, data: HeadData) -> Predictions:
    """The head's raw logits on the cached validation features, as :func:`predict` returns them."""
    model.eval()
    with torch.no_grad():
        features = torch.from_numpy(data.val).to(session.device)
        logits = as_split(model).forward_head(features[:, :, None, None]).float()
        labels = torch.from_numpy(data.val_labels).to(session.device)
        loss = float(session.plain_criterion(logits, labels)) if len(labels) else 0.0
    return Predictions(logits.cpu().numpy(), data.val_labels, loss)


def _validate_head(session: Session, data: HeadData) -> tuple[dict[str, Any], float]:
    predictions = head_predictions(session, session.model, data)
    probs, labels = predictions.probabilities, predictions.labels
    metrics = classification_metrics(labels, probs.argmax(1), session.class_names, session.card.positive_index, probs)
    return metrics, predictions.loss


def _validate(
    session: Session, train_samples: list[Sample], val_samples: list[Sample], epoch: int
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


def metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "balanced_accuracy", "macro", "weighted", "binary", "roc_auc")
    return {k: metrics[k] for k in keep if k in metrics}
