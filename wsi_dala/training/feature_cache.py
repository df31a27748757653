"""Encoder features of training image files, computed once and kept in a Zarr (``train --freeze-backbone``).

Image files (a BreakHis or class folder) have no slide, tiling or level-0 coordinates, so they cannot live
in a slide's ``features.zarr``; slide tiles do (``training.stored_features``). This cache is for the files.

A frozen encoder gives every tile the same features in every epoch, so the encoder runs once per tile
(centre crop, no augmentation) and the head trains on the pooled vectors: epochs then cost a matrix
product, not a forward pass of a ViT-L. The store is named by a hash of everything the features depend
on (encoder, its weights file, input size, normalisation, stain mapping, precision, the tiles and their
order), so a changed setting computes a new one and an unchanged one is reused by a later run. It is
built under a hidden name and renamed into place when complete: a killed run leaves no store that
looks finished.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from tqdm import tqdm

from wsi_dala.core.identity import config_hash
from wsi_dala.core.layout import building_path, feature_cache_store
from wsi_dala.model.devices import autocast, normalise
from wsi_dala.model.interface import as_split
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.training.datasets import Sample
from wsi_dala.training.loaders import make_loader

log = logging.getLogger(__name__)
FEATURES = "features"  # [N, C] float32: the mean of the encoder's feature map over its locations
_KEY = "key"
_DESCRIPTION = "computed_from"


def weights_identity(path: str) -> dict[str, Any]:
    """What identifies a weights file cheaply (name, size, modification time), or the word ``none``."""
    if path in ("none", "imagenet"):
        return {"weights": path}
    stat = Path(path).stat()
    return {"weights": Path(path).resolve().as_posix(), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def feature_key(description: dict[str, Any], samples: list[Sample]) -> str:
    """The hash a store is named by: the encoder's description and the tiles, in order."""
    return config_hash({**description, "tiles": [(s.source, s.index) for s in samples]})


@dataclass(frozen=True)
class EncoderPass:
    """How the tiles go through the encoder: as validation images (centre crop), normalised as the card says."""

    input_size: int
    batch_size: int
    device: torch.device
    mean: list[float]
    std: list[float]
    precision: str
    stain: StainNormaliser | None = None


def cached_features(
    model: nn.Module,
    samples: list[Sample],
    cache_dir: Path,
    description: dict[str, Any],
    how: EncoderPass,
    progress: bool = True,
) -> np.ndarray:
    """[len(samples), C] pooled features of ``samples`` under ``model.forward_features``: read from the
    store of the same key when one is complete, else computed and stored."""
    key = feature_key(description, samples)
    path = feature_cache_store(cache_dir, key)
    stored = _read(path, key, len(samples))
    if stored is not None:
        log.info("encoder features of %d tiles read from %s", len(samples), path)
        return stored
    features = _compute(model, samples, how, progress)
    _write(path, key, features, description)
    log.info("encoder features of %d tiles written to %s", len(samples), path)
    return features


def _read(path: Path, key: str, n: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
        array = group[FEATURES]
        if group.attrs.get(_KEY) != key or not isinstance(array, zarr.Array) or array.shape[0] != n:
            return None
        return np.asarray(array[:], dtype=np.float32)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError) as exc:
        log.warning("%s: unreadable feature store (%s); computing the features again", path, exc)
        return None


def _compute(model: nn.Module, samples: list[Sample], how: EncoderPass, progress: bool) -> np.ndarray:
    loader = make_loader(samples, input_size=how.input_size, batch_size=how.batch_size, train=False, n_classes=1)
    encoder = as_split(model)
    model.eval()
    parts: list[np.ndarray] = []
    with torch.no_grad():
        for images, _ in tqdm(loader, desc="encoder features", leave=False, disable=not progress):
            images = images.to(how.device, non_blocking=True)
            if how.stain is not None:
                images = how.stain(images)
            with autocast(how.precision, how.device):
                maps = encoder.forward_features(normalise(images, how.mean, how.std))
            parts.append(maps.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(parts).astype(np.float32)


def _write(path: Path, key: str, features: np.ndarray, description: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    building = building_path(path)
    if building.exists():
        shutil.rmtree(building)
    group = zarr.open_group(building, mode="w", zarr_format=3)
    rows = max(1, min(len(features), (1 << 20) // max(1, features.shape[1])))  # ~4 MiB chunks
    group.create_array(FEATURES, data=features, chunks=(rows, features.shape[1]))
    group.update_attributes({_KEY: key, _DESCRIPTION: description})
    if path.exists():
        shutil.rmtree(path)
    building.rename(path)
