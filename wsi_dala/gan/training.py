"""`wsi-dala gan train`: the class-conditional StyleGAN2 of :mod:`wsi_dala.gan.networks` trained with ADA
(:mod:`wsi_dala.gan.ada`) on labelled tiles.

Losses are StyleGAN2's: non-saturating logistic for both networks, lazy R1 on real tiles every
``r1_interval`` steps. The generator that samples is an exponential moving average of the trained one
(its half-life ramped up with the images seen, as StyleGAN2-ADA's).
Each step's batch is drawn from a generator seeded by (seed, step) and the global random state is
saved with every checkpoint, so an interrupted run resumed from its last checkpoint draws exactly
what an uninterrupted one would (tested). Everything in fp32: GAN training is the wrong place to save
memory with bf16 on a CPU.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import nn
from tqdm import tqdm

from wsi_dala import __version__
from wsi_dala.core.config import GanConfig
from wsi_dala.core.fileio import atomic_open, ensure_writable_dir
from wsi_dala.core.layout import GanLayout
from wsi_dala.gan.ada import AdaptiveAugment
from wsi_dala.gan.figures import plot_gan_curves, sample_grid
from wsi_dala.gan.networks import Discriminator, GanShape, Generator, generate
from wsi_dala.gan.quality import Features, batched, kid
from wsi_dala.model.devices import pick_device
from wsi_dala.model.weights import GAN_CARD_KEY
from wsi_dala.training.datasets import Sample, SampleDataset
from wsi_dala.training.losses import gan_discriminator_loss, gan_generator_loss, r1_penalty

log = logging.getLogger(__name__)

GAN_KIND = "class-conditional StyleGAN2 with adaptive discriminator augmentation (wsi-dala)"


@dataclass
class GanData:
    """Tiles to learn from and, for KID, held-out real tiles of the same classes."""

    train: list[Sample]
    held_out: list[Sample]
    class_names: list[str]
    trained_classes: list[str]
    mpp: float | None
    source: str


@dataclass
class GanResult:
    checkpoint: Path
    steps: int
    kid: list[tuple[int, float, float]] = field(default_factory=list)  # (step, KID, its SD over subsets), first on
    images_per_s: float = 0.0  # generated images per second of training, this invocation


class TileBatches:
    """uint8 tiles of the training set as [-1, 1] float batches; the indices of step s come from (seed, s)."""

    def __init__(self, samples: list[Sample], resolution: int, seed: int) -> None:
        self.samples, self.resolution, self.seed = samples, resolution, seed
        self.dataset = SampleDataset(samples)

    def tiles(self, indices: list[int], generator: torch.Generator | None = None) -> torch.Tensor:
        images = []
        for i in indices:
            image = self.dataset[i][0]
            _, height, width = image.shape
            if height < self.resolution or width < self.resolution:
                raise ValueError(f"{self.samples[i].source}: {width}x{height} px, smaller than {self.resolution} px")
            top = int(torch.randint(0, height - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - self.resolution + 1, (1,), generator=generator))
            images.append(image[:, top : top + self.resolution, left : left + self.resolution])
        return torch.stack(images)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        indices = torch.randint(0, len(self.samples), (size,), generator=generator).tolist()
        tiles = self.tiles(indices, generator)
        labels = torch.tensor([self.samples[i].label for i in indices])
        return tiles.float() / 127.5 - 1, labels


def gan_shape(config: GanConfig, n_classes: int) -> GanShape:
    return GanShape(
        resolution=config.resolution,
        n_classes=n_classes,
        z_dim=config.z_dim,
        w_dim=config.z_dim,
        channel_max=config.channel_max,
    )


def train_gan(
    config: GanConfig,
    data: GanData,
    out_dir: str | Path,
    kid_features: tuple[Features, str] | None = None,
    progress: bool = True,
) -> GanResult:
    """Train (or resume) and write the checkpoint, the loss table and curves, sample grids and KID."""
    layout = GanLayout(ensure_writable_dir(out_dir))
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    shape = gan_shape(config, len(data.class_names))
    generator, discriminator = Generator(shape).to(device), Discriminator(shape).to(device)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    optimise_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.0, 0.99), eps=1e-8)
    optimise_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(0.0, 0.99), eps=1e-8)
    ada = AdaptiveAugment(target=config.ada_target, speed_images=config.ada_speed_images)
    batches = TileBatches(data.train, config.resolution, config.seed)
    networks = {"G": generator, "G_ema": generator_ema, "D": discriminator}
    start, rows, kids = _resume(layout, config, networks, optimise_g, optimise_d, ada, device)
    real_features = _held_out_features(kid_features, data, batches) if kid_features is not None else None
    started, made = time.perf_counter(), 0
    for step in tqdm(range(start, config.steps), desc="GAN", initial=start, total=config.steps, disable=not progress):
        reals, labels = batches.batch(step, config.batch_size)
        reals, labels = reals.to(device), labels.to(device)
        row = _discriminator_step(config, step, generator, discriminator, ada, optimise_d, reals, labels)
        row["loss_g"] = _generator_step(config, generator, discriminator, ada, optimise_g, labels)
        _update_ema(generator_ema, generator, ema_beta(config, step))
        made += 2 * config.batch_size
        rows.append({"step": step + 1, **row, "ada_p": ada.p})
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            if real_features is not None and (
                done == config.steps or (config.kid_every and done % config.kid_every == 0)
            ):
                kids.append((done, *_kid(kid_features, real_features, generator_ema, data, config, device)))
                log.info("step %d: KID %.4f ± %.4f", done, kids[-1][1], kids[-1][2])
            _checkpoint(
                layout, config, data, shape, networks, optimise_g, optimise_d, ada, done, rows, kids, kid_features
            )
    seconds = time.perf_counter() - started
    return GanResult(layout.checkpoint, config.steps, kids, made / seconds if seconds > 0 and made else 0.0)


def _discriminator_step(
    config: GanConfig,
    step: int,
    generator: Generator,
    discriminator: Discriminator,
    ada: AdaptiveAugment,
    optimiser: torch.optim.Optimizer,
    reals: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, float]:
    with torch.no_grad():
        fakes = generator(torch.randn(len(reals), config.z_dim, device=reals.device), labels)
    real_logits = discriminator(ada(reals), labels)
    fake_logits = discriminator(ada(fakes), labels)
    loss = gan_discriminator_loss(real_logits, fake_logits)
    r1 = torch.zeros(())
    if config.r1_gamma > 0 and step % config.r1_interval == 0:
        r1 = r1_penalty(lambda images: discriminator(ada(images), labels), reals)
        loss = loss + r1 * (config.r1_gamma / 2) * config.r1_interval
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    ada.observe(real_logits)
    return {"loss_d": float(loss.detach()), "r1": float(r1.detach()), "r_t_real_sign": float(real_logits.sign().mean())}


def _generator_step(
    config: GanConfig,
    generator: Generator,
    discriminator: Discriminator,
    ada: AdaptiveAugment,
    optimiser: torch.optim.Optimizer,
    labels: torch.Tensor,
) -> float:
    fakes = generator(torch.randn(len(labels), config.z_dim, device=labels.device), labels)
    loss = gan_generator_loss(discriminator(ada(fakes), labels))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def ema_beta(config: GanConfig, step: int) -> float:
    """The EMA's decay at ``step``: a half-life of ``ema_half_life_images``, ramped up as StyleGAN2-ADA does
    (at most ``ema_rampup`` x the images seen), so that a short run samples what it learnt and not
    mostly its random initial weights (10,000 images of half-life is 85 % of the start after 2,400)."""
    half_life = float(config.ema_half_life_images)
    if config.ema_rampup > 0:
        half_life = min(half_life, step * config.batch_size * config.ema_rampup)
    return 0.5 ** (config.batch_size / half_life) if half_life > 0 else 0.0


@torch.no_grad()
def _update_ema(ema: nn.Module, live: nn.Module, beta: float) -> None:
    for target, source in zip(ema.parameters(), live.parameters(), strict=True):
        target.lerp_(source, 1 - beta)
    for kept, current in zip(ema.buffers(), live.buffers(), strict=True):
        kept.copy_(current)


def _held_out_features(kid_features: tuple[Features, str], data: GanData, batches: TileBatches) -> torch.Tensor:
    if not data.held_out:
        raise ValueError("KID needs held-out real tiles")
    held = TileBatches(data.held_out, batches.resolution, batches.seed)
    tiles = held.tiles(list(range(len(data.held_out))), torch.Generator().manual_seed(0))
    return batched(kid_features[0], tiles)


def _kid(
    kid_features: tuple[Features, str] | None,
    real: torch.Tensor,
    generator: Generator,
    data: GanData,
    config: GanConfig,
    device: torch.device,
) -> tuple[float, float]:
    """KID and its SD over torch-fidelity's subsets: with a few dozen real tiles the SD can exceed the
    KID itself (and the unbiased estimate can go below zero), so a curve needs its error bars."""
    assert kid_features is not None
    counts = np.bincount([s.label for s in data.held_out], minlength=len(data.class_names))
    share = counts / counts.sum()  # generated classes in the held-out tiles' proportions
    tiles = []
    for index, fraction in enumerate(share):
        n = round(fraction * config.kid_samples)
        if n:
            tiles.append(generate(generator, index, n, seed=10_000 + index, device=device))
    return kid(real, batched(kid_features[0], torch.cat(tiles)))


def gan_card(config: GanConfig, data: GanData, shape: GanShape, step: int, ada: AdaptiveAugment) -> dict[str, Any]:
    return {
        "kind": GAN_KIND,
        "shape": shape.to_dict(),
        "class_names": data.class_names,
        "trained_classes": data.trained_classes,
        "tile_size_px": config.resolution,
        "mpp": data.mpp,
        "data": {"source": data.source, "tiles": len(data.train), "held_out_tiles": len(data.held_out)},
        "steps": step,
        "images_seen": step * config.batch_size,
        "ada_p": round(ada.p, 4),
        "settings": config.model_dump(exclude={"device"}),
        "software": {"wsi_dala": __version__, "torch": torch.__version__},
    }


def _checkpoint(
    layout: GanLayout,
    config: GanConfig,
    data: GanData,
    shape: GanShape,
    networks: dict[str, nn.Module],
    optimise_g: torch.optim.Optimizer,
    optimise_d: torch.optim.Optimizer,
    ada: AdaptiveAugment,
    step: int,
    rows: list[dict[str, float]],
    kids: list[tuple[int, float, float]],
    kid_features: tuple[Features, str] | None,
) -> None:
    """Losses, KID, curves, samples, weights, then the resume state last (what a resume trusts)."""
    _write_rows(layout.losses_csv, rows)
    with atomic_open(layout.kid_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "kid", "kid_sd"])
        writer.writerows(kids)
    plot_gan_curves(layout.curves_png, rows, kids, kid_features[1] if kid_features else "")
    generator_ema = networks["G_ema"]
    assert isinstance(generator_ema, Generator)
    sample_grid(layout.samples_png, generator_ema, data.class_names, data.trained_classes, config.seed)
    card = gan_card(config, data, shape, step, ada)
    if kids:
        card["kid"] = {
            "last": round(kids[-1][1], 5),
            "last_sd": None if math.isnan(kids[-1][2]) else round(kids[-1][2], 5),  # NaN: resumed from before SDs
            "features": kid_features[1] if kid_features else None,
        }
    state = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name, net in networks.items()
        for k, v in net.state_dict().items()
    }
    with atomic_open(layout.checkpoint, "wb") as handle:
        handle.write(save(state, metadata={GAN_CARD_KEY: json.dumps(card)}))
    saved = {
        "step": step,
        "optimise_g": optimise_g.state_dict(),
        "optimise_d": optimise_d.state_dict(),
        "ada_p": ada.p,
        "ada_signs": torch.tensor(ada.pending_signs, dtype=torch.float64),
        "rng": torch.get_rng_state(),
        "kids": torch.tensor(kids, dtype=torch.float64).reshape(-1, 3),
        "settings_json": _resume_settings(config),
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    with atomic_open(layout.last_state, "wb") as handle:
        handle.write(buffer.getvalue())


def _resume_settings(config: GanConfig) -> str:
    """What a resumed run must share with the one it continues (not how long it runs or how it reports)."""
    return json.dumps(config.model_dump(exclude={"steps", "device", "checkpoint_every", "kid_every"}), sort_keys=True)


def _resume(
    layout: GanLayout,
    config: GanConfig,
    networks: dict[str, nn.Module],
    optimise_g: torch.optim.Optimizer,
    optimise_d: torch.optim.Optimizer,
    ada: AdaptiveAugment,
    device: torch.device,
) -> tuple[int, list[dict[str, float]], list[tuple[int, float, float]]]:
    if not (layout.last_state.exists() and layout.checkpoint.exists()):
        return 0, [], []
    from safetensors.torch import load_file

    saved = torch.load(layout.last_state, map_location="cpu", weights_only=True)
    if saved.get("settings_json") != _resume_settings(config):
        log.info("%s belongs to a GAN run with other settings; starting afresh", layout.last_state)
        return 0, [], []
    weights = load_file(str(layout.checkpoint), device=str(device))
    for name, net in networks.items():
        net.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(f"{name}.")})
    optimise_g.load_state_dict(saved["optimise_g"])
    optimise_d.load_state_dict(saved["optimise_d"])
    ada.p = float(saved["ada_p"])
    ada.pending_signs = [float(v) for v in saved["ada_signs"].tolist()]
    torch.set_rng_state(saved["rng"])
    step = int(saved["step"])
    rows = [row for row in _read_rows(layout.losses_csv) if row["step"] <= step]
    kids = [(int(row[0]), float(row[1]), float(row[2]) if len(row) > 2 else math.nan) for row in saved["kids"].tolist()]
    log.info("resuming GAN training at step %d", step)
    return step, rows, kids


def _write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["step"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def _read_rows(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(handle)]
