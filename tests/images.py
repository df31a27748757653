"""Small generated image datasets for model tests: tumour = a dark purple blob on pink tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PINK = (232, 168, 204)
PURPLE = (70, 35, 110)


def blob_image(size: int, with_blob: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image and the boolean mask of its blob (empty without one)."""
    image = np.full((size, size, 3), PINK, np.float32) + rng.normal(0, 8, (size, size, 3))
    blob = np.zeros((size, size), dtype=bool)
    if with_blob:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        yy, xx = np.mgrid[:size, :size]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
        image[blob] = PURPLE
    return np.clip(image, 0, 255).astype(np.uint8), blob


def write_blob_folder(root: Path, size: int, n: int, groups: int = 6, seed: int = 0) -> Path:
    """``root/{normal,tumour}/slide<g>_<i>.png``; each group holds one class only, like a patient."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        tumour = i % 2 == 1
        image, _ = blob_image(size, tumour, rng)
        folder = root / ("tumour" if tumour else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"slide{i % groups}_{i}.png")
    return root


BREAKHIS_PATIENTS = [
    ("benign", "adenosis", "A", "14-22549AB"),
    ("benign", "fibroadenoma", "F", "14-9133"),
    ("benign", "tubular_adenoma", "TA", "14-3411F"),
    ("malignant", "ductal_carcinoma", "DC", "14-2523"),
    ("malignant", "lobular_carcinoma", "LC", "14-12204"),
    ("malignant", "mucinous_carcinoma", "MC", "14-13418DE"),
]


def write_breakhis_tree(
    root: Path, per_magnification: int = 4, size: tuple[int, int] = (70, 46), seed: int = 0
) -> Path:
    """A mini BreakHis tree with the real naming scheme; images scaled down 10x from 700 x 460."""
    rng = np.random.default_rng(seed)
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for label, subtype, code, patient_id in BREAKHIS_PATIENTS:
        letter = "B" if label == "benign" else "M"
        patient_folder = f"SOB_{letter}_{code}_{patient_id}"
        for mag in (40, 100, 200, 400):
            folder = base / label / "SOB" / subtype / patient_folder / f"{mag}X"
            folder.mkdir(parents=True, exist_ok=True)
            for seq in range(1, per_magnification + 1):
                image, _ = blob_image(max(size), label == "malignant", rng)
                image = image[: size[1], : size[0]]
                name = f"SOB_{letter}_{code}-{patient_id}-{mag}-{seq:03d}.png"
                Image.fromarray(image).save(folder / name)
    return root / "BreaKHis_v1"
