"""`wsi-dala pretrain`: SimCLR (Chen et al. 2020) on unlabelled tiles, for `train --pretrained PATH`.

Why SimCLR rather than MoCo v2: with the small batches a CPU affords, MoCo's memory bank supplies more
negatives, but it needs a momentum encoder (twice the weights) and a queue whose state must be saved for
an exact resume; SimCLR's in-batch negatives need neither, and at 64-256 tiles per step (126-510
negatives per view) it is the simpler method to get right. The loss is NT-Xent
(:func:`wsi_dala.training.losses.nt_xent_loss`), the views those of
:mod:`wsi_dala.training.views` (crops at the tile's µm/px, D4, HED stain jitter, blur, light).

The encoder is any `train` architecture's ``forward_features``, pooled; a two-layer projection head
(SimCLR's) sits on top during pre-training and is dropped after. Every epoch draws its tiles and views
from generators seeded by (seed, epoch), so a resumed run continues the very curve an uninterrupted one
draws (tested).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from wsi_dala.core.config import PretrainConfig
from wsi_dala.core.fileio import atomic_open, ensure_writable_dir, write_json_atomic
from wsi_dala.core.layout import PretrainLayout
from wsi_dala.model import build_model
from wsi_dala.model.checkpoint import PRETRAIN_CARD_KEY
from wsi_dala.model.devices import autocast, pick_device, resolve_precision
from wsi_dala.model.interface import pooled_features
from wsi_dala.model.normalisation import IMAGENET_MEAN, IMAGENET_STD
from wsi_dala.training.datasets import SampleDataset
from wsi_dala.training.losses import nt_xent_loss
from wsi_dala.training.plots import plot_pretrain_loss
from wsi_dala.training.unlabelled import UnlabelledSet, slide_balanced_weights
from wsi_dala.training.views import ViewSettings, histology_view

log = logging.getLogger(__name__)

PRETRAIN_METHOD = "SimCLR (NT-Xent, in-batch negatives)"


@dataclass
class PretrainResult:
    backbone: Path
    epochs_done: int
    losses: list[float]  # every step's loss, from the first epoch
    seconds: float
    tiles_per_s: float  # tiles (each two views) per second of training, this invocation
    collapsed: bool = False  # the last epoch's loss at chance (see collapsed())


class ProjectionHead(nn.Module):
    """SimCLR's MLP on the pooled feature: Linear, ReLU, Linear; its output is L2-normalised."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        hidden = min(2048, max(in_features, out_features))
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(pooled).float(), dim=1)


def feature_width(model: nn.Module, tile_px: int) -> int:
    """Channels of the pooled feature (one real pass on a tiny batch: some architectures have no meta kernels)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = int(pooled_features(model, torch.zeros(2, 3, tile_px, tile_px)).shape[1])
    model.train(was_training)
    return width


def pretrain(config: PretrainConfig, data: UnlabelledSet, out_dir: str | Path, progress: bool = True) -> PretrainResult:
    """Pre-train (or resume) and write the backbone, the loss table and curve, and ``pretrain.json``."""
    layout = PretrainLayout(ensure_writable_dir(out_dir))
    device = pick_device(config.device)
    precision = resolve_precision(config.precision, device)
    settings = ViewSettings(crop_fraction=config.crop_fraction, hed_scale=config.hed_scale, hed_shift=config.hed_shift)
    crop_px = settings.crop_px(data.tile_size_px)
    torch.manual_seed(config.seed)
    model = build_model(config.arch, 2, config.pretrained, config.options, data.tile_size_px)
    projector = ProjectionHead(feature_width(model, crop_px), config.projection_dim)
    model.to(device).train()
    projector.to(device).train()
    parameters = list(model.parameters())  # the classifier's get no gradient: AdamW leaves them alone
    optimizer = torch.optim.AdamW(
        [*parameters, *projector.parameters()], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    key = run_key(config, data)
    start_epoch, losses = _resume(layout, key, model, projector, optimizer, scheduler, device)
    draws = config.tiles_per_epoch or len(data.samples)
    steps = max(1, draws // config.batch_size)
    dataset = SampleDataset(data.samples)
    weights = slide_balanced_weights(data.samples).tolist()
    started, tiles_done = time.perf_counter(), 0
    classifier: set[str] | None = None  # parameters the features do not use (the classifier): not saved
    for epoch in range(start_epoch, config.epochs):
        sampler_generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        view_generator = torch.Generator().manual_seed(config.seed * 1000 + epoch + 500)
        sampler = WeightedRandomSampler(
            weights, steps * config.batch_size, replacement=True, generator=sampler_generator
        )
        loader = DataLoader(
            dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.loader_workers, drop_last=True
        )
        for tiles, _labels in tqdm(loader, desc=f"pretrain {epoch + 1}/{config.epochs}", disable=not progress):
            first = histology_view(tiles, settings, view_generator)
            second = histology_view(tiles, settings, view_generator)
            views = torch.cat([first, second]).to(device)
            images = normalise_float(views, device).contiguous(memory_format=torch.channels_last)
            with autocast(precision, device):
                embeddings = projector(pooled_features(model, images))
            loss = nt_xent_loss(embeddings[: len(tiles)], embeddings[len(tiles) :], config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if classifier is None:
                classifier = {name for name, p in model.named_parameters() if p.grad is None}
            optimizer.step()
            losses.append(float(loss.detach()))
            tiles_done += len(tiles)
        scheduler.step()
        log.info("pretrain epoch %d: mean loss %.4f", epoch + 1, sum(losses[-steps:]) / steps)
        if epoch >= 1 and collapsed(losses, steps, config.batch_size):
            log.warning(
                "pretrain epoch %d: loss at chance (log(2N - 1) = %.3f): the embeddings have collapsed; "
                "lower --lr or raise --temperature",
                epoch + 1,
                chance_loss(config.batch_size),
            )
        _write_losses(layout.loss_csv, losses, steps)  # before the state: a resume reads this epoch's losses
        plot_pretrain_loss(layout.loss_png, losses, steps)
        card = backbone_card(config, data, epoch + 1, losses, steps)
        save_backbone(layout.backbone, model, card, leave_out=classifier or set())
        _save_state(layout.last_state, key, epoch, model, projector, optimizer, scheduler)
    seconds = time.perf_counter() - started
    write_json_atomic(
        layout.pretrain_json,
        {
            "card": backbone_card(config, data, config.epochs, losses, steps),
            "precision": precision,
            "device": str(device),
            "steps_per_epoch": steps,
            "seconds_this_invocation": round(seconds, 1),
            "tiles_per_s_this_invocation": round(tiles_done / seconds, 2) if seconds > 0 and tiles_done else None,
        },
    )
    rate = tiles_done / seconds if seconds > 0 and tiles_done else 0.0
    fell_to_chance = collapsed(losses, steps, config.batch_size)
    return PretrainResult(layout.backbone, config.epochs, losses, seconds, rate, fell_to_chance)


def normalise_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float RGB in [0, 1] → ImageNet-normalised input (the normalisation `train` records in its cards)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images - mean) / std).to(device)


def chance_loss(batch_size: int) -> float:
    """NT-Xent when every embedding is the same: log(2N - 1), what a collapsed encoder scores."""
    return math.log(2 * batch_size - 1)


def collapsed(losses: list[float], steps: int, batch_size: int) -> bool:
    """Whether the last epoch's mean loss sits at chance (within 2 %): the views no longer tell tiles apart."""
    return bool(losses) and sum(losses[-steps:]) / steps > 0.98 * chance_loss(batch_size)


def run_key(config: PretrainConfig, data: UnlabelledSet) -> str:
    """What a resume must share with the run it continues: every setting but the epoch count, and the tiles."""
    settings = config.model_dump(exclude={"epochs", "loader_workers", "device"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for sample in data.samples:
        digest.update(f"{sample.source}\t{sample.index}\n".encode())
    return digest.hexdigest()[:16]


def backbone_card(
    config: PretrainConfig, data: UnlabelledSet, epochs: int, losses: list[float], steps: int
) -> dict[str, Any]:
    """What a user (and `train --pretrained`) needs to know of the weights."""
    return {
        "kind": "pretrained backbone",
        "method": PRETRAIN_METHOD,
        "architecture": config.arch,
        "options": config.options,
        "started_from": config.pretrained
        if config.pretrained in ("imagenet", "none")
        else Path(config.pretrained).name,
        "tile_size_px": data.tile_size_px,
        "view_size_px": ViewSettings(crop_fraction=config.crop_fraction).crop_px(data.tile_size_px),
        "mpp": data.mpp,
        "data": {"sources": data.sources, "slides": data.n_groups, "tiles": len(data.samples)},
        "epochs": epochs,
        "batch_size": config.batch_size,
        "temperature": config.temperature,
        "views": asdict(
            ViewSettings(crop_fraction=config.crop_fraction, hed_scale=config.hed_scale, hed_shift=config.hed_shift)
        ),
        "final_epoch_loss": round(sum(losses[-steps:]) / steps, 5) if losses else None,
        "chance_loss": round(chance_loss(config.batch_size), 5),
        "collapsed": collapsed(losses, steps, config.batch_size),
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }


def save_backbone(path: Path, model: nn.Module, card: dict[str, Any], leave_out: set[str]) -> None:
    """The encoder's tensors (``leave_out``: the classifier's, never trained here) with the card, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in leave_out}
    with atomic_open(path, "wb") as handle:
        handle.write(save(state, metadata={PRETRAIN_CARD_KEY: json.dumps(card)}))


def _save_state(
    path: Path,
    key: str,
    epoch: int,
    model: nn.Module,
    projector: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    saved = {
        "run_key": key,
        "epoch": epoch,
        "model": model.state_dict(),
        "projector": projector.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def _resume(
    layout: PretrainLayout,
    key: str,
    model: nn.Module,
    projector: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[int, list[float]]:
    """The epoch to start from and the losses so far (0 and none when there is nothing of this run to resume)."""
    if not layout.last_state.exists():
        return 0, []
    saved = torch.load(layout.last_state, map_location=device, weights_only=True)
    if saved.get("run_key") != key:
        log.info("%s belongs to another pre-training run; starting afresh", layout.last_state)
        return 0, []
    model.load_state_dict(saved["model"])
    projector.load_state_dict(saved["projector"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    start = int(saved["epoch"]) + 1
    log.info("resuming pre-training at epoch %d", start + 1)
    return start, [loss for epoch, loss in _read_losses(layout.loss_csv) if epoch < start]


def _write_losses(path: Path, losses: list[float], steps: int) -> None:
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "loss"])
        for step, loss in enumerate(losses):
            writer.writerow([step // steps, step, repr(loss)])


def _read_losses(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [(int(row["epoch"]), float(row["loss"])) for row in csv.DictReader(handle)]
