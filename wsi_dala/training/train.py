"""The training loop: seeded, resumable, imbalance-aware, best checkpoint by validation balanced accuracy.

Imbalance is handled by the class-balanced loss of Cui et al. 2019 (weight ∝ (1−β)/(1−β^n_c),
normalised to sum to the number of classes) or by a weighted sampler, never both. Early stopping
watches the validation loss. Each epoch appends to ``metrics.csv``, redraws ``curves.png`` and saves
``last-state.pt`` (loaded with ``weights_only=True``), from which an interrupted run resumes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from wsi_dala.devices import autocast_for, normalise, pick_device
from wsi_dala.fileio import atomic_open, write_json_atomic
from wsi_dala.identity import config_hash
from wsi_dala.model import ModelCard, build_model, save_checkpoint
from wsi_dala.training.datasets import Sample, SampleDataset, class_counts, eval_transform, train_transform
from wsi_dala.training.metrics import classification_metrics

log = logging.getLogger(__name__)
IMBALANCE_MODES = ("cb-loss", "sampler", "none")
BEST_CHECKPOINT = "best.safetensors"
LAST_STATE = "last-state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Defaults from ``shared/model-spec.md`` (ours, not the paper's)."""

    arch: str = "dalaresnet50"
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str = "imagenet"
    input_size: int = 224
    epochs: int = 20
    batch_size: int = 32
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    imbalance: str = "cb-loss"
    beta: float = 0.999
    patience: int = 5
    seed: int = 0
    freeze_until: str | None = None  # "layer3": train layer4 + attention + head only (CPU runs)
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (fp16) / bf16 autocast on a CPU that supports it
    workers: int = 0
    precise_bn_batches: int = 0  # >0: re-estimate BatchNorm statistics on this many batches before validating

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, float]]
    resumed_from_epoch: int


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
    head, backbone = [], []
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
    prefixes = model.frozen_prefixes(freeze_until) if hasattr(model, "frozen_prefixes") else ()
    if not prefixes:
        raise ValueError(f"--freeze-until is supported for dalaresnet50 only, not {type(model).__name__}")
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return [module for name, module in model.named_children() if name in prefixes]


def _loader(samples: list[Sample], config: TrainConfig, train: bool, epoch: int, n_classes: int) -> DataLoader:
    dataset = SampleDataset(samples, train_transform(config.input_size) if train else eval_transform(config.input_size))
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    sampler = None
    if train and config.imbalance == "sampler":
        counts = np.maximum(class_counts(samples, n_classes), 1)
        weights = [1.0 / counts[s.label] for s in samples]
        sampler = WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=config.workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


def recalibrate_batchnorm(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    mean: list[float],
    std: list[float],
    batches: int,
    frozen_modules: list[nn.Module],
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
    with torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i >= batches:
                break
            model.forward_features(normalise(images.to(device), mean, std))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    mean: list[float],
    std: list[float],
    amp: bool,
    criterion: nn.Module | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities [N, C], labels [N] and mean loss over a loader."""
    model.eval()
    probabilities, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for images, targets in tqdm(loader, desc="predict", leave=False, disable=not progress):
            images = normalise(images.to(device, non_blocking=True), mean, std)
            with autocast_for(device, amp):
                logits = model(images)
            logits = logits.float()
            if criterion is not None:
                loss_sum += float(criterion(logits, targets.to(device))) * len(targets)
            probabilities.append(torch.softmax(logits, dim=1).cpu().numpy())
            labels.append(targets.numpy())
    n = sum(len(x) for x in labels)
    if n == 0:
        return np.zeros((0, 0)), np.zeros(0, dtype=int), 0.0
    return np.concatenate(probabilities), np.concatenate(labels), loss_sum / n


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
) -> TrainResult:
    """Train, validate every epoch, keep the best checkpoint; resume from ``out_dir`` when it can.

    ``on_epoch_end(row)`` is called after each epoch's state is saved.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_classes = len(class_names)
    device = pick_device(config.device)
    seed_everything(config.seed)
    model = build_model(config.arch, n_classes, config.pretrained, config.options, config.input_size)
    frozen_modules = _freeze(model, config.freeze_until)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    counts = class_counts(train_samples, n_classes)
    weights = class_balanced_weights(counts, config.beta).to(device) if config.imbalance == "cb-loss" else None
    criterion = nn.CrossEntropyLoss(weight=weights)
    plain_criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, config), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.amp)
    card = ModelCard(
        architecture=config.arch,
        class_names=list(class_names),
        positive_class=positive_class,
        tile_size_px=config.input_size,
        options=dict(config.options),
        **card_fields,
    )
    mean, std = card.normalisation["mean"], card.normalisation["std"]
    # Epoch count and patience may change between a run and its resumption (to train longer).
    resumable = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "patience", "workers")}
    run_key = config_hash(
        {
            "config": resumable,
            "classes": class_names,
            "train": [(s.source, s.index, s.label) for s in train_samples][:100000],
        }
    )
    state_path = out_dir / LAST_STATE
    history: list[dict[str, float]] = []
    start_epoch, best_score, best_epoch, best_metrics, stale = 0, -1.0, -1, {}, 0
    best_val_loss = math.inf
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state.get("run_key") == run_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"]) + 1
            best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
            best_val_loss, stale = float(state["best_val_loss"]), int(state["stale"])
            history = _read_history(out_dir / "metrics.csv")[:start_epoch]
            best_metrics = classification_metrics_from_state(state)
            log.info("resuming from epoch %d", start_epoch)
        else:
            log.info("%s belongs to another run; starting afresh", state_path)
    resumed_from = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if stale >= config.patience:
            break
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1000 + epoch)  # augmentations replay identically after a resume
        model.train()
        for module in frozen_modules:
            module.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        loader = _loader(train_samples, config, True, epoch, n_classes)
        for images, targets in tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress
        ):
            images = normalise(images.to(device, non_blocking=True), mean, std)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device)
            with autocast_for(device, config.amp):
                logits = model(images)
            loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
        scheduler.step()
        if config.precise_bn_batches > 0:
            recalibrate_batchnorm(
                model,
                _loader(train_samples, config, False, epoch, n_classes),
                device,
                mean,
                std,
                config.precise_bn_batches,
                frozen_modules,
            )
        probs, labels, val_loss = predict(
            model, _loader(val_samples, config, False, epoch, n_classes), device, mean, std, config.amp, plain_criterion
        )
        metrics = classification_metrics(labels, probs.argmax(1), class_names, card.positive_index, probs)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "lr_head": optimizer.param_groups[1]["lr"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if metrics["balanced_accuracy"] > best_score:
            best_score, best_epoch, best_metrics = metrics["balanced_accuracy"], epoch + 1, metrics
            card.validation_metrics = {"epoch": epoch + 1, **_summary(metrics)}
            save_checkpoint(out_dir / BEST_CHECKPOINT, model, card)
        if val_loss < best_val_loss - 1e-6:
            best_val_loss, stale = val_loss, 0
        else:
            stale += 1
        _write_history(out_dir / "metrics.csv", history)
        _plot_curves(out_dir / "curves.png", history)
        _save_state(
            state_path,
            model,
            optimizer,
            scheduler,
            epoch,
            best_score,
            best_epoch,
            best_val_loss,
            stale,
            run_key,
            best_metrics,
        )
        if on_epoch_end is not None:
            on_epoch_end(row)
    write_json_atomic(
        out_dir / "train.json",
        {
            "config": config.to_dict(),
            "class_names": class_names,
            "positive_class": positive_class,
            "counts": {"train": class_counts(train_samples, n_classes), "val": class_counts(val_samples, n_classes)},
            "best_epoch": best_epoch,
            "best_validation": best_metrics,
            "history": history,
            "train_groups": sorted({s.group for s in train_samples}),
            "val_groups": sorted({s.group for s in val_samples}),
        },
    )
    return TrainResult(out_dir / BEST_CHECKPOINT, best_epoch, best_metrics, history, resumed_from)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "balanced_accuracy", "macro", "weighted", "binary", "roc_auc")
    return {k: metrics[k] for k in keep if k in metrics}


def classification_metrics_from_state(state: dict[str, Any]) -> dict[str, Any]:
    import json

    text = state.get("best_metrics_json")
    return json.loads(text) if isinstance(text, str) and text else {}


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    epoch: int,
    best_score: float,
    best_epoch: int,
    best_val_loss: float,
    stale: int,
    run_key: str,
    best_metrics: dict,
) -> None:
    import json

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "best_val_loss": best_val_loss,
        "stale": stale,
        "run_key": run_key,
        "best_metrics_json": json.dumps(best_metrics),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())


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


def _plot_curves(path: Path, history: list[dict[str, float]]) -> None:
    from wsi_dala.training.plots import plot_curves

    plot_curves(path, history)
