"""Training data sources, each turned into the same list of samples.

(a) BreakHis (``BreaKHis_v1/.../{benign|malignant}/SOB/<subtype>/<patient>/<mag>X/<file>.png``),
(b) an image-folder tree of tiles (one class per sub-folder, a group key per file), and
(c) slides annotated in QuPath: tiles cut by the tiler, labelled by the annotation class covering them
    (see :mod:`wsi_dala.training.slide_tiles`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import LESION_MASKS_ARRAY
from wsi_dala.tiling.store import TileStore
from wsi_dala.training.splits import group_from_name

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
BREAKHIS_CLASSES = ["benign", "malignant"]
BREAKHIS_MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
# µm/px of BreakHis images: an ASSUMPTION recalled from the dataset paper's acquisition setup (camera
# pixel ≈ 6.5 µm behind a 3.3x relay lens, 4x/10x/20x/40x objectives), not verified here. Override
# with --mpp when you know better.
BREAKHIS_MPP = {"40X": 0.49, "100X": 0.20, "200X": 0.098, "400X": 0.049}
BREAKHIS_MPP_NOTE = (
    "assumed from the BreakHis paper's acquisition setup (6.5 µm camera pixel, 3.3x relay, 4x/10x/20x/40x "
    "objectives); not verified"
)


@dataclass(frozen=True)
class Sample:
    """One training image: a file, or tile ``index`` of a tile store."""

    source: str
    label: int
    group: str  # patient or slide: never on both sides of a split
    magnification: str | None = None
    index: int = -1  # >= 0: a tile of the Zarr store at ``source``
    mask: str = ""  # `train --mask-guided`: the lesion-mask store of ``source`` (row ``index``); "" for none


def breakhis_samples(root: str | Path, magnification: str | None = None) -> list[Sample]:
    """Parse a BreakHis tree; the patient is ``SOB_<B|M>_<type>-<yy>-<slide>`` from the file name."""
    root = Path(root)
    if magnification is not None and magnification not in BREAKHIS_MAGNIFICATIONS:
        raise ConfigError(f"BreakHis magnification must be one of {BREAKHIS_MAGNIFICATIONS}, got {magnification!r}")
    samples = []
    for path in sorted(root.rglob("SOB_*.png")):
        parts = path.stem.split("-")
        if len(parts) != 5 or not parts[0].startswith(("SOB_B_", "SOB_M_")):
            log.warning("%s: not a BreakHis file name, skipped", path)
            continue
        mag = f"{parts[3]}X"
        if magnification is not None and mag != magnification:
            continue
        label = 1 if parts[0].startswith("SOB_M_") else 0
        folder_class = next((p for p in path.parts if p in BREAKHIS_CLASSES), None)
        if folder_class is not None and BREAKHIS_CLASSES.index(folder_class) != label:
            raise ConfigError(f"{path}: file name says {BREAKHIS_CLASSES[label]} but the folder says {folder_class}")
        samples.append(Sample(str(path), label, "-".join(parts[:3]), mag))
    if not samples:
        raise ConfigError(
            f"{root}: no BreakHis images (SOB_*.png) found" + (f" at {magnification}" if magnification else "")
        )
    return samples


def image_folder_samples(root: str | Path, group_pattern: str = r"^(.+?)_") -> tuple[list[Sample], list[str]]:
    """``root/<class>/[<group>/]<image>``: the group is the sub-folder if there is one, else the part of
    the file name matched by ``group_pattern`` (default: up to the first underscore, e.g. ``slide7_x_y.png``)."""
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(class_dirs) < 2:
        raise ConfigError(f"{root}: expected one sub-folder per class (at least 2)")
    class_names = [p.name for p in class_dirs]
    samples = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            relative = path.relative_to(class_dir)
            group = relative.parts[0] if len(relative.parts) > 1 else group_from_name(path, group_pattern)
            samples.append(Sample(str(path), label, group))
    if not samples:
        raise ConfigError(f"{root}: no images found under the class folders {class_names}")
    return samples, class_names


def class_counts(samples: list[Sample], n_classes: int) -> list[int]:
    return np.bincount([s.label for s in samples], minlength=n_classes).tolist()


def train_transform(size: int) -> v2.Compose:
    """Histology has no orientation: flips and 90° turns; light colour jitter; crops at native scale."""
    return v2.Compose(
        [
            v2.RandomCrop(size, pad_if_needed=True, fill=255),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            _RandomRot90(),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05, hue=0.02),
        ]
    )


def eval_transform(size: int) -> v2.Compose:
    return v2.Compose([v2.CenterCrop(size)])


class _RandomRot90(torch.nn.Module):
    """The same quarter turn for an image and, when given, its mask (kept a ``Mask``: colour jitter skips it)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        turns = int(torch.randint(0, 4, (1,)))
        items = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], tuple) else inputs
        turned = tuple(_rotated(item, turns) for item in items)
        return turned[0] if len(turned) == 1 else turned


def _rotated(item: torch.Tensor, turns: int) -> torch.Tensor:
    out = torch.rot90(item, turns, dims=(-2, -1))
    return tv_tensors.wrap(out, like=item) if isinstance(item, tv_tensors.TVTensor) else out


class SampleDataset(Dataset):
    """Images as uint8 [3, H, W] tensors (normalisation happens per batch, on the device)."""

    def __init__(self, samples: list[Sample], transform: v2.Compose | None = None, with_masks: bool = False):
        self.samples = samples
        self.transform = transform
        self.with_masks = with_masks  # items are (image, label, lesion mask float [1, H, W]) then
        self._stores: dict[str, TileStore] = {}
        self._masks: dict[str, zarr.Array] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, sample: Sample) -> np.ndarray:
        if sample.index >= 0:
            store = self._stores.get(sample.source)
            if store is None:
                store = self._stores[sample.source] = TileStore(sample.source)
            return store.tiles(sample.index)
        try:
            with Image.open(sample.source) as image:
                return np.array(image.convert("RGB"))
        except OSError as exc:
            raise ConfigError(f"{sample.source}: cannot read image ({exc})") from exc

    def lesion_mask(self, sample: Sample, shape: tuple[int, int]) -> np.ndarray:
        """The tile's lesion mask (all False for a sample without one)."""
        if not sample.mask:
            return np.zeros(shape, dtype=bool)
        array = self._masks.get(sample.mask)
        if array is None:
            node = zarr.open_group(sample.mask, mode="r", zarr_format=3)[LESION_MASKS_ARRAY]
            assert isinstance(node, zarr.Array), f"{sample.mask}: masks is not an array"
            array = self._masks[sample.mask] = node
        return np.asarray(array[sample.index], dtype=bool)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        sample = self.samples[i]
        pixels = np.ascontiguousarray(self.load(sample))
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        if not self.with_masks:
            return (self.transform(image) if self.transform is not None else image), sample.label
        mask = tv_tensors.Mask(torch.from_numpy(self.lesion_mask(sample, pixels.shape[:2]))[None])
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, sample.label, mask.as_subclass(torch.Tensor).float()
