"""Unlabelled tiles for self-supervised pre-training: the tile stores that `tile`, `run` and `batch` write,
or folders of images.

Every store is checked before any training (complete, not empty, one tile size and one µm/px across
all of them), so a bad store costs seconds, not an epoch. Each slide (store, or image folder) is one
group: :func:`slide_balanced_weights` gives each group the same share of the draws, so one large slide
does not dominate what the encoder learns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import TILES_STORE_NAME
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.datasets import IMAGE_SUFFIXES, Sample

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.02  # tiles whose µm/px differ by more than 2 % are not one training set (pretrain, --synthetic)


@dataclass(frozen=True)
class UnlabelledSet:
    """The tiles to pre-train on, one sample each (label -1), and what the card records of them."""

    samples: list[Sample]
    tile_size_px: int
    mpp: float | None  # None: image folders of unknown µm/px
    sources: list[str]  # store or folder names (not full paths: the card may be shared)

    @property
    def n_groups(self) -> int:
        return len({s.group for s in self.samples})


def store_path(path: Path) -> Path:
    """A tile store given as itself or as the run folder that holds it."""
    return path / TILES_STORE_NAME if (path / TILES_STORE_NAME).is_dir() else path


def archive_stores(archive: Path) -> list[Path]:
    """Every tile store below a `batch` (or `run`) output folder."""
    if not archive.is_dir():
        raise ConfigError(f"{archive}: --archive is not a folder")
    stores = sorted(p for p in archive.rglob(TILES_STORE_NAME) if p.is_dir() and not p.name.startswith("."))
    if not stores:
        raise ConfigError(f"{archive}: no {TILES_STORE_NAME} below this folder (run `wsi-dala batch` first)")
    return stores


def store_samples(paths: list[Path]) -> tuple[list[Sample], int | None, float | None]:
    """Samples of every tile of each store, after checking the stores agree on tile size and µm/px."""
    samples: list[Sample] = []
    size: int | None = None
    mpp: float | None = None
    first: Path | None = None
    for given in paths:
        path = store_path(given)
        try:
            store = TileStore(path)
            info = store.info
        except (OSError, KeyError, ValueError, ConfigError) as exc:
            raise ConfigError(f"{path}: not a wsi-dala tile store ({' '.join(str(exc).split())[:160]})") from exc
        if not info.complete:
            raise ConfigError(f"{path}: tile store is incomplete; finish it with `wsi-dala tile` (or `run`) first")
        if info.n_tiles == 0:
            raise ConfigError(f"{path}: tile store has no tiles (no tissue found in its slide)")
        store_mpp = float(info.tiling.effective_mpp)
        if size is None:
            size, mpp, first = info.tile_size_px, store_mpp, path
        elif info.tile_size_px != size:
            raise ConfigError(f"{path}: tiles are {info.tile_size_px} px, those of {first} are {size} px")
        elif mpp is not None and abs(store_mpp - mpp) > MPP_TOLERANCE * mpp:
            raise ConfigError(f"{path}: tiles are at {store_mpp:.3g} µm/px, those of {first} at {mpp:.3g} µm/px")
        group = f"{path.parent.name}/{path.name}"
        samples.extend(Sample(str(path), -1, group, index=i) for i in range(info.n_tiles))
    return samples, size, mpp


def folder_samples(root: Path) -> tuple[list[Sample], int]:
    """Every image below ``root`` (one group per folder), all of one square size."""
    if not root.is_dir():
        raise ConfigError(f"{root}: --folder is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below this folder")
    sizes = {}
    for path in files:
        try:
            with Image.open(path) as image:
                sizes[path] = image.size
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read image ({' '.join(str(exc).split())[:120]})") from exc
    first = files[0]
    for path, size in sizes.items():
        if size != sizes[first] or size[0] != size[1]:
            raise ConfigError(f"{path}: images must be squares of one size ({sizes[first][0]} px like {first})")
    return [Sample(str(p), -1, str(p.parent.relative_to(root))) for p in files], sizes[first][0]


def unlabelled_set(
    stores: list[Path], archive: Path | None, folders: list[Path], folder_mpp: float | None = None
) -> UnlabelledSet:
    """Every tile to pre-train on, from stores (given one by one or below a batch output) and image folders."""
    paths = list(stores) + (archive_stores(archive) if archive is not None else [])
    samples, size, mpp = store_samples(paths) if paths else ([], None, None)
    sources = [f"{store_path(p).parent.name}/{TILES_STORE_NAME}" for p in paths]
    for root in folders:
        images, image_size = folder_samples(root)
        if size is not None and image_size != size:
            raise ConfigError(f"{root}: images are {image_size} px, the other tiles {size} px")
        size = image_size
        samples.extend(images)
        sources.append(root.name)
    if folders:
        if folder_mpp is None:
            mpp = mpp if paths else None
        elif mpp is not None and abs(folder_mpp - mpp) > MPP_TOLERANCE * mpp:
            raise ConfigError(f"--folder-mpp {folder_mpp} differs from the stores' {mpp:.3g} µm/px")
        else:
            mpp = folder_mpp
    if not samples or size is None:
        raise ConfigError("pretrain needs tiles: give --stores, --archive or --folder")
    return UnlabelledSet(samples, size, mpp, sources)


def slide_balanced_weights(samples: list[Sample]) -> np.ndarray:
    """Draw weights giving each group (slide) the same total share."""
    groups = [s.group for s in samples]
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]
