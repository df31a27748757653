"""Every architecture by name, with what the rest of the program needs to know about it, without torch.

One entry per architecture: the function that builds it (imported only when a model is built) and its
torch-free facts: feature width, where DT Grad-CAM reads, whether a linear probe fits, the learning rate it
needs from random weights, input size, normalisation, where its ImageNet weights come from and their licence.
The command line's choices, settings validation, ``build_model``, the linear probe, the WSInfer import and
the docs all read this table, so adding an architecture is one module with a builder and one entry here
(docs/architecture.md shows an example). ``timm:NAME`` (any timm network as an encoder) is a family, not an
entry: :func:`architecture` makes its entry on demand.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from wsi_dala.model.foundation_presets import PRESETS

TIMM_PREFIX = "timm:"
# The backbone learning rate for training from random weights: the plain CNNs need 1e-3 (at 1e-4 a
# from-scratch DALAResNet50 stayed at chance on the second generator); the others keep the fine-tuning rate.
CNN_FROM_SCRATCH_LR = 1e-3
FINE_TUNE_LR = 1e-4


@dataclass(frozen=True)
class Architecture:
    """What is known about an architecture before building it."""

    name: str
    summary: str
    builder: str  # "module:function", called as function(name, num_classes, pretrained, options, input_size)
    feature_dim: int | None  # channels (or token width) of forward_features; None: read from the network
    cam_layer: str | None  # the feature map DT Grad-CAM differentiates; None: tokens, no CAM
    linear_probe: bool  # head = spatial mean + one linear layer, so --freeze-backbone trains it on cached features
    from_scratch_lr: float = CNN_FROM_SCRATCH_LR
    input_size_px: int = 224  # the size it was designed for; any multiple of 32 works for the CNNs
    normalisation: str = "imagenet"  # mean/std of wsi_dala.model.normalisation
    imagenet_weights: str = "none"  # where --pretrained imagenet fetches from
    licence: str = "BSD-3-Clause (torchvision code and weights)"
    wsinfer_names: tuple[str, ...] = ()  # WSInfer config.json architectures imported as this one
    loads_own_weights: bool = False  # the builder loads a --pretrained FILE itself (else build_model does)

    @property
    def spatial_features(self) -> bool:
        return self.cam_layer is not None


def _torchvision(
    name: str, summary: str, dim: int, cam_layer: str | None, probe: bool, **facts: object
) -> Architecture:
    return Architecture(
        name, summary, "wsi_dala.model.baselines:build_torchvision", dim, cam_layer, probe,
        imagenet_weights=f"torchvision {name} IMAGENET1K weights (download.pytorch.org)", **facts,  # type: ignore[arg-type]
    )  # fmt: skip


REGISTRY: dict[str, Architecture] = {
    entry.name: entry
    for entry in (
        Architecture(
            "dalaresnet50",
            "ResNet50 with dual-activated attention after layer4 (the paper's model)",
            "wsi_dala.model.dala:build_dala",
            2048,
            "layer4 + attention (forward_features)",
            False,
            imagenet_weights="torchvision resnet50 IMAGENET1K_V2 (the attention starts random)",
        ),
        _torchvision("resnet18", "ResNet-18", 512, "layer4", True, wsinfer_names=("resnet18",)),
        _torchvision("resnet34", "ResNet-34", 512, "layer4", True, wsinfer_names=("resnet34",)),
        _torchvision("resnet50", "ResNet-50", 2048, "layer4", True, wsinfer_names=("resnet50",)),
        Architecture(
            "seresnet50",
            "SE-ResNet-50 (timm)",
            "wsi_dala.model.baselines:build_timm_baseline",
            2048,
            "layer4",
            False,
            from_scratch_lr=FINE_TUNE_LR,
            imagenet_weights="timm/seresnet50 (Hugging Face hub)",
            licence="Apache-2.0 (timm)",
        ),
        _torchvision("densenet121", "DenseNet-121", 1024, "features (+ReLU)", True),
        _torchvision("vgg16", "VGG-16 (its MLP head: no linear probe)", 512, "features", False),
        _torchvision("vit_b_16", "ViT-B/16 (class token head)", 768, None, False, from_scratch_lr=FINE_TUNE_LR),
        _torchvision("swin_t", "Swin-T", 768, "features + norm", True, from_scratch_lr=FINE_TUNE_LR),
        Architecture(
            "dinov2_vitb14",
            "DINOv2 ViT-B/14 (timm)",
            "wsi_dala.model.baselines:build_timm_baseline",
            768,
            None,
            False,
            from_scratch_lr=FINE_TUNE_LR,
            imagenet_weights="timm/vit_base_patch14_dinov2 (Hugging Face hub)",
            licence="Apache-2.0 (DINOv2 weights)",
        ),
        Architecture(
            "resvit-gannet",
            "ResNet50 and ViT branches fused (ResViT-GANNet)",
            "wsi_dala.model.resvit:build_resvit",
            1536,
            "fused map (forward_features)",
            False,
            from_scratch_lr=FINE_TUNE_LR,
            imagenet_weights="torchvision resnet50 IMAGENET1K_V2 and vit_b_16 IMAGENET1K_V1",
        ),
        Architecture(
            "colour-reference",
            "a fixed colour scorer with an exact CAM, for tests and the demo's checks (no weights)",
            "wsi_dala.model.colour:build_colour",
            1,
            "colour map (forward_features)",
            False,
            from_scratch_lr=FINE_TUNE_LR,
            licence="none (no weights)",
        ),
    )
}
REGISTRY.update(
    {
        preset.name: Architecture(
            preset.name,
            f"{preset.title}; a linear head on the mean of its patch tokens",
            "wsi_dala.model.foundation:build_foundation_classifier",
            preset.embed_dim,
            "patch-token grid (forward_features)",
            True,
            from_scratch_lr=FINE_TUNE_LR,
            input_size_px=preset.input_px,
            normalisation=f"{preset.name} (mean {preset.mean}, std {preset.std})",
            imagenet_weights=f"{preset.hf_repo} on the Hugging Face hub (--weights hub), or --weights FILE",
            licence=preset.licence,
            loads_own_weights=True,
        )
        for preset in PRESETS.values()
    }
)
ARCHITECTURES = tuple(REGISTRY)
FOUNDATION_PRESETS = tuple(PRESETS)
# Kept for the settings and tests that name them; derived from the table.
LINEAR_HEAD_ARCHITECTURES = tuple(name for name, entry in REGISTRY.items() if entry.linear_probe)
WSINFER_IMPORTS = {wsinfer: name for name, entry in REGISTRY.items() for wsinfer in entry.wsinfer_names}

ATTENTION_KINDS = ("gate", "se", "eca", "cbam-spatial")
GATE_MODES = ("x*a", "x*(1+a)")
ATTENTION_POSITIONS = ("end", "blocks")  # after the whole of layer4 | after each of its 3 blocks


def takes_encoder_weights(arch: str) -> bool:
    """Whether ``arch`` is an encoder whose weights come from ``--weights`` (``timm:NAME``, a foundation preset)."""
    return arch.startswith(TIMM_PREFIX) or arch in PRESETS


def architecture_problem(arch: str) -> str | None:
    """Why ``arch`` names no architecture (None when it does); timm's own list is checked when building."""
    if arch in REGISTRY:
        return None
    if arch.startswith(TIMM_PREFIX):
        return None if arch[len(TIMM_PREFIX) :].strip() else "timm: needs a model name, e.g. timm:vit_small_patch16_224"
    near = difflib.get_close_matches(arch, ARCHITECTURES, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"must be one of {', '.join(ARCHITECTURES)}, or timm:NAME for a timm network{hint}"


def architecture(arch: str) -> Architecture:
    """The entry for ``arch`` (``timm:NAME`` included); ValueError naming the choices when there is none."""
    problem = architecture_problem(arch)
    if problem is not None:
        raise ValueError(f"unknown architecture {arch!r}: {problem}")
    if arch in REGISTRY:
        return REGISTRY[arch]
    return Architecture(
        arch,
        f"timm network {arch[len(TIMM_PREFIX) :]} as an encoder with a linear head",
        "wsi_dala.model.encoder:build_encoder_classifier",
        None,
        "feature map, or the token grid of a ViT (forward_features)",
        True,
        from_scratch_lr=FINE_TUNE_LR,
        imagenet_weights="none: weights come from a local file (--weights FILE)",
        licence="the model card's of the weights given",
        loads_own_weights=True,
    )
