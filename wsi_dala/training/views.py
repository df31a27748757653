"""Histology views for contrastive pre-training: two differently augmented copies of each tile.

What a view may change is what should not change a tile's meaning: where in the tile one looks, its
orientation (flips and 90° turns: H&E has no up), the amount of each stain (jitter in HED space, after
Tellez et al. 2018, "H&E-light"), focus (Gaussian blur) and light (brightness, contrast). What it must
not change is the scale: a crop is taken at the tile's own µm/px and never resized, so the encoder
learns features at the magnification it will classify at (crops of ``crop_fraction`` of the side).

Written on batches in torch, not per image with scikit-image: ``rgb2hed``/``hed2rgb`` are the same
matrix products (their matrices are used, and the tests hold the two equal), and a batch of 256 tiles
takes one call instead of 256. Every random draw comes from the caller's ``torch.Generator``, so a
resumed pre-training run draws the same views as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as tvf

_LOG_ADJUST = float(np.log(1e-6))  # scikit-image's optical-density scale
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)


@dataclass(frozen=True)
class ViewSettings:
    """How far each augmentation may go (defaults: moderate, for H&E)."""

    crop_fraction: float = 0.75  # crop side / tile side, at the tile's µm/px (no resizing)
    hed_scale: float = 0.05  # each stain's amount multiplied by U(1 - s, 1 + s) ...
    hed_shift: float = 0.05  # ... and shifted by U(-b, b) (optical density)
    blur_probability: float = 0.5
    blur_sigma_px: tuple[float, float] = (0.1, 1.5)
    brightness: float = 0.2  # multiplied by U(1 - b, 1 + b)
    contrast: float = 0.2  # deviation from each image's mean scaled by U(1 - c, 1 + c)

    def crop_px(self, tile_px: int) -> int:
        return max(8, round(self.crop_fraction * tile_px))


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``rgb2hed`` on float RGB in [0, 1], channels first [N, 3, H, W]."""
    optical_density = torch.log(rgb.clamp(min=1e-6)) / _LOG_ADJUST
    stains = torch.einsum("nchw,cd->ndhw", optical_density, _HED_FROM_RGB.to(rgb.device))
    return stains.clamp(min=0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``hed2rgb``: stains [N, 3, H, W] back to RGB in [0, 1]."""
    log_rgb = torch.einsum("nchw,cd->ndhw", -(hed * -_LOG_ADJUST), _RGB_FROM_HED.to(hed.device))
    return torch.exp(log_rgb).clamp(0, 1)


def hed_jitter(rgb: torch.Tensor, scale: float, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Each image's haematoxylin, eosin and DAB amounts scaled and shifted by its own random draw."""
    n = len(rgb)
    alpha = 1 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * scale
    beta = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * shift
    return hed_to_rgb(rgb_to_hed(rgb) * alpha.to(rgb.device) + beta.to(rgb.device))


def random_crops(images: torch.Tensor, side_px: int, generator: torch.Generator) -> torch.Tensor:
    """A ``side_px`` square from each image at its own random place (no resizing)."""
    n, _, height, width = images.shape
    tops = torch.randint(0, height - side_px + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, width - side_px + 1, (n,), generator=generator).tolist()
    return torch.stack(
        [img[:, t : t + side_px, w : w + side_px] for img, t, w in zip(images, tops, lefts, strict=True)]
    )


def random_dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image turned by a random multiple of 90° and mirrored or not (the 8 elements of D4)."""
    turns = torch.randint(0, 4, (len(images),), generator=generator).tolist()
    mirrors = torch.randint(0, 2, (len(images),), generator=generator).tolist()
    out = []
    for image, turn, mirror in zip(images, turns, mirrors, strict=True):
        image = torch.rot90(image, turn, dims=(1, 2))
        out.append(torch.flip(image, dims=(2,)) if mirror else image)
    return torch.stack(out)


def random_blur(images: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur of random strength on a random share of the images (out-of-focus scanning)."""
    chosen = (torch.rand(len(images), generator=generator) < settings.blur_probability).tolist()
    low, high = settings.blur_sigma_px
    sigmas = (low + torch.rand(len(images), generator=generator) * (high - low)).tolist()
    out = []
    for image, blur, sigma in zip(images, chosen, sigmas, strict=True):
        if blur:
            kernel = 2 * int(np.ceil(3 * sigma)) + 1
            image = tvf.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        out.append(image)
    return torch.stack(out)


def random_light(images: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> torch.Tensor:
    """Brightness and contrast, each image its own factors."""
    n = len(images)
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * settings.brightness
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * settings.contrast
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * contrast.to(images.device) + mean) * brightness.to(images.device)


def histology_view(tiles: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> torch.Tensor:
    """One view of each uint8 tile [N, 3, H, W]: float RGB in [0, 1], ``settings.crop_px`` square."""
    images = random_crops(tiles, settings.crop_px(tiles.shape[-1]), generator).float() / 255.0
    images = random_dihedral(images, generator)
    images = hed_jitter(images, settings.hed_scale, settings.hed_shift, generator)
    images = random_blur(images, settings, generator)
    return random_light(images, settings, generator).clamp(0, 1)
