"""What the release before the package moves wrote still loads and resumes (tests/data/release-0ea3cc1,
written by that release's own code): its checkpoint, its engine cache, a tile store it left half-finished,
and a finished batch, which a rerun leaves alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.test_cli_commands import ok, wsi_dala
from wsi_dala.core.config import TilingConfig
from wsi_dala.model import load_checkpoint, read_card
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import tile_slide

RELEASE = Path(__file__).parent / "data" / "release-0ea3cc1"
WRITTEN_AT = "/tmp/fx/release"  # where that release wrote them (absolute paths in its JSON and store attributes)
SETTINGS = {"chunk_tiles": 16, "reader_threads": 1}  # how the half-finished store was being tiled


@pytest.fixture
def release(tmp_path):
    """The fixture, moved to ``tmp_path`` as a user's folders are found after an upgrade: same files, the
    slide's modification time as it was (a changed time would be a changed slide), paths as they are here."""
    root = tmp_path / "release"
    shutil.copytree(RELEASE, root)
    for path in [*root.rglob("*.json"), root / "batch" / "report.md"]:
        path.write_text(path.read_text().replace(WRITTEN_AT, str(root)))
    half = zarr.open_group(root / "half" / "tiles.zarr", mode="r+")
    slide = dict(half.attrs["slide"])
    os.utime(root / "archive" / "case.svs", ns=(slide["mtime_ns"], slide["mtime_ns"]))
    half.attrs["slide"] = {**slide, "path": str(root / "archive" / "case.svs")}
    return root


def test_its_checkpoint_loads_with_the_same_card(release):
    card = read_card(release / "colour.safetensors")
    model, loaded = load_checkpoint(release / "colour.safetensors", "cpu")
    assert card.architecture == loaded.architecture == "colour-reference" and card.mpp == 1.0
    assert card.class_names == loaded.class_names and model is not None


def test_its_half_finished_tile_store_resumes(release, tmp_path):
    config = TilingConfig(**SETTINGS).resolved(1.0, 64)
    assert TileStore(release / "half" / "tiles.zarr").info.complete is False
    resumed = tile_slide(release / "archive" / "case.svs", release / "half", config, progress=False)
    assert resumed.chunks_resumed == 2 and TileStore(resumed.store).info.complete
    fresh = tile_slide(release / "archive" / "case.svs", tmp_path / "fresh", config, progress=False)
    np.testing.assert_array_equal(TileStore(resumed.store).coords(), TileStore(fresh.store).coords())
    np.testing.assert_array_equal(
        TileStore(resumed.store).tiles(slice(None)), TileStore(fresh.store).tiles(slice(None))
    )


def test_its_batch_is_left_alone_and_its_engine_cache_reused(release):
    onnx = next((release / "colour.safetensors.engines").glob("*.onnx"))
    exported = (onnx.read_bytes(), onnx.stat().st_mtime_ns)
    before = json.loads((release / "batch" / "batch.json").read_text())
    result = ok(wsi_dala("batch", release / "archive", "--model", release / "colour.safetensors", "--out",
                         release / "batch", "-q"))  # fmt: skip
    assert "damaged" not in result.stderr and "rebuil" not in result.stderr, result.stderr
    after = json.loads((release / "batch" / "batch.json").read_text())
    assert after["counts"] == {"skipped": 1}, "a finished slide is skipped, as after any batch"
    (slide,) = after["slides"]
    assert slide["runs"] == before["slides"][0]["runs"] == 1, "the finished slide was run again"
    assert (onnx.read_bytes(), onnx.stat().st_mtime_ns) == exported
