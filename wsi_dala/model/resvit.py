"""ResViT-GANNet: a ResNet50 branch with channel attention and a ViT branch with multi-layer token fusion,
fused by Token-Aligned Multimodal Attention (TAMA) into one classifier (``shared/model-spec.md``).

What the paper fixes: the two branches, squeeze-and-excitation on the CNN, multi-layer token fusion in
the ViT, TAMA (multi-head attention with token-wise alignment), a fully connected classifier. What it
leaves open, chosen here (every choice an option recorded in the model card):

- the ViT: torchvision's ViT-B/16 (``vit="vit_b_16"``), or any timm ViT (``vit="timm:NAME"``, with
  ``vit_options`` for its keyword arguments: a small one for CPU-sized runs);
- multi-layer token fusion: a learned softmax weighting of the patch tokens of the last ``fused_blocks``
  blocks (each through the ViT's final norm);
- alignment: the fused ViT patch grid is adaptively average-pooled onto the CNN's grid (14 x 14 -> 7 x 7
  at 224 px), so CNN and ViT tokens correspond one to one; the CNN's 2048 channels are projected to the
  ViT width and both sides get learned position embeddings;
- TAMA: cross-attention both ways (ViT queries attend to CNN keys/values, and the reverse), each with a
  residual connection and LayerNorm; the two sides are mean-pooled, concatenated and classified by one
  linear layer (after dropout).

Split for DT Grad-CAM: ``forward_features`` is the SE-attended CNN map with the aligned ViT tokens stacked
behind it as extra channels ([N, 2048 + D, g, g]); ``forward_head`` is the whole fusion and classifier.
The CAM is taken over the CNN channels only (``cam_channels``), with gradients through TAMA and the head.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from wsi_dala.core.errors import CheckpointError
from wsi_dala.core.extras import require
from wsi_dala.model.attention import SEAttention
from wsi_dala.model.registry import TIMM_PREFIX
from wsi_dala.model.weights import torchvision_imagenet_state

log = logging.getLogger(__name__)

CNN_CHANNELS = 2048
CAM_LAYERS = ("tama", "cnn")


@dataclass(frozen=True)
class ResVitOptions:
    vit: str = "vit_b_16"  # torchvision ViT-B/16, or timm:NAME
    vit_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a timm ViT
    fused_blocks: int = 4  # multi-layer token fusion over the last k blocks
    heads: int = 8  # TAMA attention heads (must divide the ViT width)
    dropout: float = 0.1  # before the classifier
    cam_layer: str = "tama"  # DT Grad-CAM target: TAMA-attended CNN tokens, or the SE-attended CNN map ("cnn")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resnet_grid(side_px: int) -> int:
    """Side of ResNet50's last feature map for a square input (7 at 224 px): five stride-2 stages."""
    for _ in range(5):
        side_px = (side_px - 1) // 2 + 1
    return side_px


class _VitTokens(nn.Module):
    """The patch tokens of a ViT's last ``k`` blocks, each through its final norm: [k, N, T, D]."""

    def __init__(self, source: str, options: dict[str, Any], input_size: int, k: int):
        super().__init__()
        self.kind = "timm" if source.startswith(TIMM_PREFIX) else "torchvision"
        if self.kind == "timm":
            timm = require("timm", f"ResViT-GANNet with vit={source}")
            name = source[len(TIMM_PREFIX) :]
            if not timm.is_model(name):
                raise CheckpointError(f"--vit {source}: timm has no model {name!r}")
            vit: Any = timm.create_model(name, pretrained=False, num_classes=0, img_size=input_size, **options)
            patch = vit.patch_embed.patch_size
            self.patch = int(patch[0] if isinstance(patch, tuple) else patch)
            self.prefix, self.width, depth = int(vit.num_prefix_tokens), int(vit.num_features), len(vit.blocks)
        elif source == "vit_b_16":
            if options:
                raise CheckpointError("--vit vit_b_16 takes no ViT options (they are for timm:NAME)")
            if input_size % 16:
                raise CheckpointError(f"--vit vit_b_16: its 16-px patches do not divide the tile size {input_size}")
            vit = tvm.vit_b_16(weights=None, image_size=input_size)
            self.patch, self.prefix, self.width = 16, 1, int(vit.hidden_dim)
            depth = len(vit.encoder.layers)
        else:
            raise CheckpointError(f"--vit must be vit_b_16 or timm:NAME, not {source!r}")
        if input_size % self.patch:
            raise CheckpointError(
                f"--vit {source}: its {self.patch}-px patches do not divide the tile size {input_size}; "
                f"use --input-size a multiple of {self.patch}"
            )
        self.vit: nn.Module = vit
        if not 1 <= k <= depth:
            raise CheckpointError(f"--fused-blocks {k}: the ViT has {depth} blocks")
        self.k, self.grid = k, input_size // self.patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        if self.kind == "timm":
            vit: Any = self.vit
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
            for block in vit.blocks:
                x = block(x)
                outputs.append(x)
            norm = vit.norm
        else:
            tv: Any = self.vit
            x = tv._process_input(x)
            x = torch.cat([tv.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = tv.encoder.dropout(x + tv.encoder.pos_embedding)
            for layer in tv.encoder.layers:
                x = layer(x)
                outputs.append(x)
            norm = tv.encoder.ln
        return torch.stack([norm(tokens)[:, self.prefix :] for tokens in outputs[-self.k :]])


class _TamaHead(nn.Module):
    """Token-aligned multimodal attention and the classifier, from the stacked [N, 2048 + D, g, g] map."""

    def __init__(self, width: int, grid: int, heads: int, dropout: float, num_classes: int):
        super().__init__()
        if width % heads:
            raise CheckpointError(f"--tama-heads {heads} does not divide the ViT width {width}")
        self.project = nn.Linear(CNN_CHANNELS, width)
        self.cnn_position = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.vit_position = nn.Parameter(torch.zeros(1, grid * grid, width))
        nn.init.trunc_normal_(self.cnn_position, std=0.02)
        nn.init.trunc_normal_(self.vit_position, std=0.02)
        self.vit_to_cnn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cnn_to_vit = nn.MultiheadAttention(width, heads, batch_first=True)
        self.vit_norm = nn.LayerNorm(width)
        self.cnn_norm = nn.LayerNorm(width)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def fuse(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The TAMA-attended CNN and ViT tokens [N, g*g, D] from the stacked [N, 2048 + D, g, g] map."""
        cnn = self.project(features[:, :CNN_CHANNELS].flatten(2).transpose(1, 2)) + self.cnn_position
        vit = features[:, CNN_CHANNELS:].flatten(2).transpose(1, 2) + self.vit_position
        attended_vit = self.vit_norm(vit + self.vit_to_cnn(vit, cnn, cnn, need_weights=False)[0])
        attended_cnn = self.cnn_norm(cnn + self.cnn_to_vit(cnn, vit, vit, need_weights=False)[0])
        return attended_cnn, attended_vit

    def classify(self, attended_cnn: torch.Tensor, attended_vit: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([attended_vit.mean(dim=1), attended_cnn.mean(dim=1)], dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(*self.fuse(features))


class ResVitGanNet(nn.Module):
    spatial_features = True

    def __init__(self, num_classes: int, options: ResVitOptions, input_size: int = 224):
        super().__init__()
        if options.cam_layer not in CAM_LAYERS:
            raise CheckpointError(f"--cam-layer must be one of {', '.join(CAM_LAYERS)}, not {options.cam_layer!r}")
        self.cam_layer = options.cam_layer
        resnet = tvm.resnet50(weights=None)
        self.cnn = nn.Sequential(*list(resnet.children())[:-2])
        self.attention = SEAttention(CNN_CHANNELS)
        self.tokens = _VitTokens(options.vit, dict(options.vit_options), input_size, options.fused_blocks)
        self.fusion_logits = nn.Parameter(torch.zeros(options.fused_blocks))  # softmax: the block weights
        self.grid = resnet_grid(input_size)
        self.head = _TamaHead(self.tokens.width, self.grid, options.heads, options.dropout, num_classes)
        # What DT Grad-CAM differentiates to: the TAMA-attended CNN tokens (the first D channels of the map
        # forward_features gives; the head is then mean pooling and one linear layer, so the CAM is exact),
        # or the SE-attended CNN map before the fusion (2048 channels; TAMA is then part of the head).
        self.cam_channels = self.tokens.width if self.cam_layer == "tama" else CNN_CHANNELS
        self.heavy_head = self.cam_layer == "cnn"  # TAMA in the head: scoring runs it on every thread

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        branches = self._branches(x)
        if self.cam_layer == "cnn":
            return branches
        attended_cnn, attended_vit = self.head.fuse(branches)
        grid = (self.grid, self.grid)
        return torch.cat([attended_cnn, attended_vit], dim=2).transpose(1, 2).unflatten(2, grid)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.cam_layer == "cnn":
            return self.head(features)
        tokens = features.flatten(2).transpose(1, 2)
        width = self.tokens.width
        return self.head.classify(tokens[..., :width], tokens[..., width:])

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        """The SE-attended CNN map with the aligned, fused ViT tokens stacked behind it: [N, 2048 + D, g, g]."""
        cnn = self.attention(self.cnn(x))
        blocks = self.tokens(x)  # [k, N, T, D]
        fused = torch.einsum("k,kntd->ntd", torch.softmax(self.fusion_logits, dim=0), blocks)
        side = self.tokens.grid
        vit = fused.transpose(1, 2).unflatten(2, (side, side))
        if side != self.grid:
            vit = F.adaptive_avg_pool2d(vit, self.grid)
        return torch.cat([cnn, vit.to(cnn.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def imagenet_parts(self) -> tuple[nn.Module, nn.Module | None]:
        """The modules ImageNet weights load into: the ResNet50 trunk and (for vit_b_16) the ViT."""
        return self.cnn, self.tokens.vit if self.tokens.kind == "torchvision" else None


def resvit_options(options: dict[str, Any]) -> ResVitOptions:
    known = set(ResVitOptions.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise CheckpointError(f"unknown ResViT-GANNet options: {sorted(unknown)} (known: {sorted(known)})")
    return ResVitOptions(**options)


def build_resvit(
    arch: str, num_classes: int, pretrained: str, options: dict[str, Any], input_size: int
) -> ResVitGanNet:
    """The registry's builder for ``resvit-gannet``."""
    model = ResVitGanNet(num_classes, resvit_options(options), input_size)
    if pretrained == "imagenet":
        _load_resvit_imagenet(model, input_size)
    return model


def _load_resvit_imagenet(model: ResVitGanNet, input_size: int) -> None:
    """ImageNet weights into both branches: torchvision's ResNet50 and (for vit_b_16) ViT-B/16, its position
    embedding interpolated when the tile is not 224 px; a timm ViT takes no download (train from none)."""
    cnn, vit = model.imagenet_parts()
    resnet = tvm.resnet50(weights=None)
    resnet.load_state_dict(torchvision_imagenet_state("resnet50"))
    cnn.load_state_dict(nn.Sequential(*list(resnet.children())[:-2]).state_dict())
    if vit is None:
        log.warning("resvit-gannet: ImageNet weights for the ResNet50 branch only; the timm ViT starts random")
        return
    state = torchvision_imagenet_state("vit_b_16")
    if input_size != 224:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(input_size, 16, state)
    vit.load_state_dict(state)
