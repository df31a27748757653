"""Where a training run stands, saved after every epoch and loaded to resume (``weights_only=True``: plain
tensors, numbers and strings), and the metrics table it appends to."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsi_dala.core.fileio import atomic_open
from wsi_dala.core.layout import TrainLayout
from wsi_dala.training.session import Session

log = logging.getLogger(__name__)


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


def save_state(path: Path, session: Session, state: TrainState) -> None:
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


def load_state(layout: TrainLayout, session: Session, run_key: str) -> TrainState:
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
        history=read_history(layout.metrics_csv)[:start_epoch],
    )


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
