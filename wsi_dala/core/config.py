"""Settings, validated on the types themselves before any work: the pipeline YAML, flags, batch options.

Each field carries its constraint (``Literal`` choices, ranges, positive sizes), so a bad value fails
when the settings are built, not after tiling and scoring. Precedence: built-in defaults < the YAML file
(``pipelines/default.yaml`` documents every key) < command-line flags.

pydantic v2, because it is the field's standard for validated settings and makes this much shorter
than hand-written checks: strict types (``batch_size: "32"`` is an error, not a silent cast), unknown
keys refused (``extra="forbid"``), frozen models. Errors are re-worded into one line naming the file,
the key and, for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from wsi_dala.core.errors import ConfigError
from wsi_dala.model.registry import (
    FOUNDATION_PRESETS,
    LINEAR_HEAD_ARCHITECTURES,
    REGISTRY,
    TIMM_PREFIX,
    architecture,
    architecture_problem,
)

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # what each means: wsi_dala.model.devices.resolve_precision
ScoringPrecision = Literal[
    "auto", "fp32", "bf16", "fp16", "int8"
]  # int8: the backbone, quantised (wsi_dala.inference.engines)
Backend = Literal[
    "auto", "torch", "onnxruntime", "openvino"
]  # where the backbone runs (wsi_dala.inference.engines.plan)
Reader = Literal["auto", "openslide", "tiffslide"]
ThresholdMethod = Literal["mean_std", "otsu", "percentile"]  # DT Grad-CAM's dynamic threshold
TestTimeAugmentation = Literal[
    "none", "flips", "d4"
]  # views of the dihedral group averaged per tile (wsi_dala.inference.tta)
MIN_TILE_SIZE_PX = 8
DEFAULT_TILE_MPP = 0.5  # what tiles are cut at when neither the settings nor a model card say
DEFAULT_TILE_SIZE_PX = 224
Fraction = Annotated[float, Field(ge=0, le=1)]
Probability = Annotated[float, Strict(), Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # what numpy's and torch's generators all take
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class Settings(BaseModel):
    """Strict, frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


MAX_TILE_SIZE_PX = 8192  # a tile larger than this is not a tile (and would not fit a batch in memory)
QCMode = Literal["flag", "exclude", "off"]


class TissueConfig(Settings):
    """How tissue, marker ink and folds are found on the low-resolution image (wsi_dala.tissue.detect)."""

    mask_mpp: float = Field(8.0, gt=0, le=1000)  # µm/px of the image the masks are computed on (finer if tiles need it)
    min_saturation: float = Field(0.05, ge=0, le=1)  # stained: more saturated than this, relative to glass
    glass_noise_factor: float = Field(3.0, ge=0, le=100)  # ... and than this times the glass's own 95th percentile
    max_brightness: float = Field(0.97, gt=0, le=1)  # brighter than this (relative to glass) is glass
    min_tissue_area_um2: float = Field(20_000.0, ge=0, le=1e10)  # smaller pieces are debris
    min_hole_area_um2: float = Field(10_000.0, ge=0, le=1e10)  # smaller holes inside tissue are filled
    min_ink_area_um2: float = Field(20_000.0, gt=0, le=1e10)  # ink: the unambiguous core of a mark covers this much
    ink_margin_um: float = Field(24.0, ge=0, le=10_000)  # ink edges blur into neighbours; drop this much around ink
    fold_od_ratio: float = Field(1.6, gt=1, le=100)  # fold: optical density this many times the usual for its colour
    min_fold_area_um2: float = Field(20_000.0, ge=0, le=1e10)  # smaller dark patches are not folds


class QCConfig(Settings):
    """Quality control per tile (wsi_dala.tissue.qc): blur, folds and ink, and what is done with flagged tiles."""

    mode: QCMode = (
        "flag"  # flag: scored and marked, calls unchanged; exclude: flagged tiles left out; off: not measured
    )
    max_edge_blur_um: float = Field(0.45, gt=0, le=20)  # out of focus: a part's edges are wider than this (σ, µm)
    max_blur_fraction: float = Field(
        0.5, gt=0, le=1
    )  # flagged: at least this share of the tile's judged parts is out of focus
    max_fold_fraction: Fraction = 0.25  # flagged: more of the tile than this is folded tissue
    max_ink_fraction: Fraction = 0.10  # flagged: more of the tile than this is ink (margin included)


class TilingConfig(Settings):
    """How tiles are cut: the one tiling settings type (YAML ``tiling:``, flags, training, the demo)."""

    mpp: float | None = Field(None, gt=0, le=1000)  # tile µm/px; None: the model card's, else DEFAULT_TILE_MPP
    tile_size_px: int | None = Field(None, ge=MIN_TILE_SIZE_PX, le=MAX_TILE_SIZE_PX)  # None: the model card's, else 224
    stride_px: int | None = Field(None, ge=1, le=MAX_TILE_SIZE_PX)  # None: the tile size (no overlap)
    min_tissue: Fraction = 0.25  # keep tiles with at least this fraction of tissue
    allow_upsample: bool = False  # cut from a coarser level and enlarge when the slide lacks the model's µm/px
    reader: Reader = (
        "auto"  # auto: tiffslide first for TIFF-family files (parallel decode), OpenSlide first for the rest
    )
    slide_mpp: float | None = Field(None, gt=0, le=1000)  # the slide's level-0 µm/px when its metadata lacks it
    reader_threads: int = Field(2, ge=1, le=256)  # threads reading and decoding regions of the slide
    tolerance: float = Field(0.05, ge=0, le=0.5)  # within ±this of the target no resize is done
    chunk_tiles: int = Field(64, ge=1, le=4096)  # tiles per Zarr chunk (the unit of writing and resuming)
    region_level_px: int = Field(2048, ge=64, le=16384)  # side of the large region reads, in pixels of the read level
    tissue: TissueConfig = TissueConfig()
    qc: QCConfig = QCConfig()

    def resolved(self, mpp: float | None, tile_size_px: int | None) -> TilingConfig:
        """These settings with the target filled in where they leave it open (from the model card)."""
        values = self.model_dump()
        values["mpp"] = mpp if self.mpp is None else self.mpp
        values["tile_size_px"] = tile_size_px if self.tile_size_px is None else self.tile_size_px
        if values["mpp"] is None:
            raise ConfigError("the model card records no µm/px; give the tile resolution with --mpp")
        return build(TilingConfig, values, "tiling")

    @property
    def target_mpp(self) -> float:
        return DEFAULT_TILE_MPP if self.mpp is None else self.mpp

    @property
    def tile_px(self) -> int:
        return DEFAULT_TILE_SIZE_PX if self.tile_size_px is None else self.tile_size_px

    @property
    def stride(self) -> int:
        return self.tile_px if self.stride_px is None else self.stride_px


StainNormalisation = Literal["none", "macenko", "reinhard"]


class ScoringConfig(Settings):
    batch_size: int = Field(32, ge=1, le=4096)  # tiles per model batch
    stain_normalise: StainNormalisation = "none"  # map tiles to the model card's reference stain first
    precision: ScoringPrecision = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32
    backend: Backend = "auto"  # auto: the fastest installed engine for the precision, measured once per CPU
    int8_calibration: str | None = None  # int8: a tile store whose tiles calibrate it (None: the slide's own)
    int8_calibration_tiles: int = Field(64, ge=1, le=4096)  # int8: tiles spread over the store
    overlap_tiling: bool = True  # score chunks as the tiler writes them (local scheduler, no stain normalisation)
    device: str = Field("auto", pattern=DEVICE_PATTERN)  # auto, cpu, cuda, cuda:1, mps
    devices: Literal["one", "all"] = "one"  # all: one Dask worker per visible GPU (dask-cuda's LocalCUDACluster)
    scheduler: str | None = None  # None: local threads; else the address of a dask.distributed scheduler
    connect_timeout_s: float = Field(30.0, gt=0, le=3600)  # connecting to the scheduler, handshake included
    wave: int = Field(4, ge=1, le=1024)  # chunks per local compute call (the resume granularity on the local scheduler)
    tta: TestTimeAugmentation = "none"  # flips: 4 views, d4: 8 (8x the backbone work); gives a per-tile SD
    mc_dropout: int = Field(0, ge=0, le=1000)  # >0: this many extra passes of the head with dropout on (per-tile SD)

    @field_validator("mc_dropout")
    @classmethod
    def _several_passes(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one pass gives no spread: use 0 (off) or at least 2")
        return value


class HeatmapConfig(Settings):
    cam_scale_percentile: float = Field(25.0, ge=0, le=100)  # of the tumour tiles' peak border-corrected CAM
    positive_threshold: Fraction = 0.5  # tiles at or above this probability define that scale and the border profile
    border_correction: bool = True  # divide each CAM by the model's mean CAM profile over a tile (no tile seams)
    min_level_px: int = Field(64, ge=1, le=65536)  # stop the pyramid when a level is smaller than this
    min_cell_tissue: Fraction = 0.5  # cells with less tissue (by the tissue mask) get no value


class ExportConfig(Settings):
    tile_threshold: Fraction = 0.5  # tiles at or above: class Tumor
    region_thresholds: Annotated[tuple[Probability, ...], Field(strict=False, min_length=1)] = (
        0.5,
    )  # tumour-layer levels outlined as regions; several give nested annotations
    min_region_area_um2: float = Field(10_000.0, ge=0, le=1e12)  # 0.01 mm²
    simplify_cells: float = Field(0.1, ge=0, le=100)  # simplification tolerance, heatmap cells (outlines move ≤ ½ cell)
    gzip: bool = False  # write .geojson.gz
    cam_threshold_method: ThresholdMethod = "mean_std"  # for the per-tile "DT-CAM area fraction"
    dicom: bool = False  # also the results as DICOM (Segmentation, Bulk Simple Annotations) in RUN/dicom/

    @field_validator("region_thresholds", mode="before")
    @classmethod
    def _one_threshold_is_a_list_of_one(cls, value: Any) -> Any:
        return (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class PipelineConfig(Settings):
    model: str | None = None  # checkpoint path or WSInfer model folder; relative paths: to the config file
    positive_class: str | None = None  # WSInfer model folders only: the class the heatmap shows
    # A features.zarr (or the folder holding it) whose patch tokens a foundation-model head reads instead of
    # running its encoder; refused when it does not fit. None: the run folder's own, used when it fits.
    # Relative paths: to the config file.
    features: str | None = None
    # An attention-MIL model (`wsi-dala mil train`): adds its slide probability, a slide call at its thresholds
    # and an attention layer; reads its encoder's stored features of the slide. Relative: to the config file.
    mil: str | None = None
    tiling: TilingConfig = TilingConfig()
    scoring: ScoringConfig = ScoringConfig()
    heatmap: HeatmapConfig = HeatmapConfig()
    export: ExportConfig = ExportConfig()


def known_architecture(value: str) -> str:
    """``value`` when it names an architecture (a validator's check), else ValueError saying why not."""
    problem = architecture_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class TrainConfig(Settings):
    """`wsi-dala train` settings. Defaults from ``shared/model-spec.md`` (ours, not the paper's)."""

    arch: str = "dalaresnet50"  # one of wsi_dala.model.registry.ARCHITECTURES
    options: dict[str, Any] = Field(default_factory=dict)  # architecture options (DALAResNet50: DalaOptions)
    pretrained: str = "imagenet"  # imagenet | none | a weights file
    input_size: int = Field(224, ge=MIN_TILE_SIZE_PX, le=MAX_TILE_SIZE_PX)
    epochs: int = Field(20, ge=0, le=100_000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr_backbone: float = Field(1e-4, gt=0, le=10)  # left out: 1e-4 to fine-tune pre-trained weights, 1e-3 from scratch
    lr_head: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0, le=10)  # AdamW decoupled weight decay
    imbalance: Literal["cb-loss", "sampler", "none"] = "cb-loss"
    beta: float = Field(0.999, ge=0, lt=1)  # class-balanced loss β
    patience: int = Field(5, ge=1, le=100_000)  # early stopping: epochs without validation-loss improvement
    seed: Seed = 0
    freeze_until: Literal["layer1", "layer2", "layer3"] | None = None  # "layer3": layer4 + attention + head only
    freeze_backbone: bool = False  # train the linear head alone, on encoder features computed once (a linear probe)
    # With freeze_backbone: features stores (`wsi-dala features`, or an earlier training's OUT/tiles) the training
    # tiles' features are read from instead of running the encoder; empty: computed beside the training tiles.
    features: list[str] = Field(default_factory=list)
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    precision: Precision = "auto"  # auto: fp16 autocast on CUDA, bf16 on a CPU with native bf16, else fp32
    loader_workers: int = Field(0, ge=0, le=256)  # data-loading processes (0: load in the training process)
    precise_bn_batches: int = Field(0, ge=0, le=100_000)  # >0: re-estimate BatchNorm statistics on this many batches
    stain_normalise: StainNormalisation = "none"  # map training batches to the published H&E reference first
    mask_guided: bool = False  # lesion masks from the QuPath annotations guide training (wsi_dala.training.guidance)
    hard_attention_floor: float = Field(0.1, ge=0, le=1)  # mask_guided: features outside the lesion x this (1: off)
    attention_loss_weight: float = Field(0.5, ge=0, le=1000)  # mask_guided: weight of attention-to-mask BCE (0: off)
    contrastive_weight: float = Field(0.0, ge=0, le=1000)  # supervised-contrastive term on pooled features (0: off)
    contrastive_temperature: float = Field(0.1, gt=0, le=10)

    @field_validator("arch")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        return known_architecture(value)

    @model_validator(mode="before")
    @classmethod
    def _backbone_rate_for_its_start(cls, data: Any) -> Any:
        """A CNN trained from scratch needs a larger step than one fine-tuned from pre-trained weights: at 1e-4
        a from-scratch DALAResNet50 learnt nothing in 3 epochs on real-texture slides (validation balanced
        accuracy 0.50), at 1e-3 it reached 0.96 (benchmarks/unseen.py). Transformers keep 1e-4 (at 1e-3 a tiny
        ResViT-GANNet's Grad-CAM went to zero everywhere)."""
        if isinstance(data, dict) and data.get("lr_backbone") is None:
            data = {k: v for k, v in data.items() if k != "lr_backbone"}
            arch = data.get("arch", "dalaresnet50")
            if data.get("pretrained", "imagenet") == "none" and isinstance(arch, str) and arch in REGISTRY:
                data["lr_backbone"] = REGISTRY[arch].from_scratch_lr
        return data

    @model_validator(mode="after")
    def _frozen_backbone_needs_an_encoder(self) -> TrainConfig:
        if self.freeze_backbone and not architecture(self.arch).linear_probe:
            raise ValueError(
                f"--freeze-backbone needs an encoder with a pooled linear head: --arch timm:NAME or one of "
                f"{', '.join(LINEAR_HEAD_ARCHITECTURES)}, not {self.arch}"
            )
        if self.freeze_backbone and (self.mask_guided or self.contrastive_weight > 0):
            raise ValueError("--freeze-backbone trains a head on cached features: no --mask-guided or contrastive term")
        if self.features and not self.freeze_backbone:
            raise ValueError("--features trains a head on stored encoder features: it needs --freeze-backbone")
        if self.freeze_backbone and self.freeze_until:
            raise ValueError("--freeze-backbone and --freeze-until exclude each other: the first freezes everything")
        if self.arch.startswith(TIMM_PREFIX) and self.pretrained in ("imagenet", "hub"):
            raise ValueError(
                f"{self.arch} takes its weights from a local file (--weights FILE) or none; nothing is downloaded"
            )
        if self.arch in FOUNDATION_PRESETS and self.pretrained == "imagenet":
            raise ValueError(f"{self.arch} takes --weights hub, FILE or none, not --pretrained imagenet")
        if self.pretrained == "hub" and self.arch not in FOUNDATION_PRESETS:
            raise ValueError("--weights hub: only the foundation models have a repository of their own")
        return self


class PretrainConfig(Settings):
    """`wsi-dala pretrain` settings: SimCLR on unlabelled tiles (wsi_dala.training.pretrain)."""

    arch: str = "dalaresnet50"  # any architecture of `train` with a pooled feature
    options: dict[str, Any] = Field(default_factory=dict)  # architecture options, as in train
    pretrained: str = "imagenet"  # starting weights: imagenet | none | a weights file
    epochs: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(64, ge=2, le=4096)  # tiles per step; each gives two views, the other 2N - 2 are negatives
    tiles_per_epoch: int = Field(0, ge=0, le=10**9)  # draws per epoch, slides weighted equally (0: one per tile)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-6, ge=0, le=10)
    temperature: float = Field(0.2, gt=0, le=10)
    projection_dim: int = Field(128, ge=8, le=8192)
    crop_fraction: float = Field(0.75, gt=0.1, le=1.0)  # view side / tile side, at the tile's µm/px
    hed_scale: float = Field(0.05, ge=0, lt=1)  # stain augmentation: each H, E, D channel scaled by 1 ± this
    hed_shift: float = Field(0.05, ge=0, lt=1)  # ... and shifted by ± this
    seed: Seed = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    precision: Precision = "auto"
    loader_workers: int = Field(0, ge=0, le=256)

    @field_validator("arch")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        known_architecture(value)
        if value == "colour-reference":
            raise ValueError("colour-reference is a fixed colour rule with no features to pre-train")
        return value


class GanConfig(Settings):
    """`wsi-dala gan train` settings: a class-conditional StyleGAN2 with ADA (wsi_dala.gan)."""

    # tile side, a power of two in 32..256; tiles are cut (or cropped) to it at their µm/px
    resolution: int = Field(64, ge=32, le=256)
    steps: int = Field(2000, ge=1, le=10**8)  # generator updates
    batch_size: int = Field(16, ge=2, le=4096)
    lr: float = Field(0.0025, gt=0, le=10)  # Adam, both networks (StyleGAN2's)
    r1_gamma: float = Field(1.0, ge=0, le=1e6)  # R1 penalty on real tiles (lazy, every r1_interval steps)
    r1_interval: int = Field(16, ge=1, le=10**6)  # steps between R1 penalties (lazy regularisation)
    ema_half_life_images: int = Field(10_000, ge=1, le=10**9)  # the sampled generator: an EMA of the trained one
    ema_rampup: float = Field(0.05, ge=0, le=100)  # half-life ≤ this x images seen so far (0: off), as StyleGAN2-ADA
    ada_target: float = Field(0.6, gt=0, lt=1)
    ada_speed_images: int = Field(100_000, ge=1, le=10**10)  # images for the augment probability to go 0 -> 1
    z_dim: int = Field(128, ge=8, le=4096)  # latent size (z and w)
    channel_max: int = Field(256, ge=16, le=4096)
    checkpoint_every: int = Field(250, ge=1, le=10**8)  # steps between checkpoints (and sample grids)
    kid_every: int = Field(0, ge=0, le=10**8)  # steps between KIDs (0: only at the end, when a KID encoder is given)
    kid_samples: int = Field(500, ge=20, le=10**6)
    seed: Seed = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN)

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 32 or value > 256 or value & (value - 1):
            raise ValueError("must be a power of two from 32 to 256")
        return value


class BatchConfig(Settings):
    """`wsi-dala batch` options (flags only)."""

    pattern: str = "*"  # glob on file names (e.g. "*.svs")
    retries: int = Field(2, ge=0, le=100)  # extra attempts for failures that are not the input's fault
    stale_lock_s: float = Field(24 * 3600.0, gt=0, le=365 * 24 * 3600.0)  # another host's lock this old is stale
    dask_workers: int = Field(1, ge=1, le=1024)  # >1: a local dask.distributed cluster with this many processes
    scheduler: str | None = None  # address of an existing dask.distributed scheduler


# Keys renamed in 0.2, still read (with a warning) for one release.
DEPRECATED_KEYS: dict[str, dict[str, str]] = {
    "tiling": {"tile_size": "tile_size_px", "stride": "stride_px", "workers": "reader_threads"},
    "export": {"cam_threshold": "cam_threshold_method"},
}
# Keys whose meaning is gone (the setting they tuned no longer exists): read, ignored with a warning, for one release.
REMOVED_KEYS: dict[tuple[str, ...], dict[str, str]] = {
    ("tiling", "qc"): {
        "blur_drop": "blur is judged by the width of each tile's edges in µm, not against the slide's median: "
        "see tiling.qc.max_edge_blur_um",
        "blur_floor": "see tiling.qc.max_edge_blur_um",
    },
}
_SECTIONS: dict[str, type[Settings]] = {
    "tiling": TilingConfig,
    "scoring": ScoringConfig,
    "heatmap": HeatmapConfig,
    "export": ExportConfig,
}

SettingsT = TypeVar("SettingsT", bound=Settings)


def build(cls: type[SettingsT], values: dict[str, Any], where: str) -> SettingsT:
    """Validate ``values`` as ``cls``; a failure is one ConfigError line naming ``where`` and the key."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, cls, where)) from None


def _first_error(exc: ValidationError, cls: type[Settings], where: str) -> str:
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        *section, _ = unknown[0]["loc"]
        owner = _model_at(cls, [str(p) for p in section])
        names = sorted(owner.model_fields)
        keys = [str(e["loc"][-1]) for e in unknown]
        hint = difflib.get_close_matches(keys[0], names, n=1)
        suggestion = f"did you mean {hint[0]}? " if hint else ""
        place = ".".join([where, *map(str, section)])
        return f"{place}: unknown key(s) {', '.join(keys)} ({suggestion}known: {', '.join(names)})"
    error = errors[0]
    return f"{'.'.join([where, *map(str, error['loc'])])}: {_reworded(error)}"


def _model_at(cls: type[Settings], path: list[str]) -> type[Settings]:
    for name in path:
        annotation = cls.model_fields[name].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, Settings)):
            break
        cls = annotation
    return cls


def _reworded(error: ErrorDetails) -> str:
    # A check of the whole section (a model validator, loc ()) gets the whole mapping as its input: not shown.
    got = f", got {error['input']!r}" if error["loc"] else ""
    plain = {
        "int_type": "expected a whole number",
        "float_type": "expected a number",
        "bool_type": "expected true or false",
        "string_type": "expected text",
        "tuple_type": "expected a list",
        "model_type": "expected a mapping of keys",
        "dict_type": "expected a mapping of keys",
    }
    if error["type"] in plain:
        return plain[error["type"]] + got
    if error["type"] == "value_error":
        return f"{error.get('ctx', {}).get('error', error['msg'])}{got}"
    if error["type"] == "string_pattern_mismatch":
        return f"must match {error.get('ctx', {}).get('pattern', '')}{got}"
    if error["type"] == "literal_error":
        return f"must be one of {error.get('ctx', {}).get('expected', '')}{got}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}{got}"


def _renamed_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Map keys renamed in 0.2 to their new names, with a warning (kept for one release)."""
    data = dict(data)
    for section, renames in DEPRECATED_KEYS.items():
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        values = dict(values)
        for old, new in renames.items():
            if old in values:
                log.warning("%s: %s.%s is deprecated; call it %s.%s", where, section, old, section, new)
                values.setdefault(new, values.pop(old))
        data[section] = values
    for path, removed in REMOVED_KEYS.items():
        values = data
        for key in path:
            values = values.get(key) if isinstance(values, dict) else None
        if not isinstance(values, dict):
            continue
        for old, why in removed.items():
            if old in values:
                log.warning("%s: %s.%s is no longer used and is ignored (%s)", where, ".".join(path), old, why)
                values.pop(old)
    return data


def load_config(path: str | Path | None) -> PipelineConfig:
    """Defaults, or the defaults updated by a YAML file; every value checked here, before any work."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    config = build(PipelineConfig, _renamed_keys(data, str(path)), str(path))
    if config.model and not Path(config.model).is_absolute():
        beside = path.parent / config.model  # a model name (zoo, hf:) stays a name unless a file here has it
        if beside.exists() or not is_model_name(config.model):
            config = config.model_copy(update={"model": str(beside.resolve())})
    for key in ("features", "mil"):  # relative to the file, as the model is
        value = getattr(config, key)
        if value and not Path(value).is_absolute():
            config = config.model_copy(update={key: str((path.parent / value).resolve())})
    return config


HUB_PREFIX = "hf:"  # --model hf:ORG/REPO[@REVISION]
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".onnx", ".ckpt")


def is_model_name(text: str) -> bool:
    """A model named rather than a path: ``hf:ORG/REPO``, or a bare word such as a WSInfer-zoo name
    (no folder separator, no checkpoint suffix); a file of that name, where one exists, still wins."""
    if text.startswith(HUB_PREFIX):
        return True
    return bool(text) and "/" not in text and os.sep not in text and not text.lower().endswith(CHECKPOINT_SUFFIXES)


def with_overrides(
    config: PipelineConfig,
    model: str | None = None,
    positive_class: str | None = None,
    features: str | None = None,
    mil: str | None = None,
    **sections: dict[str, Any],
) -> PipelineConfig:
    """Apply non-None command-line values, section by section (``tiling={"mpp": 0.5}``), validated."""
    data = config.model_dump()
    for key, value in (("model", model), ("positive_class", positive_class), ("features", features), ("mil", mil)):
        if value is not None:
            data[key] = value
    for name, values in sections.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown settings section {name!r}")
        _merge(data[name], values)
    return build(PipelineConfig, data, "command line")


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    """Non-None values into ``into``; nested sections (``{"qc": {"mode": "off"}}``) key by key."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif value is not None:
            into[key] = value
