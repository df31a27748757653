"""Evaluate a checkpoint: metrics overall and per magnification, a confusion-matrix PNG, JSON and a table.

File names come from :class:`wsi_dala.layout.EvalLayout`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.devices import pick_device
from wsi_dala.errors import ConfigError
from wsi_dala.fileio import write_json_atomic
from wsi_dala.layout import EvalLayout
from wsi_dala.model import ModelCard, load_checkpoint
from wsi_dala.stain import StainProfile
from wsi_dala.stain_normalise import StainNormaliser
from wsi_dala.training.datasets import Sample
from wsi_dala.training.loaders import make_loader
from wsi_dala.training.metrics import classification_metrics, format_table
from wsi_dala.training.plots import plot_confusion
from wsi_dala.training.train import predict, training_stain


def _evaluation_stain(card: ModelCard, samples: list[Sample]) -> StainNormaliser | None:
    """A model trained on stain-normalised batches sees evaluation images mapped the same way: from the
    evaluation set's own stain to the card's reference."""
    method = card.training_data.get("stain_normalise", "none")
    if method == "none" or card.stain_reference is None:
        return None
    measured = training_stain(samples)
    if measured is None:
        raise ConfigError(
            f"{Path(samples[0].source).parent if samples else 'evaluation data'}: the evaluation images' stain "
            "could not be measured, and this model was trained on stain-normalised tiles"
        )
    return StainNormaliser(
        method,
        StainProfile.from_dict(measured, "evaluation images"),
        StainProfile.from_dict(card.stain_reference, "model card stain reference"),
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    samples: list[Sample],
    class_names: list[str],
    out_dir: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
    precision: str = "auto",
) -> tuple[dict[str, Any], str]:
    """Metrics dict (also written to the layout's metrics JSON) and the printable table.

    ``precision``: ``auto`` (fp16 autocast on CUDA, bf16 on a CPU with native bf16, else fp32), ``fp32``,
    ``bf16`` or ``fp16`` (see :mod:`wsi_dala.devices`).
    """
    layout = EvalLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    torch_device = pick_device(device)
    model, card = load_checkpoint(checkpoint, torch_device)
    if list(class_names) != list(card.class_names):
        raise ConfigError(f"{checkpoint}: model classes {card.class_names} differ from the data's {class_names}")
    loader = make_loader(
        samples, input_size=card.tile_size_px, batch_size=batch_size, train=False, n_classes=len(class_names)
    )
    probabilities, labels, _ = predict(
        model,
        loader,
        torch_device,
        card.normalisation["mean"],
        card.normalisation["std"],
        precision=precision,
        progress=progress,
        stain=_evaluation_stain(card, samples),
    )
    predictions = probabilities.argmax(1)
    overall = classification_metrics(labels, predictions, class_names, card.positive_index, probabilities)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "overall": overall, "per_magnification": {}}
    tables = [format_table(overall, f"all images (n={len(labels)})")]
    plot_confusion(layout.confusion_png(), overall["confusion_matrix"], class_names)
    by_mag: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        if sample.magnification:
            by_mag[sample.magnification].append(i)
    if len(by_mag) > 1:
        for mag in sorted(by_mag, key=lambda m: int(m.rstrip("X"))):
            idx = np.array(by_mag[mag])
            metrics = classification_metrics(
                labels[idx], predictions[idx], class_names, card.positive_index, probabilities[idx]
            )
            result["per_magnification"][mag] = metrics
            tables.append(format_table(metrics, f"{mag} (n={len(idx)})"))
            plot_confusion(layout.confusion_png(mag), metrics["confusion_matrix"], class_names, mag)
    write_json_atomic(layout.metrics_json, result)
    return result, "\n\n".join(tables)
