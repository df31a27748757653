"""Data sources and splits: BreakHis naming, image folders, patient/slide-level splits."""

from __future__ import annotations

import numpy as np
import pytest

from tests.images import BREAKHIS_PATIENTS, write_blob_folder, write_breakhis_tree
from wsi_dala.core.errors import ConfigError
from wsi_dala.training.datasets import breakhis_samples, image_folder_samples
from wsi_dala.training.splits import group_split, read_breakhis_fold


def test_breakhis_parsing_uses_the_real_naming_scheme(tmp_path):
    root = write_breakhis_tree(tmp_path, per_magnification=2)
    samples = breakhis_samples(root)
    assert len(samples) == len(BREAKHIS_PATIENTS) * 4 * 2
    first = next(s for s in samples if "22549AB" in s.source and s.magnification == "40X")
    assert first.group == "SOB_B_A-14-22549AB" and first.label == 0
    assert {s.magnification for s in samples} == {"40X", "100X", "200X", "400X"}
    assert {s.label for s in samples if s.group.startswith("SOB_M_")} == {1}
    only_100 = breakhis_samples(root, "100X")
    assert len(only_100) == len(BREAKHIS_PATIENTS) * 2 and {s.magnification for s in only_100} == {"100X"}
    with pytest.raises(ConfigError):
        breakhis_samples(root, "60X")


def test_breakhis_label_mismatch_is_an_error(tmp_path):
    root = write_breakhis_tree(tmp_path, per_magnification=1)
    wrong = next(root.rglob("SOB_B_A-14-22549AB-40-001.png"))
    wrong.rename(wrong.with_name("SOB_M_A-14-22549AB-40-001.png"))
    with pytest.raises(ConfigError, match="folder says benign"):
        breakhis_samples(root)


def test_breakhis_fold_file(tmp_path):
    fold = tmp_path / "dsfold1.txt"
    fold.write_text("SOB_B_A-14-22549AB-40-001.png|40|1|train\nSOB_M_DC-14-2523-40-001.png|40|1|test\n")
    assert read_breakhis_fold(fold) == {"SOB_B_A-14-22549AB-40-001.png": "train", "SOB_M_DC-14-2523-40-001.png": "test"}
    fold.write_text("garbage line\n")
    with pytest.raises(ConfigError, match=r"dsfold1\.txt:1"):
        read_breakhis_fold(fold)


@pytest.mark.parametrize("seed", range(5))
def test_group_split_never_shares_a_group(seed):
    rng = np.random.default_rng(seed)
    groups = [f"patient{g}" for g in rng.integers(0, 15, 300)]
    labels = [int(g[-1]) % 2 for g in groups]
    train, val = group_split(labels, groups, val_fraction=0.2, seed=seed)
    assert len(train) + len(val) == 300 and set(train).isdisjoint(val)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert {labels[i] for i in val} == {0, 1}
    with pytest.raises(ConfigError, match="at least 2"):
        group_split([0, 1], ["same", "same"])


def test_image_folder_groups(tmp_path):
    root = write_blob_folder(tmp_path / "tiles", size=16, n=12, groups=4)
    samples, names = image_folder_samples(root)
    assert names == ["normal", "tumour"]
    assert {s.group for s in samples} == {"slide0", "slide1", "slide2", "slide3"}
    nested = tmp_path / "nested" / "tumour" / "slideX"
    nested.mkdir(parents=True)
    (tmp_path / "nested" / "normal" / "slideY").mkdir(parents=True)
    for folder in (nested, tmp_path / "nested" / "normal" / "slideY"):
        (folder / "a.png").write_bytes((root / "normal" / "slide0_0.png").read_bytes())
    samples, _ = image_folder_samples(tmp_path / "nested")
    assert {s.group for s in samples} == {"slideX", "slideY"}
