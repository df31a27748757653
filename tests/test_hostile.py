"""Hostile input and concurrency, through the real CLI in a subprocess: the exit code, the single error line,
and the state of the output folder afterwards. Cases already handled stay here so they stay handled."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_dala.model import write_untrained_checkpoint
from wsi_dala.model.colour import CLASS_NAMES
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import COORDS, TileStore

CASE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    slide = write_synthetic_slide(folder / "case.svs", SyntheticSlideSpec(width=4096, height=3072, mpp=0.5, seed=3))
    other = write_synthetic_slide(folder / "other.svs", SyntheticSlideSpec(width=2048, height=1536, mpp=0.5, seed=4))
    model = write_untrained_checkpoint(
        folder / "colour.safetensors", "colour-reference", tile_size_px=64, mpp=1.0, class_names=tuple(CLASS_NAMES)
    )
    config = folder / "fp32.yaml"
    config.write_text("scoring:\n  precision: fp32\ntiling:\n  min_tissue: 0.05\n")
    return {"slide": slide.path, "other": other.path, "model": model, "config": config, "folder": folder}


def _cli(
    *args: object, timeout: float = CASE_TIMEOUT_S, max_file_bytes: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; ``max_file_bytes``: no file it writes may grow past this (a full disk, as the
    writer sees it: every write past the limit fails with an OSError that names no file)."""
    return subprocess.run(
        [sys.executable, "-m", "wsi_dala", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if max_file_bytes is None else _file_size_limit(max_file_bytes),
    )


def _file_size_limit(max_bytes: int):
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def _run(inputs: dict, out: Path, *extra: object, slide: Path | None = None) -> subprocess.CompletedProcess[str]:
    slide = slide or inputs["slide"]
    return _cli("run", slide, "--model", inputs["model"], "--config", inputs["config"], "--out", out, "-q", *extra)


def _one_error(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("wsi-dala: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def _scores(out: Path) -> np.ndarray:
    return TileStore(out / "tiles.zarr").scores()


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(inputs, out)
    assert result.returncode == 0, result.stderr
    return out


# ----------------------------------------------------------------------------- bad inputs, one line each

BAD_RUN_FLAGS = [
    (["--mpp", "inf"], "command line.tiling.mpp: input should be a finite number"),
    (["--mpp", "0"], "command line.tiling.mpp: input should be greater than 0"),
    (["--mpp", "nan"], "command line.tiling.mpp: input should be a finite number"),
    (["--min-tissue", "-0.1"], "command line.tiling.min_tissue"),
    (["--batch-size", "0"], "command line.scoring.batch_size"),
    (["--reader-threads", "0"], "command line.tiling.reader_threads"),
    (["--tile-threshold", "1.5"], "command line.export.tile_threshold"),
    (["--device", "gpu"], "command line.scoring.device"),
    (["--scheduler", "foo://x"], "foo://x: not a Dask scheduler address"),
    (["--scheduler", "tcp://host"], "tcp://host: a tcp:// scheduler address needs host:port"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_RUN_FLAGS, ids=[" ".join(f) for f, _ in BAD_RUN_FLAGS])
def test_bad_run_flag_is_one_line_and_writes_nothing(inputs, tmp_path, flags, message):
    out = tmp_path / "out"
    _one_error(_run(inputs, out, *flags), message)
    assert not out.exists()


BAD_CONFIG = [
    ("tiling:\n  stride_px: 0\n", "tiling.stride_px"),
    ("tiling:\n  reader_threads: 0\n", "tiling.reader_threads"),
    ("scoring:\n  wave: 0\n", "scoring.wave"),
    ("export:\n  cam_threshold_method: bogus\n", "export.cam_threshold_method: must be one of"),
    ("export:\n  region_thresholds: []\n", "export.region_thresholds"),
    ("heatmap:\n  min_cell_tissue: .nan\n", "heatmap.min_cell_tissue: input should be a finite number"),
    ("tiling:\n  min_tisue: 0.3\n", "did you mean min_tissue?"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIG, ids=[m for _, m in BAD_CONFIG])
def test_bad_config_value_fails_before_any_work(inputs, tmp_path, text, message):
    config, out = tmp_path / "bad.yaml", tmp_path / "out"
    config.write_text(text)
    result = _cli("run", inputs["slide"], "--model", inputs["model"], "--config", config, "--out", out, "-q")
    _one_error(result, "bad.yaml", message)
    assert not out.exists()


def test_bad_slides_and_checkpoints(inputs, tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(inputs["slide"].read_bytes()[:200_000])
    bad_model = tmp_path / "truncated.safetensors"
    bad_model.write_bytes(inputs["model"].read_bytes()[:40])
    pickle = tmp_path / "model.safetensors"
    pickle.write_bytes(b"\x80\x04" + b"\x00" * 64)
    cases = [
        (_run(inputs, tmp_path / "o1", slide=tmp_path / "missing.svs"), ["missing.svs: file not found"], "o1"),
        (_run(inputs, tmp_path / "o2", slide=text), ["notes.svs", "not a"], "o2"),
        (_run(inputs, tmp_path / "o3", slide=truncated), ["truncated.svs: truncated file"], "o3"),
        (
            _cli("run", inputs["slide"], "--model", bad_model, "--out", tmp_path / "o4", "-q"),
            ["truncated.safetensors"],
            "o4",
        ),
        (_cli("run", inputs["slide"], "--model", pickle, "--out", tmp_path / "o5", "-q"), ["pickle checkpoints"], "o5"),
    ]
    for result, phrases, out in cases:
        _one_error(result, *phrases)
        assert not (tmp_path / out).exists(), out


def test_weights_that_do_not_fit_are_reported_before_tiling(inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    card = json.loads(json.dumps(_card(inputs["model"])))
    card["tile_size_px"] = 64
    state = load_file(str(inputs["model"]))
    state["extra.weight"] = state[next(iter(state))].clone()
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"wsi_dala.model_card": json.dumps(card)})
    out = tmp_path / "out"
    _one_error(_cli("run", inputs["slide"], "--model", wrong, "--out", out, "-q"), "weights do not match")
    assert not out.exists()


def _card(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["wsi_dala.model_card"])


def test_tile_and_synthesize_refuse_nonsense(inputs, tmp_path):
    slide = inputs["slide"]
    for flags, message in [
        (["--tile-size", "0"], "tiling.tile_size_px"),
        (["--stride", "-5"], "tiling.stride_px"),
        (["--mpp", "0"], "tiling.mpp"),
        (["--reader-threads", "0"], "tiling.reader_threads"),
        (["--magnification", "0"], "magnification must be positive"),
    ]:
        _one_error(_cli("tile", slide, "--out", tmp_path / "t", "-q", *flags), message)
        assert not (tmp_path / "t").exists()
    _one_error(_cli("synthesize", tmp_path / "s.svs", "--width", "0"), "slide size 0x")
    _one_error(_cli("synthesize", tmp_path / "s.svs", "--slide-mpp", "0"), "slide µm/px 0.0")
    _one_error(_cli("synthesize", tmp_path / "s.svs", "--seed", "-1"), "seed -1: must be 0 or more")
    assert not (tmp_path / "s.svs").exists()


ARGUMENT_ERRORS = [
    (["train", "--out", "o", "--folder", ".", "--min-cover", "0"], "--min-cover: 0 is outside (0, 1]"),
    (["train", "--out", "o", "--folder", ".", "--val-fraction", "1"], "--val-fraction: 1 is outside (0, 1)"),
    (["train", "--out", "o", "--folder", ".", "--group-pattern", "("], "--group-pattern: '(' is not a regular"),
    (["train", "--out", "o", "--folder", ".", "--mpp", "inf"], "--mpp: inf is outside"),
    (["evaluate", "--model", "m", "--out", "o", "--batch-size", "0"], "--batch-size: 0 is outside"),
    (["cam", "x.png", "--model", "m", "--out", "o", "--percentile", "nan"], "--percentile: nan is outside"),
    (["run", "x.svs", "--precision", "fp64"], "invalid choice: 'fp64'"),
    (["tile", "x.svs"], "the following arguments are required: --out"),
    (["bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(
    ("argv", "message"), ARGUMENT_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in ARGUMENT_ERRORS]
)
def test_argument_errors_are_one_line(tmp_path, argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "wsi_dala", *argv], capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=tmp_path
    )
    _one_error(result, message, "--help)")
    assert not (tmp_path / "o").exists()


def test_wordings_say_what_happened(inputs, tmp_path):
    gan = _cli("gan", "train", "--folder", tmp_path, "--out", tmp_path / "gan", "--resolution", 48)
    assert _one_error(gan, "resolution: must be a power of two from 32 to 256").endswith(", got 48")
    bare = tmp_path / "synthetic"
    bare.mkdir()
    ratio = _cli("train", "--folder", tmp_path, "--out", tmp_path / "o", "--synthetic", f"{bare}:abc")
    _one_error(ratio, f"--synthetic {bare}:abc: RATIO must be a number in (0, 10], got 'abc'")
    weights = inputs["model"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights[:20])  # cut inside its JSON header
    run = _run({**inputs, "model": cut}, tmp_path / "run")
    _one_error(run, f"{cut}: a safetensors file cut short", "copy it again")
    unknown = _cli("run", inputs["slide"], "--bogus")
    _one_error(unknown, "run: unrecognized arguments: --bogus (see wsi-dala run --help)")


def test_greyscale_slide_says_why_no_tissue(tmp_path):
    import tifffile

    grey = np.repeat(np.random.default_rng(0).integers(0, 255, (1024, 1024, 1), dtype=np.uint8), 3, axis=2)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER", photometric="rgb")
    result = _cli("tile", path, "--out", tmp_path / "out", "-q")
    assert result.returncode == 2, "no tissue is bad input for `tile` as for `run`"
    assert "no tissue found (the slide has no colour" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "qc.png").exists() and (tmp_path / "out" / "tiles.zarr").exists()


# ----------------------------------------------------------------------------- the output folder


def test_failed_run_keeps_a_finished_runs_record(inputs, reference, tmp_path):
    out = tmp_path / "run"
    assert _run(inputs, out).returncode == 0
    record = (out / "run.json").read_bytes()
    truncated = tmp_path / "case.svs"  # same name, so the same folder is the right one for it
    truncated.write_bytes(inputs["slide"].read_bytes()[:100_000])
    _one_error(_run(inputs, out, slide=truncated), "truncated file")
    assert (out / "run.json").read_bytes() == record


def test_a_folder_holds_one_slide(inputs, tmp_path):
    out = tmp_path / "run"
    assert _run(inputs, out).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    _one_error(_run(inputs, out, slide=inputs["other"]), "holds the run of another slide (case)")
    assert sorted(p.name for p in out.iterdir()) == before


def test_files_an_earlier_run_wrote_but_this_one_does_not_are_removed(inputs, tmp_path):
    out = tmp_path / "run"
    assert _run(inputs, out).returncode == 0
    assert (out / "case.tiles.geojson").exists()
    assert _run(inputs, out, "--gzip").returncode == 0
    record = json.loads((out / "run.json").read_text())
    assert sorted(p.name for p in out.glob("*.geojson*")) == sorted(
        [record["outputs"][name] for name in ("tiles_geojson", "tumour_geojson", "slide_geojson")]
    )
    assert record["outputs"]["tiles_geojson"] == "case.tiles.geojson.gz"


def test_damaged_store_is_rebuilt_not_a_traceback(inputs, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "tiles.zarr" / COORDS)  # as two racing writers once left it
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "status": "running"}))
    result = _run(inputs, out)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(_scores(out), _scores(reference))


def test_leftover_partial_files_are_removed_by_the_next_run(inputs, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / ".overlay.png.1a2b3c.partial").write_bytes(b"half a png")
    (out / ".heatmap.zarr.partial").mkdir()
    assert _run(inputs, out).returncode == 0  # an unchanged run: nothing to do but the clean-up
    assert not list(out.glob(".*.partial"))


@pytest.mark.parametrize("limit_bytes", [20_000, 300_000])
def test_a_full_disk_names_the_file_and_a_rerun_finishes(inputs, tmp_path, limit_bytes):
    out = tmp_path / "run"
    result = _cli("run", inputs["slide"], "--model", inputs["model"], "--config", inputs["config"], "--out", out,
                  "-q", max_file_bytes=limit_bytes)  # fmt: skip
    line = _one_error(result, "cannot be written (File too large)")
    assert line.startswith(f"wsi-dala: error: {out}/"), "the path the disk refused is named"
    assert not list(out.rglob("*.partial"))
    assert json.loads((out / "run.json").read_text())["status"] == "running", "nothing looks finished"
    assert _run(inputs, out).returncode == 0


def test_a_full_disk_during_the_heatmap_names_the_heatmap_store(inputs, tmp_path):
    out = tmp_path / "run"
    tiled = _cli("tile", inputs["slide"], "--out", out, "--mpp", 1, "--tile-size", 64, "--min-tissue", 0.05, "-q")
    assert tiled.returncode == 0, tiled.stderr
    result = _cli("run", inputs["slide"], "--model", inputs["model"], "--config", inputs["config"], "--out", out,
                  "-q", max_file_bytes=150_000)  # the tiles fit; the heatmap's chunks do not  # fmt: skip
    _one_error(result, f"{out}/heatmap", "cannot be written")


def test_export_model_on_a_full_disk_names_the_file_and_leaves_nothing(inputs, tmp_path):
    for fmt, name in (("wsinfer", "torchscript_model.pt"), ("onnx", "model.onnx")):
        out = tmp_path / fmt
        result = _cli("export-model", inputs["model"], "--out", out, "--format", fmt, max_file_bytes=4_000)
        _one_error(result, f"{out / name}: cannot be written (File too large)")  # no C++ abort (rc 134)
        assert not list(out.iterdir())
    out = tmp_path / "wsinfer"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".torchscript_model.pt.{dead.pid}.partial").write_bytes(b"\0" * 1000)  # what a kill -9 leaves
    done = _cli("export-model", inputs["model"], "--out", out, "--format", "wsinfer")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "torchscript_model.pt"]


# ----------------------------------------------------------------------------- locks and concurrency


def test_a_live_lock_refuses_at_once_naming_the_holder(inputs, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "time": time.time()})
        )
        started = time.perf_counter()
        _one_error(_run(inputs, out), "in use by pid", str(holder.pid), socket.gethostname())
        assert time.perf_counter() - started < 30
    finally:
        holder.kill()
        holder.wait()
    result = _run(inputs, out)  # the holder is gone: its lock is stale and cleared
    assert result.returncode == 0, result.stderr
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_two_concurrent_runs_on_one_folder(inputs, reference, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "wsi_dala", "run", str(inputs["slide"]), "--model", str(inputs["model"])]
    command += ["--config", str(inputs["config"]), "--out", str(out), "-q"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=CASE_TIMEOUT_S), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, stdout, stderr in results:
        assert "Traceback" not in stderr
        if code == 2:
            assert "in use by pid" in stderr and stderr.count("\n") == 1
        else:
            assert "tiles:" in stdout
    np.testing.assert_array_equal(_scores(out), _scores(reference))
    again = _run(inputs, out)
    assert again.returncode == 0 and not (out / "run.lock").exists()


@pytest.mark.slow
def test_kill_9_of_run_at_random_points_then_rerun_equals_one_run(inputs, reference, tmp_path):
    import zarr

    started = time.perf_counter()
    assert _run(inputs, tmp_path / "timing").returncode == 0
    duration = time.perf_counter() - started
    rng = random.Random(9)
    reference_heatmap = np.asarray(zarr.open_group(reference / "heatmap.zarr", mode="r")["tumour/0"][:])
    landed = 0
    for trial in range(5):  # each trial is two runs: five kills at random points keep this test at about a minute
        out = tmp_path / f"killed{trial}"
        command = [sys.executable, "-m", "wsi_dala", "run", str(inputs["slide"]), "--model", str(inputs["model"])]
        command += ["--config", str(inputs["config"]), "--out", str(out), "-q"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.95) * duration)
        landed += process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        result = _run(inputs, out)
        assert result.returncode == 0, result.stderr
        np.testing.assert_array_equal(_scores(out), _scores(reference))
        np.testing.assert_array_equal(TileStore(out / "tiles.zarr").cams(), TileStore(reference / "tiles.zarr").cams())
        heatmap = np.asarray(zarr.open_group(out / "heatmap.zarr", mode="r")["tumour/0"][:])
        np.testing.assert_array_equal(heatmap, reference_heatmap)
        for name in ("case.tiles.geojson", "case.tumour.geojson"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()
        assert not list(out.glob(".*.partial")) and not (out / "run.lock").exists()
    assert landed >= 3, f"only {landed} of 5 kills landed while the run was working"


def test_two_interrupts_exit_cleanly(inputs, tmp_path):
    command = [sys.executable, "-m", "wsi_dala", "run", str(inputs["slide"]), "--model", str(inputs["model"])]
    command += ["--config", str(inputs["config"]), "--out", str(tmp_path / "run"), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    process.send_signal(signal.SIGINT)
    time.sleep(0.1)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=CASE_TIMEOUT_S)
    assert process.returncode in (0, 130), stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    if process.returncode == 130:
        assert "rerun the same command to resume" in stderr.lower()
    # A second Ctrl-C exits at once and may leave the lock: the next run finds its pid gone and clears it.
    result = _run(inputs, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "run" / "run.lock").exists()
