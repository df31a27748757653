"""DT Grad-CAM: Grad-CAM with a dynamic, per-image threshold.

Target layer: the output of layer4 including attention (``forward_features``); target class: the
positive class's logit. The gradient ∂y_c/∂A only needs back-propagation through the head, so the
backbone runs without autograd and only the head is differentiated: a CAM for every tile costs a few
per cent over scoring (``shared/model-spec.md``, DT Grad-CAM step 6).

Raw maps (un-normalised, feature-map resolution) are what slide-level stitching needs: per-tile
min-max normalisation would stretch a benign tile's weak map to 1. Per-tile normalised maps are for
per-tile figures only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_dala.explain.threshold import CamSettings, dynamic_threshold
from wsi_dala.model.interface import as_split


@dataclass
class DTGradCAM:
    """Per-image outputs at image resolution."""

    maps: np.ndarray  # [N, H, W] float32: normalised Grad-CAM with values below τ set to 0
    masks: np.ndarray  # [N, H, W] bool: where the map survives the threshold
    thresholds: np.ndarray  # [N] float32: τ on the normalised [0, 1] map
    gradcam: np.ndarray  # [N, H, W] float32: the normalised map before thresholding (for figures)


def logits_and_raw_cams(
    model: nn.Module,
    images: torch.Tensor,
    positive_index: int,
    autocast: AbstractContextManager[object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and raw Grad-CAM maps [N, h, w] (ReLU(Σ α_k A_k), feature-map resolution).

    The backbone runs under ``no_grad`` (and under ``autocast`` when given: bf16/fp16 where it is
    fast); the head runs in fp32 with autograd, so the gradients that weight the map stay exact.
    """
    _features, logits, raw = features_logits_and_raw_cams(model, images, positive_index, autocast)
    return logits, raw


def features_logits_and_raw_cams(
    model: nn.Module,
    images: torch.Tensor,
    positive_index: int,
    autocast: AbstractContextManager[object] | None = None,
    backbone: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`logits_and_raw_cams`, and the fp32 feature map [N, C', h, w] the head ran on (so more
    passes of the head — MC dropout — need no second backbone pass). ``backbone`` computes the features
    instead of the model's own ``forward_features`` (another engine: ``wsi_dala.inference.engines``)."""
    if not getattr(model, "spatial_features", False):
        raise ValueError(f"{type(model).__name__} has no spatial feature map: Grad-CAM is not defined for it")
    if backbone is None:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            features = as_split(model).forward_features(images)
    else:
        features = backbone(images)
    logits, raw = head_logits_and_raw_cams(model, features, positive_index)
    return features.detach().float(), logits, raw


def features_and_logits_without_cams(
    model: nn.Module,
    images: torch.Tensor,
    autocast: AbstractContextManager[object] | None = None,
    backbone: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a model without a feature map: its features, logits, and a NaN 1 x 1 "map" per image, so the
    rows a store holds keep one layout (the heatmap then uses the probability alone)."""
    with torch.no_grad():
        if backbone is None:
            with autocast or contextlib.nullcontext():
                features = as_split(model).forward_features(images)
        else:
            features = backbone(images)
        features = features.float()
        logits = as_split(model).forward_head(features).float()
    return features, logits, torch.full((len(images), 1, 1), float("nan"), device=logits.device)


def head_logits_and_raw_cams(
    model: nn.Module, features: torch.Tensor, positive_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and raw Grad-CAM maps from a feature map: only the head runs, in fp32, with autograd."""
    features = features.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = as_split(model).forward_head(features)
        (gradients,) = torch.autograd.grad(logits[:, positive_index].sum(), features)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # α_k: spatial mean of the gradient
    channels = getattr(model, "cam_channels", None)  # a map whose first channels are the CAM's target layer
    raw = torch.relu((weights * features.detach())[:, :channels].sum(dim=1))
    return logits.detach(), raw


def upsample(raw: torch.Tensor | np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of [N, h, w] maps to [N, size, size]."""
    tensor = torch.as_tensor(raw, dtype=torch.float32)[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def dt_gradcam(raw: torch.Tensor | np.ndarray, size: int, settings: CamSettings | None = None) -> DTGradCAM:
    """Upsample raw maps, normalise each to [0, 1] (per-tile figures) and apply the dynamic threshold."""
    settings = settings or CamSettings()
    maps = upsample(raw, size)
    peak = maps.reshape(len(maps), -1).max(axis=1)
    normalised = maps / np.where(peak > 0, peak, 1.0)[:, None, None]
    thresholds = np.array([dynamic_threshold(m, settings) for m in normalised], dtype=np.float32)
    masks = (normalised >= thresholds[:, None, None]) & (normalised > 0)
    return DTGradCAM(
        maps=np.where(masks, normalised, 0.0).astype(np.float32),
        masks=masks,
        thresholds=thresholds,
        gradcam=normalised.astype(np.float32),
    )
