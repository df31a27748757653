"""Pathology foundation models by name (``--arch uni``): each one's exact architecture, transform,
embedding rule, weights and licence, with the source of every fact. Torch-free: the registry, the
settings and the docs read this table; ``wsi_dala.model.foundation`` builds from it.

Sources (read 2026-12-07):
- [TRIDENT] mahmoodlab/TRIDENT, ``trident/patch_encoder_models/load.py`` (commit a91fa84): the timm
  arguments and transforms of UNI, UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath and Phikon-v2, each loaded
  with ``load_state_dict(strict=True)`` from the repository's weights file (so no key prefix).
- [UNI] mahmoodlab/UNI ``README.md`` (UNI2-h's arguments, "shape [1, 1536]") and ``README_old.md`` (UNI's,
  "shape [1,1024]"); licence CC-BY-NC-ND-4.0 on huggingface.co/MahmoodLab/UNI and /UNI2-h.
- [VIRCHOW2] huggingface.co/paige-ai/Virchow2 (model card: arguments, "tokens 1-4 are register tokens so we
  ignore those", CLS concatenated with the mean of the patch tokens); Zimmermann et al., arXiv 2408.00738:
  "a 632 million parameter vision transformer".
- [HOPT0] huggingface.co/bioptimus/H-optimus-0 (card and config.json: "a 1.1B parameter vision transformer",
  mean/std, "224x224 ... extracted at 0.5 microns per pixel"; Apache-2.0); bioptimus/releases
  ``models/h-optimus/v0/README.md`` (g/14, 4 registers, 40 blocks, 24 heads, 1536).
- [HOPT1] huggingface.co/bioptimus/H-optimus-1 (same code as H-optimus-0); resources.bioptimus.com launch
  note: "a 1.1 billion parameter vision transformer"; licence CC-BY-NC-ND-4.0 per rendeirolab/lazyslide-models
  (not read on the card itself).
- [GIGAPATH] prov-gigapath/prov-gigapath ``README.md`` (transform; Apache-2.0) and the repository's
  config.json as copied by TRIDENT and clemsgrs/slide2vec (patch 16, not 14); ``demo/1_slide_mpp_check.py``:
  "trained with 0.5 mpp preprocessed slides".
- [PHIKON2] huggingface.co/owkin/phikon-v2 (card: ViT-L/16 through DINOv2, ``transformers`` AutoModel, CLS
  token; Owkin non-commercial licence); Filiot et al., arXiv 2409.09173.
- [LAZYSLIDE] rendeirolab/lazyslide-models ``src/lazyslide_models/vision/*.py``: parameter counts to one decimal
  (303.4M, 681.4M, 1.13B), third party; used only where the model's own source gives none.

The parameter counts in ``parameters`` are those of the network built here (timm 1.0.31, ``num_classes=0``,
``img_size=224``: without it timm's DINOv2 giants default to 518 px and 1,136,483,840 parameters); ``stated``
is the figure its source gives, rounded as the source rounds it, and ``tests/test_foundation.py`` checks both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from wsi_dala.core.layout import HF_SAFETENSORS_WEIGHTS, HF_TORCH_WEIGHTS
from wsi_dala.model.normalisation import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class FoundationPreset:
    """One named encoder: what builds it, what it expects and what it gives."""

    name: str
    title: str
    library: str  # "timm" or "transformers"
    constructor: str  # timm model name, or the transformers class
    arguments: dict[str, Any]  # exact keyword arguments; "mlp_layer"/"act_layer" are named, resolved when building
    embed_dim: int  # token width
    depth: int
    heads: int
    patch_px: int
    register_tokens: int
    mlp: str  # "swiglu" (SwiGLUPacked, SiLU) or "gelu" (two linear layers)
    embedding: str  # "cls" | "cls+mean" (CLS concatenated with the mean of the patch tokens, registers left out)
    embedding_dim: int
    input_px: int
    resize_px: int  # resized to this, then centre-cropped to input_px
    mpp: float  # µm/px the model was trained at (or, where training mixed magnifications, the common choice)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hf_repo: str
    weights_file: str
    gated: bool
    licence: str
    parameters: int  # measured here on the meta device with ``arguments``
    stated: str  # the parameter count its source gives, as it gives it
    sources: tuple[str, ...]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}/blob/main/{self.weights_file}"


PRESETS: dict[str, FoundationPreset] = {
    preset.name: preset
    for preset in (
        FoundationPreset(
            name="uni",
            title="UNI (Mahmood Lab), ViT-L/16",
            library="timm",
            constructor="vit_large_patch16_224",
            arguments={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            embed_dim=1024, depth=24, heads=16, patch_px=16, register_tokens=0, mlp="gelu",
            embedding="cls", embedding_dim=1024,
            input_px=224, resize_px=224, mpp=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            hf_repo="MahmoodLab/UNI", weights_file=HF_TORCH_WEIGHTS, gated=True, licence="CC-BY-NC-ND-4.0",
            parameters=303_350_784, stated="303.4M (third party: LAZYSLIDE; the card gives no count)",
            sources=("UNI README_old.md", "TRIDENT"),
            notes="µm/px 0.5 (20x) from slide2vec and the paper's tiles; the card names no µm/px",
        ),
        FoundationPreset(
            name="uni2-h",
            title="UNI2-h (Mahmood Lab), ViT-H/14 with SwiGLU and 8 register tokens",
            library="timm",
            constructor="vit_giant_patch14_224",
            arguments={
                "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "swiglu_packed",
                "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True,
            },
            embed_dim=1536, depth=24, heads=24, patch_px=14, register_tokens=8, mlp="swiglu",
            embedding="cls", embedding_dim=1536,
            input_px=224, resize_px=224, mpp=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            hf_repo="MahmoodLab/UNI2-h", weights_file=HF_TORCH_WEIGHTS, gated=True, licence="CC-BY-NC-ND-4.0",
            parameters=681_394_176, stated="681.4M (third party: LAZYSLIDE; the card says ViT-h/14-reg8 only)",
            sources=("UNI README.md", "TRIDENT"),
        ),
        FoundationPreset(
            name="virchow2",
            title="Virchow2 (Paige), ViT-H/14 with SwiGLU and 4 register tokens",
            library="timm",
            constructor="vit_huge_patch14_224",
            arguments={
                "img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu",
            },
            embed_dim=1280, depth=32, heads=16, patch_px=14, register_tokens=4, mlp="swiglu",
            embedding="cls+mean", embedding_dim=2560,
            input_px=224, resize_px=224, mpp=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            hf_repo="paige-ai/Virchow2", weights_file=HF_TORCH_WEIGHTS, gated=True, licence="CC-BY-NC-ND-4.0",
            parameters=631_239_424,
            stated="632M (arXiv 2408.00738; the network has 631.2M: the paper's figure is the nominal ViT-H/14's)",
            sources=("VIRCHOW2", "TRIDENT"),
            notes="trained on 5x, 10x, 20x and 40x tiles; 0.5 µm/px is the common choice, not the only one",
        ),
        FoundationPreset(
            name="h-optimus-0",
            title="H-optimus-0 (Bioptimus), ViT-g/14 with SwiGLU and 4 register tokens",
            library="timm",
            constructor="vit_giant_patch14_reg4_dinov2",
            arguments={"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False},
            embed_dim=1536, depth=40, heads=24, patch_px=14, register_tokens=4, mlp="swiglu",
            embedding="cls", embedding_dim=1536,
            input_px=224, resize_px=224, mpp=0.5,
            mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
            hf_repo="bioptimus/H-optimus-0", weights_file=HF_TORCH_WEIGHTS, gated=False, licence="Apache-2.0",
            parameters=1_134_774_272, stated="1.1B (the card; rounded)", sources=("HOPT0", "TRIDENT"),
        ),
        FoundationPreset(
            name="prov-gigapath",
            title="Prov-GigaPath tile encoder, ViT-g with 16 px patches",
            library="timm",
            constructor="vit_giant_patch14_dinov2",
            arguments={
                "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True,
            },
            embed_dim=1536, depth=40, heads=24, patch_px=16, register_tokens=0, mlp="swiglu",
            embedding="cls", embedding_dim=1536,
            input_px=224, resize_px=256, mpp=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            hf_repo="prov-gigapath/prov-gigapath", weights_file=HF_TORCH_WEIGHTS, gated=True,
            licence="Apache-2.0 (research use; the README puts deployed use out of scope)",
            parameters=1_134_953_984, stated="1.13B (third party: LAZYSLIDE; no figure for the tile encoder alone)",
            sources=("GIGAPATH", "TRIDENT"),
            notes="SwiGLU comes from timm's vit_giant_patch14_dinov2 defaults; the config overrides only the patch",
        ),
        FoundationPreset(
            name="phikon-v2",
            title="Phikon-v2 (Owkin), ViT-L/16 through DINOv2 (transformers)",
            library="transformers",
            constructor="Dinov2Model",
            arguments={
                "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
                "patch_size": 16, "image_size": 224, "use_swiglu_ffn": False, "qkv_bias": True,
                "layer_norm_eps": 1e-6,
            },
            embed_dim=1024, depth=24, heads=16, patch_px=16, register_tokens=0, mlp="gelu",
            embedding="cls", embedding_dim=1024,
            input_px=224, resize_px=224, mpp=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            hf_repo="owkin/phikon-v2", weights_file=HF_SAFETENSORS_WEIGHTS, gated=False,
            licence="Owkin non-commercial licence (LICENSE.pdf in the repository)",
            parameters=303_351_808, stated="303.4M (third party: LAZYSLIDE); the card says ViT-L/16",
            sources=("PHIKON2", "TRIDENT"),
            notes="configuration from the card's ViT-L/16 and its 14x14 token grid at 224 px; the repository's "
            "config.json was not read here (its weights are loaded strictly, so a misfit is refused by name)",
        ),
    )
}  # fmt: skip
# H-optimus-1: H-optimus-0's network and transform (HOPT1: the same code), its own repository, gate and licence.
PRESETS["h-optimus-1"] = replace(
    PRESETS["h-optimus-0"],
    name="h-optimus-1",
    title="H-optimus-1 (Bioptimus), ViT-g/14 with SwiGLU and 4 register tokens",
    hf_repo="bioptimus/H-optimus-1",
    gated=True,
    licence="CC-BY-NC-ND-4.0 (per LAZYSLIDE; check the card)",
    stated="1.1 billion (Bioptimus' launch note; rounded)",
    sources=("HOPT1", "TRIDENT"),
)


def preset(name: str) -> FoundationPreset | None:
    return PRESETS.get(name)
