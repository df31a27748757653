"""Scoring overlapped with tiling: the same numbers as one stage after the other, chunks scored while the
tiler still reads, and the sequential path wherever scoring needs the whole slide first."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig
from wsi_dala.runs.pipeline import run_slide
from wsi_dala.tiling.store import TileStore


def _run(slide, out, checkpoint, **scoring):
    config = PipelineConfig(
        model=str(checkpoint),
        tiling=TilingConfig(chunk_tiles=16),
        scoring=ScoringConfig(backend="torch", precision="fp32", **scoring),
    )
    summary = run_slide(slide.path, out, config, progress=False)
    store = TileStore(summary.layout.tiles_store)
    return summary.record, store.positive_scores(), store.cams()


@pytest.fixture(scope="module")
def sequential(svs_025, colour_checkpoint, tmp_path_factory):
    return _run(svs_025, tmp_path_factory.mktemp("sequential"), colour_checkpoint, overlap_tiling=False)


def test_overlapped_scoring_gives_the_sequential_numbers(svs_025, colour_checkpoint, sequential, tmp_path):
    record, scores, cams = _run(svs_025, tmp_path / "overlapped", colour_checkpoint)
    reference_record, reference_scores, reference_cams = sequential
    assert len(scores) > 100
    np.testing.assert_array_equal(scores, reference_scores)
    np.testing.assert_array_equal(cams, reference_cams)
    n_chunks = -(-len(scores) // 16)
    assert 1 <= record.scoring["chunks_scored_while_tiling"] <= n_chunks
    assert record.scoring["chunks_resumed"] == 0
    assert reference_record.scoring["chunks_scored_while_tiling"] == 0
    assert record.timings_s["tile_and_score"] <= record.timings_s["total"]


def test_stain_normalisation_waits_for_the_whole_slide(svs_025, colour_checkpoint, tmp_path):
    record, scores, _ = _run(svs_025, tmp_path / "stain", colour_checkpoint, stain_normalise="macenko")
    assert record.scoring["chunks_scored_while_tiling"] == 0  # the slide's stain is measured on all its tiles
    assert np.isfinite(scores).all()


def test_the_scoring_record_reaches_disk_in_one_write(svs_025, colour_checkpoint, tmp_path, monkeypatch):
    """A kill -9 between two writes of zarr.json must not leave "scores complete" without the record
    (zarr's attrs.update writes the file once per key: a batch resumed after such a kill failed)."""
    import zarr

    from wsi_dala.tiling.store_records import ScoringRecord

    _run(svs_025, tmp_path, colour_checkpoint, overlap_tiling=False)
    copy = tmp_path / "tiles.zarr"
    store = TileStore(copy, mode="r+")
    writes: list[str] = []
    original = zarr.storage.LocalStore.set

    async def counting_set(self, key, value):
        writes.append(key)
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    store.mark_scores_complete(ScoringRecord(["Non-tumor", "Tumor"], "Tumor", 7, "fp32", "none", 1.5))
    assert writes == ["zarr.json"]
    assert TileStore(copy).info.scoring == ScoringRecord(["Non-tumor", "Tumor"], "Tumor", 7, "fp32", "none", 1.5)
