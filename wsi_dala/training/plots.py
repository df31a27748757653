"""Figures a person would rather look at than read: training curves, confusion matrices, reliability diagrams.

Built on :class:`matplotlib.figure.Figure` directly: no pyplot, no backend to select, no global state
(so importing this module changes nothing for anyone else, and figures are freed with their object).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from wsi_dala.core.fileio import atomic_open
from wsi_dala.model.calibration import ReliabilityBins, ece_of


def save_figure(fig: Figure, path: Path) -> None:
    """Write a figure as PNG, atomically."""
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
    save_figure(fig, path)


def plot_pretrain_loss(path: Path, losses: Sequence[float], steps_per_epoch: int) -> None:
    """Contrastive loss per step (faint) and its mean per epoch, against epochs."""
    fig = Figure(figsize=(7, 4))
    axes = fig.subplots()
    steps = np.arange(1, len(losses) + 1) / steps_per_epoch
    axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="step")
    epochs = len(losses) // steps_per_epoch
    if epochs:
        means = np.asarray(losses[: epochs * steps_per_epoch]).reshape(epochs, steps_per_epoch).mean(axis=1)
        axes.plot(np.arange(1, epochs + 1), means, "o-", color="tab:blue", label="epoch mean")
    axes.set(xlabel="epoch", ylabel="NT-Xent loss", title="Contrastive pre-training")
    axes.legend()
    save_figure(fig, path)


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
    save_figure(fig, path)


def plot_reliability(path: Path, curves: Sequence[tuple[str, ReliabilityBins]], title: str) -> None:
    """Reliability diagram: accuracy against mean top-label confidence per bin (on the diagonal: calibrated;
    below it: over-confident), each curve's ECE in the legend, and beneath, how many tiles each bin holds
    (on a log scale when they differ widely: a good model puts most tiles in the last bin)."""
    fig = Figure(figsize=(6.4, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    for i, (label, binned) in enumerate(curves):
        used = binned.count > 0
        top.plot(
            binned.confidence[used],
            binned.accuracy[used],
            "o-",
            color=f"C{i}",
            label=f"{label}, ECE {ece_of(binned):.3f}",
        )
        width = np.diff(binned.edges) / len(curves)
        bottom.bar(binned.edges[:-1] + i * width, binned.count, width=width, align="edge", color=f"C{i}", label=label)
    top.set(ylabel="accuracy (share of top labels right)", xlim=(0, 1), ylim=(0, 1.02), title=title)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    counts = np.concatenate([binned.count for _, binned in curves])
    if counts.max(initial=0) > 20 * counts[counts > 0].min(initial=1):
        bottom.set_yscale("log")
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    bottom.set(xlabel="confidence (top-label probability)", ylabel="tiles per bin")
    bottom.grid(alpha=0.3)
    save_figure(fig, path)
