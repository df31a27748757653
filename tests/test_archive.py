"""Archive batches: crashes (kill -9), bad slides, concurrent batches, changed slides, locks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_dala.core.config import BatchConfig, PipelineConfig, ScoringConfig
from wsi_dala.core.layout import BatchSlideLayout
from wsi_dala.model import write_untrained_checkpoint
from wsi_dala.model.colour import CLASS_NAMES
from wsi_dala.runs.archive import find_slides, run_batch, slide_id, slide_lock
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import TileStore


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three good slides (two share a file name in different folders), a truncated one, a text file."""
    root = tmp_path_factory.mktemp("archive")
    for i, relative in enumerate(["site-a/case.svs", "site-b/case.svs", "site-b/2024/other.tif"]):
        layout = "svs" if relative.endswith(".svs") else "tiff"
        write_synthetic_slide(
            root / relative,
            SyntheticSlideSpec(width=4096, height=3072, mpp=0.5, seed=30 + i, layout=layout, app_mag=20),
        )
    data = (root / "site-a" / "case.svs").read_bytes()
    (root / "site-a" / "truncated.svs").write_bytes(data[: len(data) // 3])
    (root / "site-b" / "notes.tif").write_text("not a slide\n")
    (root / "readme.txt").write_text("ignored: not a slide suffix\n")
    folder = tmp_path_factory.mktemp("model")
    checkpoint = folder / "colour.safetensors"
    write_untrained_checkpoint(checkpoint, "colour-reference", tile_size_px=64, mpp=1.0, class_names=tuple(CLASS_NAMES))
    config_file = folder / "pipeline.yaml"
    config_file.write_text(f"model: {checkpoint}\nscoring:\n  precision: fp32\n  batch_size: 16\n")
    return root, config_file


def _config(config_file) -> PipelineConfig:
    from wsi_dala.core.config import load_config

    return load_config(config_file)


def _batch_cli(root, out, config_file, *extra):
    return [
        sys.executable,
        "-m",
        "wsi_dala",
        "batch",
        str(root),
        "--out",
        str(out),
        "--config",
        str(config_file),
        "-q",
        *extra,
    ]


def _outputs(out):
    """What a finished batch produced, per slide: scores, CAMs and the GeoJSON text."""
    result = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        state = json.loads((folder / "state.json").read_text())
        if state["status"] not in ("done", "skipped"):
            result[folder.name] = state["status"]
            continue
        store = TileStore(folder / "tiles.zarr")
        geojson = sorted(folder.glob("*.geojson"))
        result[folder.name] = (
            store.scores(),
            store.cams(),
            [g.read_text() for g in geojson],
        )
    return result


def test_slides_found_with_unique_ids(archive):
    root, _ = archive
    slides = find_slides(root)
    names = sorted(p.relative_to(root).as_posix() for p in slides)
    assert names == [
        "site-a/case.svs",
        "site-a/truncated.svs",
        "site-b/2024/other.tif",
        "site-b/case.svs",
        "site-b/notes.tif",
    ]
    ids = {slide_id(root, p) for p in slides}
    assert len(ids) == 5 and slide_id(root, root / "site-a" / "case.svs") == slide_id(root, root / "site-a/case.svs")


def test_bad_slides_are_isolated_and_a_rerun_does_no_work(archive, tmp_path):
    root, config_file = archive
    out = tmp_path / "out"
    first = run_batch(root, out, _config(config_file), BatchConfig(), progress=False)
    assert first.counts() == {"done": 3, "failed": 2}
    failed = {os.path.basename(o.path): o for o in first.failed}
    assert set(failed) == {"truncated.svs", "notes.tif"}
    assert "truncated" in failed["truncated.svs"].error and failed["truncated.svs"].attempts == 1
    report = (out / "report.md").read_text()
    assert "## Failures" in report and "truncated.svs" in report and "| failed | 2 |" in report
    summary = json.loads((out / "batch.json").read_text())
    assert summary["counts"] == {"done": 3, "failed": 2}
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    second = run_batch(root, out, _config(config_file), BatchConfig(), progress=False)
    assert second.counts() == {"skipped": 3, "failed": 2}
    assert all(o.attempts == 0 for o in second.failed)  # the same bad file is not tried again
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    code = subprocess.run(_batch_cli(root, out, config_file), capture_output=True, text=True)
    assert code.returncode == 1 and "FAILED" in code.stdout


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_equals_uninterrupted(archive, tmp_path):
    root, config_file = archive
    reference_out = tmp_path / "reference"
    started = time.perf_counter()
    subprocess.run(_batch_cli(root, reference_out, config_file), capture_output=True, check=False)
    duration = time.perf_counter() - started  # an uninterrupted batch, interpreter start included
    reference = _outputs(reference_out)
    rng = random.Random(1)
    interrupted = []
    for trial in range(2):  # four kills at random points, two finishing batches
        out = tmp_path / f"killed{trial}"
        for _ in range(2):  # die twice before finishing
            process = subprocess.Popen(
                _batch_cli(root, out, config_file),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            time.sleep(rng.uniform(0.3, 0.9) * duration)
            interrupted.append(process.poll() is None)  # still running: the kill lands mid-batch
            process.send_signal(signal.SIGKILL)
            process.wait()
        finished = subprocess.run(_batch_cli(root, out, config_file), capture_output=True, text=True)
        assert finished.returncode == 1  # the two bad slides, nothing else
        outputs = _outputs(out)
        assert outputs.keys() == reference.keys()
        for name, expected in reference.items():
            if isinstance(expected, str):
                assert outputs[name] == expected
                continue
            np.testing.assert_array_equal(outputs[name][0], expected[0])
            np.testing.assert_array_equal(outputs[name][1], expected[1])
            assert outputs[name][2] == expected[2]
        assert not list(out.rglob("slide.lock"))
    assert any(interrupted), "no kill landed before the batch finished: the test proved nothing"


@pytest.mark.slow
def test_concurrent_batches_never_process_a_slide_twice(archive, tmp_path):
    root, config_file = archive
    out = tmp_path / "shared"
    processes = [
        subprocess.Popen(_batch_cli(root, out, config_file), stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate()[0] for p in processes]
    for folder in (p for p in out.iterdir() if p.is_dir()):
        state = json.loads((folder / "state.json").read_text())
        assert state["runs"] <= 1, folder
        if state["status"] in ("done", "skipped"):
            assert state["runs"] == 1
    assert all("slides in" in text for text in outputs)


def test_changed_slide_is_rerun(archive, tmp_path):
    root, config_file = archive
    copy = tmp_path / "archive"
    shutil.copytree(root / "site-a", copy / "site-a")
    (copy / "site-a" / "truncated.svs").unlink()
    out = tmp_path / "out"
    run_batch(copy, out, _config(config_file), BatchConfig(), progress=False)
    write_synthetic_slide(
        copy / "site-a" / "case.svs", SyntheticSlideSpec(width=4096, height=3072, mpp=0.5, seed=99, app_mag=20)
    )
    result = run_batch(copy, out, _config(config_file), BatchConfig(), progress=False)
    assert [o.status for o in result.outcomes] == ["done"]
    assert result.outcomes[0].runs == 2


def test_locks_are_exclusive_and_stale_ones_cleared(tmp_path):
    with slide_lock(BatchSlideLayout(tmp_path), 3600) as held:
        assert held
        with slide_lock(BatchSlideLayout(tmp_path), 3600) as second:
            assert not second
    assert not (tmp_path / "slide.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "slide.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": time.time()})
    )
    with slide_lock(BatchSlideLayout(tmp_path), 3600) as held:
        assert held  # its owner is gone: the lock was stale
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not yet reaped by its parent (us)
    while not Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].startswith(" Z"):
        time.sleep(0.05)
    (tmp_path / "slide.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": zombie.pid, "time": 0}))
    with slide_lock(BatchSlideLayout(tmp_path), 3600) as held:
        assert held  # a killed worker whose parent has not reaped it yet holds nothing
    zombie.wait()
    (tmp_path / "slide.lock").write_text(json.dumps({"host": "another-host", "pid": 1, "time": time.time()}))
    with slide_lock(BatchSlideLayout(tmp_path), 3600) as held:
        assert not held  # another machine's fresh lock is respected
    (tmp_path / "slide.lock").write_text(json.dumps({"host": "another-host", "pid": 1, "time": time.time() - 7200}))
    with slide_lock(BatchSlideLayout(tmp_path), 3600) as held:
        assert held


@pytest.mark.slow
def test_distributed_batch(archive, tmp_path):
    root, config_file = archive
    result = run_batch(root, tmp_path / "dist", _config(config_file), BatchConfig(dask_workers=2), progress=False)
    assert result.counts() == {"done": 3, "failed": 2}


def test_scoring_config_scheduler_not_forwarded_per_slide(archive, tmp_path):
    """The batch's cluster runs whole slides; each slide scores locally inside its worker."""
    root, config_file = archive

    config = _config(config_file).model_copy(
        update={"scoring": ScoringConfig(precision="fp32", scheduler="tcp://nowhere:1")}
    )
    result = run_batch(root / "site-a", tmp_path / "o", config, BatchConfig(pattern="case.svs"), progress=False)
    assert result.counts() == {"done": 1}


def test_a_damaged_dicom_level_is_named_not_silently_left_out(tmp_path, caplog):
    import numpy as np

    from tests.dicom_wsi import write_dicom_wsi
    from wsi_dala.slides.reader import Slide

    image = np.full((512, 512, 3), 235, np.uint8)
    image[100:400, 150:350] = (180, 90, 160)
    files = write_dicom_wsi([image, image[::2, ::2].copy(), image[::4, ::4].copy()], 0.5, tmp_path / "case9")
    coarse = files[-1]
    coarse.write_bytes(coarse.read_bytes()[: coarse.stat().st_size // 2])  # cut short, as a failed copy leaves it
    with caplog.at_level("WARNING", logger="wsi_dala.slides.reader"), Slide(tmp_path / "case9") as slide:
        assert slide.info.level_dimensions == ((512, 512), (256, 256))  # OpenSlide leaves the file out
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{coarse}: OpenSlide cannot read this file") and "a level it held is missing" in warning


def test_a_dicom_folder_is_one_slide_and_opens(tmp_path):
    from pathlib import Path

    from wsi_dala.slides.reader import Slide

    shutil.copytree(Path(__file__).parent / "data" / "dicom-boxes", tmp_path / "site-c" / "case9")
    (tmp_path / "site-c" / "notes.txt").write_text("not a slide")
    found = find_slides(tmp_path)
    assert found == [tmp_path / "site-c" / "case9"]
    with Slide(found[0]) as slide:  # what run_slide opens for this entry
        assert slide.info.vendor == "dicom"


def _counts(out) -> dict[str, int]:
    return json.loads((out / "batch.json").read_text())["counts"]


def test_a_good_archive_of_links_exits_0_each_slide_named_by_its_link(archive, tmp_path):
    """Labs point a batch at a mounted archive through symbolic links; the same file reached twice runs once."""
    root, config_file = archive
    links = tmp_path / "links"
    (links / "nested").mkdir(parents=True)
    (links / "first.svs").symlink_to(root / "site-a" / "case.svs")
    (links / "nested" / "second.tif").symlink_to(root / "site-b" / "2024" / "other.tif")
    (links / "zz again|\nsame.svs").symlink_to(root / "site-a" / "case.svs")  # names come from the archive
    out = tmp_path / "out"
    done = subprocess.run(_batch_cli(links, out, config_file), capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert _counts(out) == {"done": 2}
    assert {p.name for p in out.iterdir() if p.is_dir()} == {
        slide_id(links, links / "first.svs"),
        slide_id(links, links / "nested" / "second.tif"),
    }
    report = (out / "report.md").read_text().splitlines()
    (row,) = [line for line in report if line.startswith("| first.svs |")]
    assert row.endswith("| zz again\\| same.svs |"), "the other name of the same file is listed, not scored"
    assert all(line.startswith("|") for line in report[report.index("## Slides") + 2 :] if line), "no row split"
    again = subprocess.run(_batch_cli(links, out, config_file), capture_output=True, text=True)
    assert again.returncode == 0 and _counts(out) == {"skipped": 2}


@pytest.mark.slow
def test_sigterm_ends_a_batch_with_the_report_of_what_finished(archive, tmp_path):
    root, config_file = archive
    out = tmp_path / "out"
    process = subprocess.Popen(
        _batch_cli(root, out, config_file), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(
        json.loads(p.read_text()).get("status") == "done" for p in out.glob("*/state.json")
    ):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert "stopped by SIGTERM" in stdout
    counts = _counts(out)
    assert counts.get("done", 0) >= 1 and counts.get("not run", 0) >= 1, counts
    assert "| not run |" in (out / "report.md").read_text()
    assert not list(out.rglob("slide.lock")) and not list(out.rglob("*.partial"))
    finished = subprocess.run(_batch_cli(root, out, config_file), capture_output=True, text=True)
    assert finished.returncode == 1  # the two bad slides, nothing else
    counts = _counts(out)
    assert counts["failed"] == 2 and counts.get("done", 0) + counts.get("skipped", 0) == 3, counts


def _dask(*args: str, cwd, log) -> subprocess.Popen:
    """A `dask` command-line process (the scheduler or a worker), as a lab starts one."""
    dask = shutil.which("dask") or str(Path(sys.executable).parent / "dask")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([dask, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_a_real_cluster_with_a_worker_killed_mid_slide_finishes_every_good_slide(archive, tmp_path):
    """`dask scheduler` and two `dask worker` processes on localhost; the batch is given relative paths (the
    workers run elsewhere); the worker holding a slide is killed mid-slide."""
    root, config_file = archive
    here, workers_home = tmp_path / "here", tmp_path / "workers"
    here.mkdir()
    workers_home.mkdir()
    shutil.copytree(root, here / "archive", symlinks=True)
    scheduler_file = tmp_path / "scheduler.json"
    log = (tmp_path / "dask.log").open("w")
    common = ["--no-dashboard"]
    processes = [_dask("scheduler", "--scheduler-file", str(scheduler_file), "--port", "0", *common, cwd=tmp_path,
                       log=log)]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        workers = [
            _dask("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-nanny", *common,
                  cwd=workers_home, log=log)
            for _ in range(2)
        ]  # fmt: skip
        processes += workers
        cli = _batch_cli("archive", "out", config_file, "--scheduler", address)
        batch = subprocess.Popen(cli, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and batch.poll() is None and time.monotonic() < deadline:
            for lock in (here / "out").glob("*/slide.lock"):
                try:
                    pid = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue  # being written
                match = [w for w in workers if w.pid == pid]
                if match:
                    time.sleep(0.5)  # mid-slide
                    match[0].send_signal(signal.SIGKILL)
                    killed = lock.parent.name
                    break
            time.sleep(0.1)
        stdout, stderr = batch.communicate(timeout=600)
        assert killed is not None, "no worker was killed while it held a slide: the test proved nothing"
        assert batch.returncode == 1 and "Traceback" not in stderr, stderr  # 1: the two bad slides
        counts = _counts(here / "out")
        assert counts == {"done": 3, "failed": 2}, (counts, stdout)
        assert json.loads((here / "out" / killed / "state.json").read_text())["status"] in ("done", "failed")
        assert not [p for p in workers_home.rglob("*") if p.name in ("state.json", "out")], "stray worker files"
        again = subprocess.run(cli, cwd=here, capture_output=True, text=True, timeout=300)
        assert again.returncode == 1 and _counts(here / "out") == {"skipped": 3, "failed": 2}
    finally:
        for process in processes:
            process.kill()
            process.wait()
        log.close()
