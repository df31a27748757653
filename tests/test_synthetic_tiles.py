"""`train --synthetic DIR[:RATIO]`: generated tiles join the training split of their class up to the
cap, never validation; the model card records the mix; tiles of another class or scale are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.images import blob_image, write_blob_folder
from wsi_dala.cli import main
from wsi_dala.core.errors import ConfigError
from wsi_dala.model import read_card
from wsi_dala.training.datasets import Sample
from wsi_dala.training.synthetic_tiles import SyntheticSource, mix_synthetic, parse_synthetic_argument

PX = 64


def _synthetic_folder(root: Path, n: int, cls: str = "tumour", size: int = PX, mpp: float = 0.5) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        image, _ = blob_image(size, True, rng)
        Image.fromarray(image).save(root / f"gen{i:03d}.png")
    card = {"class": cls, "tile_size_px": size, "mpp": mpp, "generator": {"kind": "test blobs"}}
    (root / "synthetic.json").write_text(json.dumps(card))
    return root


def test_the_argument_takes_an_optional_ratio(tmp_path):
    assert parse_synthetic_argument("gen/tumour") == SyntheticSource(Path("gen/tumour"), 0.5)
    assert parse_synthetic_argument("gen/tumour:0.8") == SyntheticSource(Path("gen/tumour"), 0.8)
    with pytest.raises(ConfigError, match="RATIO must be in"):
        parse_synthetic_argument("gen:0")


def test_the_minority_is_filled_up_to_the_ratio_of_the_majority(tmp_path):
    folder = _synthetic_folder(tmp_path / "gen", 40)
    train = [Sample(f"n{i}.png", 0, "a") for i in range(30)] + [Sample(f"t{i}.png", 1, "b") for i in range(3)]
    mixed, record = mix_synthetic(train, ["normal", "tumour"], [SyntheticSource(folder)], 0.5, PX, seed=0)
    assert record[0]["added"] == 12 and len(mixed) == 45  # 0.5 x 30 = 15 tumour tiles
    assert sum(s.label == 1 for s in mixed) == 15 and mixed[:33] == train
    capped, record = mix_synthetic(train, ["normal", "tumour"], [SyntheticSource(folder, 2.0)], 0.5, PX, seed=0)
    assert record[0]["added"] == 40 and len(capped) == 73  # wants 57, the folder holds 40


def test_train_mixes_generated_tiles_into_training_only_and_records_it(tmp_path):
    data = write_blob_folder(tmp_path / "blobs", PX, 48)
    for path in sorted((data / "tumour").glob("*.png"))[6:]:  # 24 normal, 6 tumour
        path.unlink()
    folder = _synthetic_folder(tmp_path / "gen", 30)
    out = tmp_path / "run"
    argv = ["train", "--folder", str(data), "--out", str(out), "--arch", "resnet18", "--pretrained", "none"]
    argv += ["--input-size", str(PX), "--epochs", "1", "--batch-size", "8", "--mpp", "0.5", "-q"]
    assert main([*argv, "--synthetic", f"{folder}:0.5"]) == 0
    card = read_card(out / "best.safetensors")
    mix = card.training_data["synthetic"][0]
    counts = card.training_data["counts_train"]
    assert mix["class"] == "tumour" and mix["generator"] == {"kind": "test blobs"}
    assert mix["added"] == round(0.5 * counts["normal"]) - counts["tumour"] > 0
    summary = json.loads((out / "train.json").read_text())
    assert not any("synthetic" in group for group in summary["val_groups"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cls": "mitosis"}, "class 'mitosis', which is not in the data"),
        ({"mpp": 0.25}, "tiles are at 0.25 µm/px, the training tiles at 0.5 µm/px"),
        ({"size": 32}, "tiles are 32 px, smaller than the 64 px input"),
    ],
)
def test_generated_tiles_of_another_class_or_scale_are_refused(tmp_path, change, message):
    folder = _synthetic_folder(tmp_path / "gen", 4, **change)
    train = [Sample("n.png", 0, "a"), Sample("t.png", 1, "b")]
    with pytest.raises(ConfigError, match=message):
        mix_synthetic(train, ["normal", "tumour"], [SyntheticSource(folder)], 0.5, PX, seed=0)


def test_a_folder_without_its_card_or_a_training_set_of_unknown_scale_is_refused(tmp_path):
    train = [Sample("n.png", 0, "a"), Sample("t.png", 1, "b")]
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ConfigError, match=r"bare: no synthetic\.json"):
        mix_synthetic(train, ["normal", "tumour"], [SyntheticSource(bare)], 0.5, PX, seed=0)
    folder = _synthetic_folder(tmp_path / "gen", 4)
    with pytest.raises(ConfigError, match="unknown µm/px: the scale is unchecked; give --mpp"):
        mix_synthetic(train, ["normal", "tumour"], [SyntheticSource(folder)], None, PX, seed=0)
