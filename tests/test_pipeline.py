"""`wsi-dala run` end to end with the transparent colour reference scorer: exact answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.qupath_rules import check_file, check_groovy_script_fits
from wsi_dala.cli import main
from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig, load_config
from wsi_dala.core.errors import ConfigError
from wsi_dala.inference.scoring import score_store
from wsi_dala.runs.pipeline import run_slide
from wsi_dala.runs.truth import tumour_iou
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import SCORE_CHUNKS_DONE, SCORES, TileStore


def _slide(tmp_path_factory, mpp, width, height):
    folder = tmp_path_factory.mktemp(f"slide{mpp}")
    spec = SyntheticSlideSpec(
        width=width, height=height, mpp=mpp, seed=3, label_px=int(4 / mpp), app_mag=round(10 / mpp)
    )
    return write_synthetic_slide(folder / f"planted_{mpp}.svs", spec)


@pytest.fixture(scope="session")
def planted_025(tmp_path_factory):
    return _slide(tmp_path_factory, 0.25, 8192, 6144)


@pytest.fixture(scope="session")
def planted_050(tmp_path_factory):
    return _slide(tmp_path_factory, 0.5, 4096, 3072)


def _config(checkpoint, **scoring):
    return PipelineConfig(model=str(checkpoint), tiling=TilingConfig(min_tissue=0.05), scoring=ScoringConfig(**scoring))


@pytest.mark.parametrize("fixture", ["planted_025", "planted_050"])
def test_exported_regions_match_planted_tumour(request, tmp_path, colour_checkpoint, fixture):
    slide = request.getfixturevalue(fixture)
    summary = run_slide(slide.path, tmp_path, _config(colour_checkpoint), progress=False)
    # 0.95 with the layer p x CAM, whose regions only this scorer (an exact CAM) suits; the tumour layer weighs
    # the CAM against the interpolated probability instead (wsi_dala.outputs.tumour_layer), as learned models need
    assert tumour_iou(slide, summary.layout.tumour_geojson()) >= 0.88
    tiles = check_file(summary.layout.tiles_geojson())
    regions = check_file(summary.layout.tumour_geojson())
    assert len(tiles) == summary.record.counts.tiles and regions
    assert {f["properties"]["classification"]["name"] for f in tiles} == {"Tumor", "Non-tumor"}
    record = json.loads(summary.layout.run_json.read_text())
    assert record["status"] == "complete" and record["resolution"]["tile_mpp"] == pytest.approx(1.0)
    assert record["resolution"]["slide_mpp_source"] == "vendor"
    assert set(record["timings_s"]) == {"tile", "score", "tile_and_score", "stitch", "export", "total"}
    for path in record["outputs"].values():
        assert (summary.layout.root / path).exists() or __import__("pathlib").Path(path).exists()
    check_groovy_script_fits(summary.layout.run_json)
    heatmap = zarr.open_group(summary.layout.heatmap_store, mode="r")
    levels = heatmap.attrs["levels"]
    assert levels[0]["mpp"] == pytest.approx(heatmap.attrs["cell_mpp"]) and len(levels) >= 2
    layer = np.asarray(heatmap["tumour/0"][:])
    assert np.isnan(layer).any() and np.nanmax(layer) <= 1.0


def test_rerun_does_no_work_and_changes_rerun(tmp_path, colour_checkpoint, planted_050):
    config = _config(colour_checkpoint)
    first = run_slide(planted_050.path, tmp_path, config, progress=False)
    before = first.layout.run_json.read_text()
    again = run_slide(planted_050.path, tmp_path, config, progress=False)
    assert again.skipped and first.layout.run_json.read_text() == before
    changed = config.model_copy(update={"tiling": config.tiling.model_copy(update={"min_tissue": 0.5})})
    third = run_slide(planted_050.path, tmp_path, changed, progress=False)
    assert not third.skipped and third.record.counts.tiles < first.record.counts.tiles


def test_interrupted_scoring_resumes(tmp_path, colour_checkpoint, planted_050):
    summary = run_slide(planted_050.path, tmp_path, _config(colour_checkpoint), progress=False)
    store = TileStore(summary.layout.tiles_store, mode="r+").group
    reference = np.asarray(store[SCORES][:])
    done = np.asarray(store[SCORE_CHUNKS_DONE][:])
    assert done.all() and len(done) >= 3
    # As if the run had died after the first chunk: later chunks neither marked nor written.
    done[1:] = False
    store[SCORE_CHUNKS_DONE][:] = done
    store[SCORES][64:] = np.nan
    result = score_store(summary.layout.tiles_store, colour_checkpoint, ScoringConfig(), progress=False)
    assert result.chunks_resumed == 1 and not result.skipped
    np.testing.assert_array_equal(np.asarray(store[SCORES][:]), reference)


def test_distributed_cluster_gives_the_local_scores(tmp_path, colour_checkpoint, planted_050):
    from distributed import Client, LocalCluster

    local = run_slide(
        planted_050.path, tmp_path / "local", _config(colour_checkpoint, precision="fp32"), progress=False
    )
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        remote = run_slide(
            planted_050.path,
            tmp_path / "cluster",
            _config(colour_checkpoint, precision="fp32", scheduler=cluster.scheduler_address),
            progress=False,
        )
        workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2
    a = TileStore(local.layout.tiles_store).scores()
    b = TileStore(remote.layout.tiles_store).scores()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        TileStore(local.layout.tiles_store).cams(),
        TileStore(remote.layout.tiles_store).cams(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_the_run_path_does_each_thing_once(tmp_path, colour_checkpoint, planted_050, monkeypatch):
    """One run hashes the checkpoint once, chooses the slide's level once, builds its layout once and gets its
    Dask client from one place (the run, not scoring)."""
    import wsi_dala.core.identity as identity
    import wsi_dala.inference.cluster as cluster
    import wsi_dala.runs.pipeline as pipeline
    import wsi_dala.tiling.tiler as tiler
    from wsi_dala.core.layout import RunLayout

    calls: dict[str, int] = {"hash": 0, "level": 0, "layout": 0, "client": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    real_hash = identity.file_sha256
    monkeypatch.setattr(
        identity, "file_sha256", lambda path: counted("hash", real_hash)(path) if Path(path).suffix == ".safetensors"
        else real_hash(path),
    )  # fmt: skip
    monkeypatch.setattr(tiler, "choose_level", counted("level", tiler.choose_level))
    monkeypatch.setattr(RunLayout, "for_slide", classmethod(counted("layout", RunLayout.for_slide.__func__)))
    monkeypatch.setattr(pipeline, "scoring_client", counted("client", cluster.scoring_client))
    run_slide(planted_050.path, tmp_path, _config(colour_checkpoint), progress=False)
    assert calls == {"hash": 1, "level": 1, "layout": 1, "client": 1}, calls


def test_config_is_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  min_tisue: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.tiling: unknown key\(s\) min_tisue"):
        load_config(bad)
    bad.write_text("scoring:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size: expected a whole number"):
        load_config(bad)
    bad.write_text("export:\n  region_thresholds: [0.5, 1.5]\n")
    with pytest.raises(ConfigError, match="region_thresholds"):
        load_config(bad)


def test_shipped_default_config_loads_and_matches_defaults():
    from pathlib import Path

    shipped = load_config(Path(__file__).parent.parent / "pipelines" / "default.yaml")
    assert shipped.model_copy(update={"model": None}) == PipelineConfig()


def test_run_without_model_says_how_to_get_one(tmp_path, capsys, planted_050, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a demo run in the working folder would be named instead
    code = main(["run", str(planted_050.path), "--out", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "wsi-dala demo" in err and err.count("\n") == 1


def test_run_cli_prints_outputs(tmp_path, capsys, colour_checkpoint, planted_050):
    code = main(
        [
            "run",
            str(planted_050.path),
            "--model",
            str(colour_checkpoint),
            "--out",
            str(tmp_path),
            "--min-tissue",
            "0.05",
            "--gzip",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "planted_0.5.tiles.geojson.gz" in out and "overlay.png" in out
    check_file(tmp_path / "planted_0.5.tiles.geojson.gz")


@pytest.mark.slow
def test_run_on_a_dicom_wsi_made_from_real_he_gives_the_svs_scores(colour_checkpoint, tmp_path):
    """The real CMU-1 crop written as a two-level DICOM WSI (JPEG frames, re-encoded at quality 95): `run`
    given one of its .dcm files (the thumbnail level, even) runs the series as one slide, named by its
    folder, and scores the tiles as the SVS run does."""
    import subprocess
    import sys

    from PIL import Image
    from scipy.stats import spearmanr

    from tests.dicom_wsi import write_dicom_wsi
    from wsi_dala.slides.reader import Slide

    svs = Path(__file__).parent / "data" / "cmu_small_region.svs"
    with Slide(svs) as slide:
        rgb = slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
        mpp = slide.require_mpp().mpp
    folder = tmp_path / "cmu-dicom"
    files = write_dicom_wsi([rgb, np.asarray(Image.fromarray(rgb).reduce(4))], mpp, folder)
    runs = {}
    for name, source in (("svs", svs), ("dicom", files[1])):
        out = tmp_path / name
        cli = [sys.executable, "-m", "wsi_dala", "run", str(source), "--model", str(colour_checkpoint), "-q"]
        done = subprocess.run([*cli, "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        store = zarr.open_group(out / "tiles.zarr", mode="r")
        runs[name] = ({tuple(c): i for i, c in enumerate(store["coords"][:])}, store["scores"][:, 1], out)
    record = json.loads((tmp_path / "dicom" / "run.json").read_text())
    assert Path(record["slide"]["path"]).name == "cmu-dicom"  # the series, not the file it was given by
    assert (tmp_path / "dicom" / "cmu-dicom.tiles.geojson").exists()
    svs_index, svs_scores, _ = runs["svs"]
    dicom_index, dicom_scores, _ = runs["dicom"]
    common = sorted(set(svs_index) & set(dicom_index))
    assert len(common) >= 0.97 * max(len(svs_index), len(dicom_index)) and len(common) > 100
    a = svs_scores[[svs_index[c] for c in common]]
    b = dicom_scores[[dicom_index[c] for c in common]]
    assert spearmanr(a, b).statistic >= 0.99 and np.abs(a - b).max() <= 0.02


class _Interrupt(BaseException):
    """Stands for SIGTERM's BatchInterrupted or Ctrl-C: a BaseException raised in the waiting thread."""


def test_an_interrupt_mid_write_leaves_no_half_built_store(tmp_path, colour_checkpoint, planted_050, monkeypatch):
    """An interrupt lands in the thread waiting on zarr while zarr's own I/O thread is still writing the
    store being built: the half-built store is removed after that write, so it does not come back."""
    import asyncio

    from zarr.core import sync as zarr_sync

    from wsi_dala.core.layout import building_path

    late_writes = []

    def interrupted_create(cls, path, *args, **kwargs):
        building = building_path(Path(path))
        (building / "tiles").mkdir(parents=True)

        async def still_writing():
            await asyncio.sleep(0.5)
            chunk = building / "tiles" / "c" / "0"
            chunk.parent.mkdir(parents=True, exist_ok=True)  # as zarr's LocalStore makes a chunk's folders
            chunk.write_bytes(b"\0" * 64)
            late_writes.append(chunk)

        asyncio.run_coroutine_threadsafe(still_writing(), zarr_sync._get_loop())
        raise _Interrupt

    monkeypatch.setattr(TileStore, "create", classmethod(interrupted_create))
    with pytest.raises(_Interrupt):
        run_slide(planted_050.path, tmp_path, _config(colour_checkpoint), progress=False)
    assert late_writes, "the write in flight was cut short instead of waited for"
    assert not list(tmp_path.rglob("*.partial")), sorted(tmp_path.rglob("*"))
    assert not list(tmp_path.rglob("*.lock"))


def test_a_checkpoint_loaded_before_lets_the_run_read_tiles_while_torch_loads(
    tmp_path, colour_checkpoint, planted_050, monkeypatch
):
    from wsi_dala.model.card import KnownCheckpoint
    from wsi_dala.model.checked_weights import checked_before, record_checked
    from wsi_dala.runs import model_preparation
    from wsi_dala.runs.model_preparation import ModelPreparation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    known = KnownCheckpoint.read(colour_checkpoint)
    assert not checked_before(known)
    tiles_at_first_wait: list[bool] = []
    original_wait = ModelPreparation.wait

    def wait(self):
        if not self.__dict__.setdefault("_waited", False):
            self._waited = True
            tiles_at_first_wait.append(any(tmp_path.glob("run*/*tiles.zarr*")))
        original_wait(self)

    monkeypatch.setattr(model_preparation.ModelPreparation, "wait", wait)
    run_slide(planted_050.path, tmp_path / "run1", _config(colour_checkpoint), progress=False)
    assert checked_before(known)  # the strict load is remembered by the checkpoint's hash
    run_slide(planted_050.path, tmp_path / "run2", _config(colour_checkpoint), progress=False)
    # New weights are checked before any output; known ones only when the scorer needs them, after tiling.
    assert tiles_at_first_wait == [False, True]
    record = next((tmp_path / "cache" / "wsi-dala" / "checked-weights").iterdir())
    record.write_text(json.dumps({"wsi_dala": "0.0.0", "architecture": known.card.architecture}))
    assert not checked_before(known)  # another version of wsi-dala checks again
    record.write_text("{not json")
    assert not checked_before(known)
    record_checked(known)
    assert checked_before(known)


def test_the_run_answers_at_slide_level_with_the_planted_burden(tmp_path, colour_checkpoint, planted_050, capsys):
    from wsi_dala.model.slide_thresholds import CALL_INDETERMINATE
    from wsi_dala.outputs.slide_answer import feret_diameter
    from wsi_dala.runs.truth import planted_tumour

    code = main(["run", str(planted_050.path), "--model", str(colour_checkpoint), "--out", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    answer = json.loads((tmp_path / "run.json").read_text())["slide_answer"]
    truth = planted_tumour(planted_050)
    truth_mm2 = truth.area * planted_050.spec.mpp**2 / 1e6
    assert answer["tumour_area_mm2"] == pytest.approx(truth_mm2, rel=0.15)  # regions IoU >= 0.88 with the truth
    assert 0 < answer["tumour_share_of_tissue"] < 1 and answer["regions"] >= 1
    largest = max(getattr(truth, "geoms", [truth]), key=lambda g: g.area)
    assert answer["largest_region_diameter_mm"] == pytest.approx(
        feret_diameter(largest) * planted_050.spec.mpp / 1000, rel=0.15
    )
    assert answer["top_k"] == 10 and answer["top_k_mean_probability"] > 0.9  # the colour scorer is sure of tumour
    # No slide-level thresholds in any card yet: never "no tumour", and the reason is said.
    assert answer["call"] == CALL_INDETERMINATE and "no slide-level thresholds" in answer["call_reason"]
    assert "slide:       tumour " in out and "call: indeterminate" in out
