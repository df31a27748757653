"""Settings are checked on the types, before any work: every key of the shipped YAML, good and bad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsi_dala.core.config import PipelineConfig, load_config, with_overrides
from wsi_dala.core.errors import ConfigError

DEFAULT_YAML = Path(__file__).parent.parent / "pipelines" / "default.yaml"

# Per key: a good value that differs from the default, and a bad one (wrong type or out of range).
VALUES = {
    "model": ("model.safetensors", 3),
    "features": ("features.zarr", 3),
    "mil": ("mil.safetensors", 3),
    "tiling.mpp": (1.0, -0.5),
    "tiling.tile_size_px": (128, 4),
    "tiling.stride_px": (64, 0),
    "tiling.min_tissue": (0.5, 1.5),
    "tiling.allow_upsample": (True, "yes"),
    "tiling.reader": ("openslide", "bioformats"),
    "tiling.slide_mpp": (0.25, 0),
    "tiling.reader_threads": (4, 0),
    "tiling.tolerance": (0.1, 2.0),
    "tiling.chunk_tiles": (32, 0),
    "tiling.region_level_px": (1024, 8),
    "tiling.tissue.mask_mpp": (4.0, 0),
    "tiling.tissue.min_saturation": (0.1, 1.5),
    "tiling.tissue.glass_noise_factor": (2.0, -1.0),
    "tiling.tissue.max_brightness": (0.95, 0.0),
    "tiling.tissue.min_tissue_area_um2": (5000.0, -1.0),
    "tiling.tissue.min_hole_area_um2": (5000.0, "big"),
    "tiling.tissue.min_ink_area_um2": (5000.0, 0.0),
    "tiling.tissue.ink_margin_um": (10.0, -5.0),
    "tiling.tissue.fold_od_ratio": (1.8, 1.0),
    "tiling.tissue.min_fold_area_um2": (10000.0, -1.0),
    "tiling.qc.mode": ("exclude", "drop"),
    "tiling.qc.max_edge_blur_um": (0.6, 0.0),
    "tiling.qc.max_blur_fraction": (0.7, 0.0),
    "tiling.qc.max_fold_fraction": (0.5, 1.5),
    "tiling.qc.max_ink_fraction": (0.2, -0.1),
    "scoring.stain_normalise": ("macenko", "vahadane"),
    "scoring.batch_size": (16, "many"),
    "scoring.precision": ("int8", "fp64"),
    "scoring.backend": ("onnxruntime", "tensorrt"),
    "scoring.int8_calibration": ("other/tiles.zarr", 5),
    "scoring.int8_calibration_tiles": (32, 0),
    "scoring.overlap_tiling": (False, "sometimes"),
    "scoring.device": ("cuda:1", "gpu"),
    "scoring.devices": ("all", "some"),
    "scoring.scheduler": ("tcp://127.0.0.1:8786", 8786),
    "scoring.connect_timeout_s": (5.0, 0),
    "scoring.wave": (2, 0),
    "scoring.tta": ("d4", "rotations"),
    "scoring.mc_dropout": (10, 1),
    "heatmap.cam_scale_percentile": (10.0, 101),
    "heatmap.positive_threshold": (0.7, -0.1),
    "heatmap.border_correction": (False, "yes"),
    "heatmap.min_level_px": (32, 0),
    "heatmap.min_cell_tissue": (0.2, 2),
    "export.tile_threshold": (0.6, 1.01),
    "export.region_thresholds": ([0.3, 0.6], [0.5, 1.5]),
    "export.min_region_area_um2": (0.0, -1.0),
    "export.simplify_cells": (0.5, -0.1),
    "export.gzip": (True, "no"),
    "export.cam_threshold_method": ("otsu", "median"),
    "export.dicom": (True, "maybe"),
}


def _keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        keys += _keys(value, f"{name}.") if isinstance(value, dict) else [name]
    return keys


def _write(tmp_path: Path, dotted: str, value: object) -> Path:
    *sections, key = dotted.split(".")
    data: dict = {}
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _get(config: PipelineConfig, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_every_shipped_key_is_tested():
    assert sorted(_keys(yaml.safe_load(DEFAULT_YAML.read_text()))) == sorted(VALUES)


@pytest.mark.parametrize("dotted", sorted(VALUES))
def test_each_key_takes_a_good_value_and_refuses_a_bad_one(tmp_path, dotted):
    good, bad = VALUES[dotted]
    config = load_config(_write(tmp_path, dotted, good))
    loaded = _get(config, dotted)
    if dotted in ("model", "features", "mil"):  # paths relative to the config file
        assert loaded == str((tmp_path / good).resolve())
    else:
        assert loaded == (tuple(good) if isinstance(good, list) else good)
    with pytest.raises(ConfigError, match=rf"config.yaml.{dotted}"):
        load_config(_write(tmp_path, dotted, bad))


def test_misspelt_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("export:\n  cam_treshold_method: otsu\n")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml.export: unknown key\(s\) cam_treshold_method \(did you mean cam_threshold_method\?",
    ):
        load_config(path)
    path.write_text("scoring:\n  batch_size: 8\nheatmaps:\n  min_level_px: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) heatmaps \(did you mean heatmap\?"):
        load_config(path)


def test_renamed_keys_still_load_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("tiling:\n  workers: 3\n  tile_size: 96\n  stride: 48\nexport:\n  cam_threshold: otsu\n")
    config = load_config(path)
    assert (config.tiling.reader_threads, config.tiling.tile_size_px, config.tiling.stride_px) == (3, 96, 48)
    assert config.export.cam_threshold_method == "otsu"
    assert "tiling.workers is deprecated; call it tiling.reader_threads" in caplog.text


def test_removed_qc_keys_load_ignored_with_a_warning(tmp_path, caplog):
    """The slide-median blur rule is gone: a config that tuned it still loads, and says what replaced it."""
    path = tmp_path / "old.yaml"
    path.write_text("tiling:\n  qc:\n    blur_drop: 0.4\n    blur_floor: 0.1\n    max_blur_fraction: 0.6\n")
    config = load_config(path)
    assert config.tiling.qc.max_blur_fraction == 0.6
    assert "tiling.qc.blur_drop is no longer used and is ignored" in caplog.text
    assert "max_edge_blur_um" in caplog.text


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    path = tmp_path / "config.yaml"
    path.write_text(f"tiling:\n  mpp: {value}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml\.tiling\.mpp: input should be a finite number"):
        load_config(path)


def test_command_line_values_are_validated_too():
    with pytest.raises(ConfigError, match=r"command line.tiling.min_tissue"):
        with_overrides(PipelineConfig(), tiling={"min_tissue": 3.0})
    assert (
        with_overrides(PipelineConfig(), model="m", scoring={"batch_size": 8, "device": None}).scoring.batch_size == 8
    )


def test_bad_config_fails_before_the_slide_or_torch(tmp_path):
    """`wsi-dala run --config bad.yaml` on a slide that does not exist: the config error comes first."""
    path = tmp_path / "bad.yaml"
    path.write_text("export:\n  cam_threshold_method: typo\n")
    code = (
        "import sys\n"
        "from wsi_dala.cli import main\n"
        f"rc = main(['run', {str(tmp_path / 'missing.svs')!r}, '--config', {str(path)!r}, '-q'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported before the settings were checked'\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml.export.cam_threshold_method: must be one of" in lines[0]
    assert "missing.svs" not in lines[0]


def test_train_settings_are_checked_before_any_data_is_read(tmp_path, capsys):
    from wsi_dala.cli import main

    missing = tmp_path / "no-such-folder"
    code = main(["train", "--out", str(tmp_path / "run"), "--folder", str(missing), "--beta", "1.5", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "command line.beta: input should be less than 1" in err and str(missing) not in err
    assert not (tmp_path / "run").exists()


def _unbounded_numbers(model: type) -> list[str]:
    """The numeric fields of a settings model (and the models inside it) with no upper bound."""
    schema = model.model_json_schema()
    definitions = schema.get("$defs", {})
    found: list[str] = []

    def walk(properties: dict, prefix: str) -> None:
        for name, spec in properties.items():
            for option in spec.get("anyOf", [spec]):
                if "$ref" in option:
                    walk(definitions[option["$ref"].rsplit("/", 1)[1]]["properties"], f"{prefix}{name}.")
                elif option.get("type") in ("integer", "number") and not {"maximum", "exclusiveMaximum"} & set(option):
                    found.append(prefix + name)

    walk(schema["properties"], "")
    return found


def test_every_numeric_setting_has_an_upper_bound():
    from wsi_dala.core import config

    models = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, config.Settings)]
    assert len(models) >= 10
    assert {m.__name__: _unbounded_numbers(m) for m in models if _unbounded_numbers(m)} == {}


def test_a_huge_chunk_is_refused_before_it_is_allocated(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("tiling:\n  chunk_tiles: 1000000000\n")
    with pytest.raises(ConfigError, match=r"config.yaml.tiling.chunk_tiles: input should be less than or equal to"):
        load_config(path)
