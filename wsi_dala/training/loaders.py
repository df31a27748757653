"""Data loaders for training, validation and evaluation: one place that decides batching, shuffling and sampling.

Every loader is seeded from ``seed * 1000 + epoch``, so shuffling and weighted sampling replay identically
when an interrupted run resumes. Images come out as uint8 [N, 3, H, W]; normalisation happens per batch
on the device (:func:`wsi_dala.model.devices.normalise`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from wsi_dala.training.datasets import Sample, SampleDataset, eval_transform, train_transform

# One item of a SampleDataset: a uint8 [3, H, W] image and its class index.
TileLoader = DataLoader[tuple[torch.Tensor, ...]]


def make_loader(
    samples: list[Sample],
    *,
    input_size: int,
    batch_size: int,
    train: bool,
    n_classes: int,
    epoch: int = 0,
    seed: int = 0,
    imbalance: str = "none",
    loader_workers: int = 0,
    with_masks: bool = False,
) -> TileLoader:
    """A loader over ``samples``.

    ``train``: training augmentations and shuffling (or, with ``imbalance="sampler"``, a class-balanced
    weighted sampler drawing with replacement); otherwise a centre crop in the samples' order.
    ``loader_workers``: data-loading processes (0: load in the calling process). ``with_masks``: each item
    also carries the tile's lesion mask, transformed with it (``train --mask-guided``).
    """
    transform = train_transform(input_size) if train else eval_transform(input_size)
    dataset = SampleDataset(samples, transform, with_masks)
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    sampler = _balanced_sampler(labels, n_classes, generator) if train and imbalance == "sampler" else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=loader_workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


def feature_loader(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    train: bool,
    n_classes: int,
    epoch: int = 0,
    seed: int = 0,
    imbalance: str = "none",
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """Cached encoder features [N, C] and their labels in batches, shuffled or sampled as :func:`make_loader`."""
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels.astype(np.int64)))
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    sampler = _balanced_sampler(labels, n_classes, generator) if train and imbalance == "sampler" else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, generator=generator
    )


def _balanced_sampler(labels: np.ndarray, n_classes: int, generator: torch.Generator) -> WeightedRandomSampler:
    """Draws every class equally often (with replacement): the ``imbalance="sampler"`` option."""
    counts = np.maximum(np.bincount(labels, minlength=n_classes), 1)
    weights = (1.0 / counts[labels]).tolist()
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)
