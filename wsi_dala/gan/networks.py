"""A compact class-conditional StyleGAN2 (Karras et al. 2020) for 32-256 px tiles.

Why our own: the official StyleGAN2-ADA (NVlabs) is not a package, builds CUDA extensions at import and
carries a non-commercial licence; the PyPI ports either drop class conditioning or bring a framework.
This keeps what matters at tile sizes and what the ResViT-GANNet paper relies on: a mapping network
from (z, class) to w; a synthesis network from a learned 4x4 constant with weight-modulated,
demodulated 3x3 convolutions, per-pixel noise and skip-connected RGB outputs; a residual
discriminator with a minibatch-deviation layer and projection conditioning on the class; equalised
learning rates throughout. Left out (named, so nobody expects them): FIR up/down-sampling filters
(bilinear / average pooling here), path-length regularisation and style mixing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

MIN_RESOLUTION, MAX_RESOLUTION = 32, 256


@dataclass(frozen=True)
class GanShape:
    """Everything that fixes the networks' tensors (recorded in the checkpoint's card)."""

    resolution: int = 64
    n_classes: int = 2
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4
    channel_base: int = 4096  # channels at resolution r: min(channel_max, channel_base // r)
    channel_max: int = 256

    def channels(self, resolution: int) -> int:
        return min(self.channel_max, self.channel_base // resolution)

    @property
    def resolutions(self) -> list[int]:
        return [2**i for i in range(3, int(math.log2(self.resolution)) + 1)]  # 8 .. resolution

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def check_resolution(resolution: int) -> None:
    if resolution < MIN_RESOLUTION or resolution > MAX_RESOLUTION or resolution & (resolution - 1):
        raise ValueError(f"GAN tiles must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION} px")


class EqualLinear(nn.Module):
    """A linear layer whose weights are scaled at run time (equalised learning rate)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_multiplier: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)


class EqualConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.gain, self.bias, padding=self.padding)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * math.sqrt(2)  # gain sqrt(2) keeps the activations' scale


class MappingNetwork(nn.Module):
    """(z, class) -> w: z and the class embedding, each normalised to unit second moment, then an MLP."""

    def __init__(self, shape: GanShape):
        super().__init__()
        self.embed = EqualLinear(shape.n_classes, shape.z_dim)
        layers: list[nn.Module] = []
        width = 2 * shape.z_dim
        for _ in range(shape.mapping_layers):
            layers.append(EqualLinear(width, shape.w_dim, lr_multiplier=0.01))
            width = shape.w_dim
        self.layers = nn.ModuleList(layers)
        self.n_classes = shape.n_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.embed(F.one_hot(labels, self.n_classes).float())
        x = torch.cat([_normalise_2nd_moment(z), _normalise_2nd_moment(c)], dim=1)
        for layer in self.layers:
            x = _act(layer(x))
        return x


def _normalise_2nd_moment(x: torch.Tensor) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


class ModulatedConv(nn.Module):
    """A 3x3 (or 1x1) convolution whose input channels are scaled per sample by a style from w, and whose
    output is demodulated to unit variance (StyleGAN2's replacement for AdaIN)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, demodulate: bool = True):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # StyleGAN2's unfused form: scale the input, one shared convolution, scale the output. The same
        # arithmetic as a per-sample weight (tested), without a grouped convolution, which is slow on CPUs.
        styles = self.affine(w)  # [N, in]
        weight = self.weight * self.gain
        x = F.conv2d(x * styles[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:
            sums = (weight.square().sum(dim=(2, 3))[None] * styles.square()[:, None, :]).sum(dim=2)  # [N, out]
            x = x * (sums + 1e-8).rsqrt()[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.conv = ModulatedConv(in_channels, out_channels, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: bool = True) -> torch.Tensor:
        x = self.conv(x, w)
        if noise:
            x = x + torch.randn(len(x), 1, self.resolution, self.resolution, device=x.device) * self.noise_strength
        return _act(x + self.bias[None, :, None, None])


class SynthesisBlock(nn.Module):
    """Upsample x2, then two modulated 3x3 layers."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.first = SynthesisLayer(in_channels, out_channels, w_dim, resolution)
        self.second = SynthesisLayer(out_channels, out_channels, w_dim, resolution)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: bool = True) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.second(self.first(x, w, noise), w, noise)


class ToRgb(nn.Module):
    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(in_channels, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class Generator(nn.Module):
    """(z, class) -> RGB tiles in [-1, 1] (roughly; not clamped: the loss sees what the network makes)."""

    def __init__(self, shape: GanShape):
        super().__init__()
        check_resolution(shape.resolution)
        self.shape = shape
        self.mapping = MappingNetwork(shape)
        self.const = nn.Parameter(torch.randn(shape.channels(4), 4, 4))
        self.first = SynthesisLayer(shape.channels(4), shape.channels(4), shape.w_dim, 4)
        self.first_rgb = ToRgb(shape.channels(4), shape.w_dim)
        self.blocks = nn.ModuleList()
        self.rgbs = nn.ModuleList()
        previous = shape.channels(4)
        for resolution in shape.resolutions:
            channels = shape.channels(resolution)
            self.blocks.append(SynthesisBlock(previous, channels, shape.w_dim, resolution))
            self.rgbs.append(ToRgb(channels, shape.w_dim))
            previous = channels

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, noise: bool = True, truncation: float = 1.0
    ) -> torch.Tensor:
        w = self.mapping(z, labels)
        if truncation != 1.0:  # toward the class's mean w: fewer odd tiles, less variety
            w_mean = self.mapping(torch.randn(256, z.shape[1], device=z.device), labels[:1].expand(256)).mean(0)
            w = w_mean + truncation * (w - w_mean)
        x = self.first(self.const[None].expand(len(z), -1, -1, -1), w, noise)
        rgb = self.first_rgb(x, w)
        for block, to_rgb in zip(self.blocks, self.rgbs, strict=True):
            x = block(x, w, noise)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + to_rgb(x, w)
        return rgb


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_a = EqualConv2d(in_channels, in_channels, 3)
        self.conv_b = EqualConv2d(in_channels, out_channels, 3)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(F.avg_pool2d(x, 2))
        x = F.avg_pool2d(_act(self.conv_b(_act(self.conv_a(x)))), 2)
        return (x + skip) / math.sqrt(2)


class Discriminator(nn.Module):
    """Tiles and classes -> realness logits; the class enters by projection (the score's dot product with a
    learned class embedding), as in StyleGAN2-ADA's conditional discriminator."""

    def __init__(self, shape: GanShape):
        super().__init__()
        check_resolution(shape.resolution)
        self.from_rgb = EqualConv2d(3, shape.channels(shape.resolution), 1)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(shape.channels(r), shape.channels(r // 2)) for r in reversed(shape.resolutions)
        )
        width = shape.channels(4)
        self.conv = EqualConv2d(width + 1, width, 3)
        self.fc = EqualLinear(width * 16, width)
        self.out = EqualLinear(width, shape.w_dim)
        self.class_embed = EqualLinear(shape.n_classes, shape.w_dim)
        self.n_classes, self.w_dim = shape.n_classes, shape.w_dim

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = _act(self.from_rgb(images))
        for block in self.blocks:
            x = block(x)
        x = _act(self.conv(_minibatch_std(x)))
        h = self.out(_act(self.fc(x.flatten(1))))
        c = _normalise_2nd_moment(self.class_embed(F.one_hot(labels, self.n_classes).float()))
        return (h * c).sum(dim=1) / math.sqrt(self.w_dim)


def _minibatch_std(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """One extra channel: the standard deviation across a group of samples (a collapsed generator shows)."""
    n, c, h, w = x.shape
    g = min(group, n)
    while n % g:
        g -= 1
    y = x.reshape(g, -1, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # [N/g]
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def generate(
    generator: Generator, class_index: int, n: int, seed: int, device: torch.device, truncation: float = 1.0
) -> torch.Tensor:
    """``n`` uint8 tiles [n, 3, H, W] of one class, reproducible from ``seed`` (latents and per-pixel noise
    alike); the caller's random state is left as it was (a checkpoint's sample grid must not change the
    training that follows)."""
    out = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, n, 32):
            count = min(32, n - start)
            z = torch.randn(count, generator.shape.z_dim).to(device)
            labels = torch.full((count,), class_index, dtype=torch.long, device=device)
            with torch.no_grad():
                out.append(to_uint8(generator(z, labels, truncation=truncation)).cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, generator.shape.resolution, generator.shape.resolution)
