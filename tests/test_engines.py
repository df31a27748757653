"""The backbone on ONNX Runtime and OpenVINO: equal to torch fp32, chosen by measured speed, cached by
checkpoint hash, int8 where the engine has it, and clear refusals or recorded fallbacks otherwise."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsi_dala.cli import main
from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig
from wsi_dala.core.errors import EngineError
from wsi_dala.inference.engines import plan as engine_plan
from wsi_dala.inference.engines.exports import engine_layout, ensure_onnx
from wsi_dala.inference.engines.plan import BackboneRequest, plan_backbone
from wsi_dala.model import load_checkpoint, write_untrained_checkpoint
from wsi_dala.runs.pipeline import run_slide
from wsi_dala.tiling.store import TileStore

TILE_PX = 64


@pytest.fixture(scope="module")
def dala(tmp_path_factory):
    """An untrained DALAResNet50 at 64 px and 2 µm/px: the real architecture, tiny tiles."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dala") / "dala.safetensors"
    return write_untrained_checkpoint(path, tile_size_px=TILE_PX, mpp=2.0)


def _config(checkpoint, backend: str, precision: str) -> PipelineConfig:
    return PipelineConfig(
        model=str(checkpoint),
        tiling=TilingConfig(mpp=2.0, tile_size_px=TILE_PX),
        scoring=ScoringConfig(backend=backend, precision=precision, int8_calibration_tiles=16),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, svs_050, dala):
    """The same slide scored by torch, ONNX Runtime and OpenVINO at fp32, and by ONNX Runtime at int8."""
    out = tmp_path_factory.mktemp("engines")
    results = {}
    combinations = (("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8"))
    for backend, precision in combinations:
        config = _config(dala, backend, precision)
        summary = run_slide(svs_050.path, out / f"{backend}-{precision}", config, progress=False)
        store = TileStore(summary.layout.tiles_store)
        results[(backend, precision)] = (store.positive_scores(), store.cams(), summary.record.scoring["backend"])
    return results


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_fp32_engines_equal_torch_fp32(runs, engine):
    reference, reference_cams, _ = runs[("torch", "fp32")]
    scores, cams, backend = runs[(engine, "fp32")]
    assert len(scores) == len(reference) > 50
    assert np.abs(scores - reference).max() <= 1e-3
    assert ((scores >= 0.5) == (reference >= 0.5)).all()
    assert np.abs(cams - reference_cams).max() <= 0.01 * reference_cams.max()
    assert (backend["engine"], backend["precision"], backend["reason"]) == (engine, "fp32", "asked")
    assert backend["check_against_torch_fp32"][f"{engine} fp32"]["max_feature_rel_diff"] <= 1e-3


def test_int8_runs_close_to_fp32_and_names_its_calibration(runs, dala):
    reference, _, _ = runs[("torch", "fp32")]
    scores, _, backend = runs[("onnxruntime", "int8")]
    assert (backend["engine"], backend["precision"]) == ("onnxruntime", "int8")
    assert 0 < np.abs(scores - reference).max() < 0.05  # quantised: not identical, close
    int8_files = [p.name for p in engine_layout(dala).exports() if "-int8-" in p.name]
    assert len(int8_files) == 1 and int8_files[0].startswith("dala-")


def _request(dala, backend: str, precision: str, device: str = "cpu") -> BackboneRequest:
    model, _card = load_checkpoint(dala)
    sample = torch.randn(8, 3, TILE_PX, TILE_PX)
    return BackboneRequest(str(dala), "ab" * 32, model, TILE_PX, device, backend, precision, sample)


def test_auto_measures_each_engine_once_and_takes_the_fastest(dala, monkeypatch):
    choice = plan_backbone(_request(dala, "auto", "fp32"))
    rates = choice.rates_tiles_per_s
    assert set(rates) == {"torch fp32", "onnxruntime fp32", "openvino fp32"}
    assert choice.plan.label == max(rates, key=rates.__getitem__) and choice.reason == "measured fastest"
    cached = json.loads(engine_layout(dala).speed_json.read_text())
    assert any(set(v) >= set(rates) for v in cached.values())

    def measured_again(*_args, **_kwargs):
        raise AssertionError("measured again: the speed cache was not used")

    monkeypatch.setattr(engine_plan, "measure_rate", measured_again)
    again = plan_backbone(_request(dala, "auto", "fp32"))  # the next slide in this process: not planned again
    assert again.plan == choice.plan and "earlier slide" in again.reason and again.seconds == 0
    engine_plan._CHOSEN.clear()  # a new process: built and checked again, timed from the speed cache
    fresh = plan_backbone(_request(dala, "auto", "fp32"))
    assert fresh.plan == choice.plan and fresh.rates_tiles_per_s == rates and fresh.reason == "measured fastest"
    assert set(fresh.check) == ({fresh.plan.label} - {"torch fp32"})  # only the winner was built and checked
    assert fresh.check == {k: v for k, v in choice.check.items() if k in fresh.check}  # ... by the cached check

    def checked_again(*_args, **_kwargs):
        raise AssertionError("checked against torch fp32 again: the cached check was not used")

    monkeypatch.setattr(engine_plan, "_compare", checked_again)
    engine_plan._CHOSEN.clear()
    assert plan_backbone(_request(dala, "auto", "fp32")).plan == choice.plan


def test_a_changed_checkpoint_is_exported_again_and_the_stale_file_removed(tmp_path):
    checkpoint = tmp_path / "m.safetensors"
    torch.manual_seed(1)
    write_untrained_checkpoint(checkpoint, tile_size_px=TILE_PX)
    first = ensure_onnx(load_checkpoint(checkpoint)[0], str(checkpoint), "1" * 64, TILE_PX)
    assert ensure_onnx(load_checkpoint(checkpoint)[0], str(checkpoint), "1" * 64, TILE_PX) == first  # cached
    second = ensure_onnx(load_checkpoint(checkpoint)[0], str(checkpoint), "2" * 64, TILE_PX)
    assert second != first and second.exists() and not first.exists()


def test_a_backbone_over_the_single_file_limit_keeps_its_weights_beside_the_export(tmp_path, monkeypatch):
    """The ViT-H and ViT-g presets' fp32 weights (2.5-4.5 GB) pass ONNX's 2 GB single-file limit: the export
    keeps them in `<export>.onnx.data` beside the model, moved into place before it, no hidden file left; both
    engines read it and match torch; a changed checkpoint removes both files. (The limit is lowered here so
    a small DALAResNet50 takes that path.)"""
    import onnxruntime
    import openvino

    from wsi_dala.inference.engines import exports

    monkeypatch.setattr(exports, "SINGLE_FILE_LIMIT_BYTES", 0)
    checkpoint = tmp_path / "m.safetensors"
    torch.manual_seed(1)
    write_untrained_checkpoint(checkpoint, tile_size_px=TILE_PX)
    model = load_checkpoint(checkpoint)[0].eval()
    first = ensure_onnx(model, str(checkpoint), "1" * 64, TILE_PX)
    layout = engine_layout(checkpoint)
    data = layout.external_data(first)
    weights_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert data.stat().st_size > 0.8 * weights_bytes and first.stat().st_size < 0.05 * data.stat().st_size
    assert [p.name for p in layout.root.iterdir() if p.name.startswith(".")] == []
    images = torch.rand(3, 3, TILE_PX, TILE_PX)
    with torch.no_grad():
        reference = model.forward_features(images).numpy()
    on_ort = onnxruntime.InferenceSession(str(first), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()}
    )[0]
    compiled = openvino.Core().compile_model(str(first), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    on_openvino = compiled(images.numpy())[0]
    for found in (on_ort, on_openvino):
        assert found.shape == reference.shape
        assert np.abs(found - reference).max() <= 1e-3 * np.abs(reference).max()
    second = ensure_onnx(model, str(checkpoint), "2" * 64, TILE_PX)
    assert not first.exists() and not data.exists() and layout.external_data(second).exists()


def test_engines_refuse_what_they_cannot_do(dala):
    with pytest.raises(EngineError, match="the torch backend has none"):
        plan_backbone(_request(dala, "torch", "int8"))
    with pytest.raises(EngineError, match="runs fp32, int8 only"):
        plan_backbone(_request(dala, "onnxruntime", "bf16"))
    with pytest.raises(EngineError, match="runs on the CPU only"):
        plan_backbone(_request(dala, "openvino", "fp32", device="cuda"))
    # auto precision on an engine without bf16: fp32, never an error
    assert plan_backbone(_request(dala, "onnxruntime", "auto")).plan.precision == "fp32"


def test_a_failed_export_falls_back_to_torch_and_says_so(dala, tmp_path, monkeypatch):
    monkeypatch.setenv("WSI_DALA_ENGINE_CACHE", str(tmp_path / "cache"))

    def unexportable(*_args, **_kwargs):
        raise RuntimeError("aten::weird_op has no ONNX symbolic")

    monkeypatch.setattr(torch.onnx, "export", unexportable)
    choice = plan_backbone(_request(dala, "onnxruntime", "fp32"))
    assert choice.plan.engine == "torch"
    assert choice.reason.startswith("fallback:") and "weird_op" in choice.reason
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_an_export_the_memory_cannot_hold_is_not_begun_and_torch_runs_the_backbone(dala, tmp_path, monkeypatch):
    """A ViT-g's export takes several copies of its 4.5 GB of weights: on a machine without that much free
    memory it is not begun (the kernel would kill the run mid-export); the backbone runs on torch, and the
    reason names the memory needed and available."""
    from wsi_dala.inference.engines import exports

    monkeypatch.setenv("WSI_DALA_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(exports, "available_memory_bytes", lambda: 50_000_000)  # DALAResNet50 needs ~0.5 GB
    choice = plan_backbone(_request(dala, "openvino", "fp32"))
    assert choice.plan.engine == "torch" and choice.reason.startswith("fallback:"), choice.reason
    assert "GB of free memory and 0.1 GB is available" in choice.reason, choice.reason
    assert not list((tmp_path / "cache").rglob("*.onnx*"))


def test_an_engine_that_is_not_installed_is_one_line_and_exit_2(svs_050, dala, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # importing it now raises ImportError
    out = tmp_path / "run"
    code = main(["run", str(svs_050.path), "--model", str(dala), "--out", str(out), "--backend", "openvino", "-q"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error == "wsi-dala: error: --backend openvino: the openvino package is not installed (pip install openvino)"
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # never claims to be complete
    assert not list(out.glob("*.geojson"))


def test_devices_all_without_a_gpu_is_one_line_and_exit_2(svs_050, dala, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    out = tmp_path / "run"
    code = main(["run", str(svs_050.path), "--model", str(dala), "--out", str(out), "--devices", "all", "-q"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == "wsi-dala: error: --devices all: no CUDA GPU is visible; use --devices one to score on the CPU"
    assert not out.exists()  # refused before the output folder is touched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scoring_with_prefetched_batches_matches_the_cpu(dala):
    from wsi_dala.inference.scoring import score_tiles

    tiles = np.random.default_rng(3).integers(0, 256, size=(40, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    on_cpu = score_tiles(tiles, str(dala), "cpu", "fp32", 16)
    on_gpu = score_tiles(tiles, str(dala), "cuda", "fp32", 16)  # 3 batches: the copy of the next overlaps
    np.testing.assert_allclose(on_gpu[:, :2], on_cpu[:, :2], atol=1e-3)
    np.testing.assert_allclose(on_gpu[:, 3:], on_cpu[:, 3:], atol=1e-2 * on_cpu[:, 3:].max())


def _own_checkpoint(tmp_path) -> str:
    """A small checkpoint in its own folder, so its engine cache (``<ckpt>.engines/``) is this test's alone."""
    torch.manual_seed(0)
    return str(write_untrained_checkpoint(tmp_path / "m.safetensors", "resnet18", tile_size_px=TILE_PX, mpp=2.0))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_a_cut_engine_file_is_rebuilt_with_one_warning(tmp_path, caplog):
    checkpoint = _own_checkpoint(tmp_path)
    first = plan_backbone(_request(checkpoint, "onnxruntime", "fp32"))
    onnx_file = engine_layout(checkpoint).onnx("ab" * 32, TILE_PX)
    assert first.plan.engine == "onnxruntime" and onnx_file.exists()
    size = onnx_file.stat().st_size
    onnx_file.write_bytes(onnx_file.read_bytes()[: size // 3])  # a kill during a copy, a full disk
    engine_plan._CHOSEN.clear()  # the next process
    with caplog.at_level("WARNING"):
        again = plan_backbone(_request(checkpoint, "onnxruntime", "fp32"))
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"{onnx_file}: onnxruntime cannot load it") and "building it again" in warning
    assert again.plan.engine == "onnxruntime" and onnx_file.stat().st_size == size
    engine_plan._CHOSEN.clear()


def test_a_damaged_speed_cache_is_measured_again_with_one_warning(tmp_path, caplog, monkeypatch):
    checkpoint = _own_checkpoint(tmp_path)
    measure = engine_plan.measure_rate
    quick = functools.partial(measure, min_seconds=0.01)
    monkeypatch.setattr(engine_plan, "measure_rate", lambda backbone, images, **kw: quick(backbone, images, **kw))
    plan_backbone(_request(checkpoint, "auto", "fp32"))
    speed_json = engine_layout(checkpoint).speed_json
    (key,) = [k for k in json.loads(speed_json.read_text()) if not k.endswith("checks against torch fp32")]
    for damage in ("not json {", '{"KEY": {"torch fp32": "fast", "onnxruntime fp32": -1}}', "[]"):
        speed_json.write_text(damage.replace("KEY", key))
        engine_plan._CHOSEN.clear()  # the next process
        caplog.clear()
        with caplog.at_level("WARNING"):
            again = plan_backbone(_request(checkpoint, "auto", "fp32"))
        (warning,) = _warnings(caplog)
        assert warning.startswith(f"{speed_json}: damaged speed cache") and warning.endswith("measuring again")
        rates = json.loads(speed_json.read_text())[key]
        assert again.reason == "measured fastest" and all(isinstance(v, float) and v > 0 for v in rates.values())
    engine_plan._CHOSEN.clear()


def test_partial_files_of_a_killed_export_are_removed_by_the_next_run(tmp_path):
    checkpoint = _own_checkpoint(tmp_path)
    folder = engine_layout(checkpoint).root
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = folder / f".m.onnx.{dead.pid}.partial"  # what a kill -9 during an export leaves
    leftover.write_bytes(b"\0" * 1000)
    alive = folder / f".m.onnx.{os.getpid()}.partial"  # a live writer's file is left alone
    alive.write_bytes(b"\0")
    engine_layout(checkpoint)
    assert not leftover.exists() and alive.exists()


def test_the_gpu_benchmark_runs_its_cuda_path_on_the_cpu_where_there_is_no_gpu():
    """`benchmarks/gpu.py` is the scoring path a GPU machine measures (raw JPEG tiles, decode, copy, backbone,
    CAM, Zarr rows); without CUDA it runs the same stages on the CPU, so it is known to work when a GPU comes."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    slide = root / "tests" / "data" / "cmu_small_region.svs"
    args = [sys.executable, str(root / "benchmarks" / "gpu.py"), "--slide", str(slide), "--tiles", "16", "--batch", "8"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "device cpu" in out and "16 tiles of" in out, out
    for stage in ("read", "decode (CPU", "copy to device", "model (backbone)", "CAM (head + gradient)", "write"):
        line = next((line for line in out.splitlines() if line.strip().startswith(stage)), None)
        assert line is not None and float(re.findall(r"([\d.]+) tiles/s", line)[0]) > 0, (stage, out)
    assert re.search(r"scoring end to end .*: \d+ tiles/s", out), out
