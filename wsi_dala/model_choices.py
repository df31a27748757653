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
    "colour-reference",
)
ATTENTION_KINDS = ("gate", "se", "eca", "cbam-spatial")
GATE_MODES = ("x*a", "x*(1+a)")
ATTENTION_POSITIONS = ("end", "blocks")  # after the whole of layer4 | after each of its 3 blocks
