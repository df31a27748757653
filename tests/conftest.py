"""Shared fixtures: real slide files written by the synthetic slide generator (tifffile).

Each slide is written once per test session; all are small so the suite stays quick.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.images import write_blob_folder
from wsi_dala.core.config import TrainConfig
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.datasets import image_folder_samples
from wsi_dala.training.splits import group_split
from wsi_dala.training.train import train_model


def _share_the_cores_between_test_workers() -> None:
    """Under pytest-xdist each worker (and every process it starts) gets its share of the cores: two
    workers each running torch on every core fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, share)  # for the processes tests start
    import torch  # already imported (training fixtures), so its thread count is set, not read from the environment

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores_between_test_workers()

# The files that take longest (seconds under two workers, from --durations), first: under `--dist loadfile` a
# long file handed out last keeps one worker busy while the other idles.
LONGEST_FILES_FIRST = (
    "test_hostile.py",  # ~300 s: kills, full disks, hostile inputs, each through the console script
    "test_demo.py",  # ~170 s: the README's demo
    "test_archive.py",  # ~180 s: batches, kills, a real Dask cluster
    "test_cli_commands.py",  # ~110 s
    "test_engines.py",
    "test_model_hub.py",
    "test_calibration.py",
    "test_cam.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


# Training settings that learn the generated data in seconds on a CPU.
QUICK = dict(pretrained="none", lr_backbone=1e-3, batch_size=16, precise_bn_batches=8)


def _slide(tmp_path_factory: pytest.TempPathFactory, name: str, **spec):
    folder = tmp_path_factory.mktemp("slides")
    return write_synthetic_slide(folder / name, SyntheticSlideSpec(**spec))


@pytest.fixture(scope="session")
def svs_025(tmp_path_factory):
    """Aperio SVS, 0.25 µm/px (40x), JPEG tiles, levels at downsample 4."""
    return _slide(tmp_path_factory, "aperio_025.svs", width=6144, height=4608, mpp=0.25, seed=1)


@pytest.fixture(scope="session")
def svs_050(tmp_path_factory):
    """Aperio SVS, 0.5 µm/px (20x)."""
    return _slide(tmp_path_factory, "aperio_050.svs", width=4096, height=3072, mpp=0.5, app_mag=20, seed=2)


@pytest.fixture(scope="session")
def tiff_generic(tmp_path_factory):
    """Generic pyramidal TIFF with resolution tags (pixels per centimetre) and no vendor metadata."""
    return _slide(tmp_path_factory, "generic.tif", width=4096, height=3072, mpp=0.5, layout="tiff", seed=3)


@pytest.fixture(scope="session")
def single_level_no_mpp(tmp_path_factory):
    """A single-level TIFF without µm/px or objective power."""
    return _slide(tmp_path_factory, "bare.tif", width=2048, height=1536, layout="single", write_mpp=False, seed=4)


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory):
    """An SVS of empty glass: no tissue at all."""
    return _slide(
        tmp_path_factory,
        "blank.svs",
        width=2048,
        height=1536,
        seed=5,
        tissue_fraction=0.0,
        tumour_regions=0,
        pen_marks=False,
        debris=False,
    )


@pytest.fixture(scope="session")
def colour_checkpoint(tmp_path_factory):
    """The transparent colour reference scorer (tumour colour -> probability), 64 px at 1 µm/px."""
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.model.colour import CLASS_NAMES

    path = tmp_path_factory.mktemp("model") / "colour.safetensors"
    return write_untrained_checkpoint(
        path, "colour-reference", tile_size_px=64, mpp=1.0, class_names=tuple(CLASS_NAMES), note="reference scorer"
    )


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="session")
def blob_model(tmp_path_factory):
    """DALAResNet50 trained from scratch on 96-px blob images (tumour = blob present)."""
    root = write_blob_folder(tmp_path_factory.mktemp("blobs"), size=96, n=160)
    samples, names = image_folder_samples(root)
    train, val = group_split([s.label for s in samples], [s.group for s in samples], 0.34, seed=0)
    out = tmp_path_factory.mktemp("run")
    result = train_model(
        [samples[i] for i in train],
        [samples[i] for i in val],
        names,
        "tumour",
        TrainConfig(input_size=96, epochs=3, **QUICK),
        out,
        {"mpp": 0.5, "mpp_note": "test"},
        progress=False,
    )
    return result, out


@pytest.fixture(autouse=True)
def _environ_restored():
    """A test that starts a Dask cluster itself gets distributed's pre-spawn-environ (OMP_NUM_THREADS=1...)
    written into this process's environment, which every later CLI test would inherit: restore it."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
