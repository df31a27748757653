"""The names of the models and of their options, without importing torch.

The command line offers these as choices; building its parser must stay light (``--help`` and a bad
config fail fast), so the names live here and ``wsi_dala.model`` imports them.
"""

from __future__ import annotations

ARCHITECTURES = (
    "dalaresnet50",
    "resnet18",
    "resnet34",
    "resnet50",
    "seresnet50",
    "densenet121",
    "vgg16",
    "vit_b_16",
    "swin_t",
    "dinov2_vitb14",
    "resvit-gannet",
    "colour-reference",
)
# ``timm:NAME``: any timm network as an encoder with a linear head (wsi_dala.model.encoder).
TIMM_PREFIX = "timm:"
# Architectures whose head is the mean of the encoder's feature map, then one linear layer: with
# ``train --freeze-backbone`` that head trains alone on cached features (a linear probe). timm:NAME has
# such a head too. DALAResNet50 and ResViT-GANNet put attention in the head; vgg16 and vit_b_16 an MLP
# or a class token.
LINEAR_HEAD_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "densenet121", "swin_t")
ATTENTION_KINDS = ("gate", "se", "eca", "cbam-spatial")
GATE_MODES = ("x*a", "x*(1+a)")
ATTENTION_POSITIONS = ("end", "blocks")  # after the whole of layer4 | after each of its 3 blocks


def architecture_problem(arch: str) -> str | None:
    """Why ``arch`` names no architecture (None when it does); timm's own list is checked when building."""
    if arch in ARCHITECTURES:
        return None
    if arch.startswith(TIMM_PREFIX):
        return None if arch[len(TIMM_PREFIX) :].strip() else "timm: needs a model name, e.g. timm:vit_small_patch16_224"
    return f"must be one of {', '.join(ARCHITECTURES)}, or timm:NAME for a timm network"
