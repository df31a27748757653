"""Pipeline configuration: a YAML file (``pipelines/default.yaml`` documents every key), validated.

Precedence: built-in defaults < the YAML file < command-line flags. Unknown keys and wrong types are
errors that name the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsi_dala.errors import ConfigError
from wsi_dala.export import ExportConfig
from wsi_dala.heatmap import HeatmapConfig
from wsi_dala.scoring import PRECISIONS, ScoringConfig


@dataclass(frozen=True)
class TilingSection:
    mpp: float | None = None  # None: the model card's µm/px
    tile_size: int | None = None  # None: the model card's tile size
    stride: int | None = None
    min_tissue: float = 0.25
    allow_upsample: bool = False
    reader: str = "auto"
    slide_mpp: float | None = None
    workers: int = 2


@dataclass(frozen=True)
class PipelineConfig:
    model: str | None = None  # checkpoint path; relative paths are relative to the config file
    tiling: TilingSection = field(default_factory=TilingSection)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint (the few forms our dataclasses use)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def load_config(path: str | Path | None) -> PipelineConfig:
    """Defaults, or the defaults updated by a YAML file."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    config = _build(PipelineConfig, data, str(path))
    if config.model and not Path(config.model).is_absolute():
        config = dataclasses.replace(config, model=str((path.parent / config.model).resolve()))
    validate(config, str(path))
    return config


def validate(config: PipelineConfig, where: str = "configuration") -> None:
    """Ranges and choices (types were checked while building)."""
    checks = [
        (config.tiling.mpp is None or config.tiling.mpp > 0, "tiling.mpp must be positive"),
        (config.tiling.tile_size is None or config.tiling.tile_size >= 8, "tiling.tile_size must be at least 8"),
        (0 <= config.tiling.min_tissue <= 1, "tiling.min_tissue must be between 0 and 1"),
        (config.tiling.reader in ("auto", "openslide", "tiffslide"), "tiling.reader: auto, openslide or tiffslide"),
        (config.scoring.batch_size >= 1, "scoring.batch_size must be at least 1"),
        (config.scoring.precision in PRECISIONS, f"scoring.precision must be one of {PRECISIONS}"),
        (0 <= config.export.tile_threshold <= 1, "export.tile_threshold must be between 0 and 1"),
        (all(0 < t <= 1 for t in config.export.region_thresholds), "export.region_thresholds must be in (0, 1]"),
        (config.export.min_region_area_um2 >= 0, "export.min_region_area_um2 must not be negative"),
        (0 <= config.heatmap.cam_scale_percentile <= 100, "heatmap.cam_scale_percentile must be 0-100"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")


def with_overrides(config: PipelineConfig, **sections: dict[str, Any]) -> PipelineConfig:
    """Apply non-None command-line values, section by section (``tiling={"mpp": 0.5}``)."""
    updates: dict[str, Any] = {}
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        if name == "model":
            updates["model"] = values["path"]
        else:
            updates[name] = dataclasses.replace(getattr(config, name), **values)
    result = dataclasses.replace(config, **updates)
    validate(result, "command line")
    return result
