"""Figures a person would rather look at than read: training curves and confusion matrices.

Built on :class:`matplotlib.figure.Figure` directly: no pyplot, no backend to select, no global state
(so importing this module changes nothing for anyone else, and figures are freed with their object).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from wsi_dala.fileio import atomic_open


def _save(fig: Figure, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")


def plot_curves(path: Path, history: list[dict[str, float]]) -> None:
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="Loss")
    left.legend()
    right.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train accuracy")
    right.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation accuracy")
    right.plot(epochs, [r["val_balanced_accuracy"] for r in history], "o-", label="validation balanced accuracy")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy")
    right.legend(loc="lower right")
    _save(fig, path)


def plot_confusion(path: Path, matrix: list[list[int]], class_names: list[str], title: str = "") -> None:
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = counts / np.where(rows == 0, 1, rows)
    size = 1.2 + 0.9 * len(class_names)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            f"{value}\n{share[i, j]:.0%}",
            ha="center",
            va="center",
            color="white" if share[i, j] > 0.5 else "black",
        )
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    _save(fig, path)
