"""The tile store's records: what was cut, how quality was judged and what scored it, as typed frozen
dataclasses written to (and read back from) ``tiles.zarr``'s attributes. The array names, the other
attribute keys and the reads and writes are in :mod:`wsi_dala.tiling.store`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_dala.core.errors import OutputError

if TYPE_CHECKING:
    pass


QC_ATTRIBUTE = "qc"  # the attribute QCRecord is written under


@dataclass(frozen=True)
class SlideRecord:
    """The slide a store was cut from, as it was when it was cut."""

    path: str
    name: str
    width: int  # level-0 px, QuPath's frame
    height: int
    vendor: str | None
    objective_power: float | None
    bounds_offset: tuple[int, int]
    fingerprint: dict[str, Any]  # wsi_dala.core.identity.slide_fingerprint: size, mtime, header hash


@dataclass(frozen=True)
class TilingRecord:
    """How the tiles were cut; written once when the store is created."""

    slide: SlideRecord
    reader: str
    slide_mpp: float
    mpp_source: str
    target_mpp: float
    effective_mpp: float
    level: int
    level_mpp: float
    level_downsample: float
    read_size_level_px: int
    resize_factor: float
    tile_size_px: int
    tile_size_l0: float
    stride_px: int
    stride_l0: float
    min_tissue: float
    tissue: dict[str, Any]
    mask_downsample: float
    grid_tiles: int
    tiling_key: str
    software: dict[str, str] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        attrs = asdict(self)
        slide = attrs.pop("slide")
        fingerprint = slide.pop("fingerprint")
        attrs["slide"] = {**slide, **fingerprint, "bounds_offset": list(self.slide.bounds_offset)}
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TilingRecord:
        slide_attrs = dict(attrs["slide"])
        slide_names = {f.name for f in fields(SlideRecord)} - {"fingerprint"}
        slide = SlideRecord(
            **{k: v for k, v in slide_attrs.items() if k in slide_names and k != "bounds_offset"},
            bounds_offset=(int(slide_attrs["bounds_offset"][0]), int(slide_attrs["bounds_offset"][1])),
            fingerprint={k: v for k, v in slide_attrs.items() if k not in slide_names},
        )
        names = {f.name for f in fields(cls)} - {"slide"}
        return cls(slide=slide, **{k: attrs[k] for k in names if k in attrs})


@dataclass(frozen=True)
class QCMasks:
    """What the low-resolution image showed besides tissue, per tile and as masks (tissue_mask's grid)."""

    ink_fraction: np.ndarray  # [N]
    fold_fraction: np.ndarray  # [N]
    ink_mask: np.ndarray  # [h, w] bool
    fold_mask: np.ndarray  # [h, w] bool


@dataclass(frozen=True)
class QCRecord:
    """How the tiles' quality was judged and what was found; written when tiling completes."""

    mode: str  # flag | exclude | off
    counts: dict[str, int]  # tiles flagged per reason ("blur", "fold", "ink"), with any flag ("any"), and
    # tiles whose focus could not be judged ("blur_not_judged": too few edges, e.g. glass or smooth stain)
    areas_um2: dict[str, float]  # "tissue", "ink", "fold" (from the masks), "blur" (tissue of blurred tiles)
    excluded_tiles: dict[str, int]  # exclude mode: flagged tiles left out of the later stages, per reason
    glass_rgb: list[float]
    settings: dict[str, Any]
    median_edge_blur_um: float | None = None  # over the slide's judged parts; None: not measured (off, no tiles)
    warning: str | None = None  # e.g. QC flags almost every tile: the slide itself needs a look

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str = "tile store") -> QCRecord | None:
        data = attrs.get(QC_ATTRIBUTE)
        if not isinstance(data, dict):
            return None
        dicts = ("counts", "areas_um2", "excluded_tiles", "settings")
        if data.get("mode") not in ("flag", "exclude", "off") or not all(isinstance(data.get(k), dict) for k in dicts):
            raise OutputError(f"{where}: its QC record is damaged (mode or counts missing); tile the slide again")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ScoringRecord:
    """What scored the tiles; written when scoring completes."""

    class_names: list[str]
    positive_class: str
    cam_grid: int  # the Grad-CAM map of a tile is cam_grid x cam_grid cells
    precision: str
    uncertainty: str = "none"  # how score_sd was measured: none | tta:flips | tta:d4 | mc-dropout:N | both, joined by +
    temperature: float | None = None  # the model card's temperature the probabilities were scaled with (None: T = 1)
    has_cams: bool = True  # False: the model has no feature map; ``cams`` holds NaN and the heatmap uses p alone

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)


@dataclass(frozen=True)
class StoreInfo:
    """Everything a stage needs to know about a store, read once from its attributes."""

    n_tiles: int
    chunk_tiles: int
    complete: bool
    tiling: TilingRecord
    scoring: ScoringRecord | None  # None until every tile is scored
    qc: QCRecord | None = None  # None until tiling completes
    stain: dict[str, Any] | None = None  # wsi_dala.tissue.stain.StainProfile.to_dict() of the slide; None: not measured

    @property
    def tile_size_px(self) -> int:
        return int(self.tiling.tile_size_px)

    @property
    def tile_size_l0(self) -> float:
        return float(self.tiling.tile_size_l0)

    @property
    def slide_mpp(self) -> float:
        return float(self.tiling.slide_mpp)

    @property
    def n_chunks(self) -> int:
        return n_chunks_of(self.n_tiles, self.chunk_tiles)

    def chunk_rows(self) -> list[slice]:
        """Row slices of the chunks, in order (the unit of writing, scoring and streaming)."""
        step = self.chunk_tiles
        return [slice(start, min(self.n_tiles, start + step)) for start in range(0, self.n_tiles, step)]

    def require_scores(self, where: str) -> ScoringRecord:
        if self.scoring is None:
            raise OutputError(f"{where}: tiles are not scored yet; run scoring first")
        return self.scoring


def n_chunks_of(n: int, chunk: int) -> int:
    return (n + chunk - 1) // chunk
