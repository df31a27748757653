"""One pass of a model over labelled tiles: raw logits (T = 1), labels, the mean loss and, when asked,
raw Grad-CAM maps, for validation, evaluation and calibration.

Logits, not probabilities: temperature scaling is fitted on raw logits, and refitting on probabilities
that were already scaled would compound the temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsi_dala.explain.cam import logits_and_raw_cams
from wsi_dala.model.calibration import softmax
from wsi_dala.model.devices import autocast, normalise
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.training.loaders import TileLoader


@dataclass
class Predictions:
    logits: np.ndarray  # [N, C] float32, raw: no temperature applied
    labels: np.ndarray  # [N] int
    loss: float  # mean of the criterion over the tiles (0.0 without one)
    cams: np.ndarray | None = None  # [N, g, g] raw Grad-CAM maps of the asked class; None if not asked/defined

    @property
    def probabilities(self) -> np.ndarray:
        """softmax(logits), T = 1: what the metrics of the classifier itself are computed on."""
        return softmax(self.logits) if len(self.logits) else np.zeros(self.logits.shape)


def predict(
    model: nn.Module,
    loader: TileLoader,
    device: torch.device,
    mean: list[float],
    std: list[float],
    precision: str = "auto",
    criterion: nn.Module | None = None,
    progress: bool = False,
    stain: StainNormaliser | None = None,
    cam_class: int | None = None,
) -> Predictions:
    """Run ``model`` over ``loader`` (``stain``: mapped first).

    ``cam_class``: also the raw Grad-CAM maps for this class, in the same pass, where the model has a
    spatial feature map (the head then runs in fp32, as `wsi-dala run` scores tiles).
    """
    model.eval()
    cam_index = cam_class if getattr(model, "spatial_features", False) else None
    logits_parts: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    cams: list[np.ndarray] = []
    loss_sum = 0.0
    with torch.no_grad():
        for images, targets in tqdm(loader, desc="predict", leave=False, disable=not progress):
            images = images.to(device, non_blocking=True)
            if stain is not None:
                images = stain(images)
            images = normalise(images, mean, std)
            if cam_index is not None:
                logits, raw = logits_and_raw_cams(model, images, cam_index, autocast(precision, device))
                cams.append(raw.float().cpu().numpy())
            else:
                with autocast(precision, device):
                    logits = model(images)
            logits = logits.float()
            if criterion is not None:
                loss_sum += float(criterion(logits, targets.to(device))) * len(targets)
            logits_parts.append(logits.cpu().numpy())
            labels.append(targets.numpy())
    n = sum(len(x) for x in labels)
    if n == 0:
        return Predictions(np.zeros((0, 0), np.float32), np.zeros(0, dtype=int), 0.0)
    return Predictions(
        logits=np.concatenate(logits_parts),
        labels=np.concatenate(labels),
        loss=loss_sum / n,
        cams=np.concatenate(cams) if cam_index is not None else None,
    )
