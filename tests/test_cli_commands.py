"""Every command through the installed console script `wsi-dala`, as a user or a scheduler runs it: on the
smallest good input (exit 0, its main output written) and on a bad one (exit 2, one line, no traceback).
The exit codes are those of docs/exit-codes.md. Deeper checks of each command live in its own test module;
`demo`'s good input is tests/test_demo.py (the same console script, 2 minutes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.images import write_blob_folder
from wsi_dala.model import write_untrained_checkpoint
from wsi_dala.model.colour import CLASS_NAMES
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

WSI_DALA = shutil.which("wsi-dala") or str(Path(sys.executable).parent / "wsi-dala")
TIMEOUT_S = 120
TINY_TRAIN = ["--arch", "resnet18", "--pretrained", "none", "--input-size", "32", "--batch-size", "8"]


def wsi_dala(*args: object, timeout_s: float = TIMEOUT_S, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WSI_DALA, *map(str, args)], capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result


def refused(result: subprocess.CompletedProcess[str], phrase: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("wsi-dala: error: ") and phrase in lines[0], result.stderr


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A small slide, an archive holding it, the colour scorer, a folder of labelled 32-px images."""
    root = tmp_path_factory.mktemp("cli")
    slide = write_synthetic_slide(
        root / "archive" / "case.svs", SyntheticSlideSpec(width=2048, height=1536, mpp=0.5, seed=5, app_mag=20)
    ).path
    model = write_untrained_checkpoint(
        root / "colour.safetensors", "colour-reference", tile_size_px=64, mpp=1.0, class_names=tuple(CLASS_NAMES)
    )
    images = write_blob_folder(root / "images", size=32, n=24, groups=4)
    not_a_slide = root / "notes.svs"
    not_a_slide.write_text("not a slide\n")
    return {"root": root, "slide": slide, "model": model, "images": images, "not_a_slide": not_a_slide}


@pytest.fixture(scope="module")
def trained(kit):
    """`train` on its smallest good input: one epoch of a 32-px ResNet-18 on 24 images."""
    out = kit["root"] / "train"
    ok(wsi_dala("train", "--folder", kit["images"], "--out", out, *TINY_TRAIN, "--epochs", 1, "--mpp", 1, "-q"))
    return out / "best.safetensors"


def test_help_and_version():
    assert "COMMAND" in ok(wsi_dala("--help")).stdout
    assert ok(wsi_dala("--version")).stdout.startswith("wsi-dala ")
    refused(wsi_dala("bogus"), "invalid choice: 'bogus'")


def test_a_misspelt_command_or_option_gets_the_closest_spelling(kit):
    refused(wsi_dala("rn", kit["slide"]), "invalid choice: 'rn'")
    refused(wsi_dala("rn", kit["slide"]), "; did you mean 'run'? (see wsi-dala --help)")
    refused(wsi_dala("run", kit["slide"], "--tile-treshold", 0.6), "run: unrecognized arguments: --tile-treshold 0.6")
    refused(
        wsi_dala("run", kit["slide"], "--tile-treshold", 0.6),
        "did you mean --tile-threshold? (see wsi-dala run --help)",
    )
    refused(wsi_dala("run", kit["slide"], "--backend", "openvnio"), "did you mean 'openvino'?")
    refused(wsi_dala("gan", "trian"), "did you mean 'train'? (see wsi-dala gan --help)")
    bogus = wsi_dala("run", kit["slide"], "--bogus")
    refused(bogus, "run: unrecognized arguments: --bogus (see wsi-dala run --help)")
    assert "did you mean" not in bogus.stderr


def test_run_without_a_model_after_the_demo_names_the_demos_model(kit, tmp_path):
    refused(wsi_dala("run", kit["slide"], cwd=tmp_path), "or run `wsi-dala demo` once to train a small one")
    demo_model = tmp_path / "wsi-dala-demo" / "model" / "best.safetensors"
    demo_model.parent.mkdir(parents=True)
    shutil.copy(kit["model"], demo_model)
    refused(
        wsi_dala("run", kit["slide"], cwd=tmp_path), "the demo's model is --model wsi-dala-demo/model/best.safetensors"
    )


def test_info(kit):
    assert "objective_power: 20.0" in ok(wsi_dala("info", kit["slide"])).stdout
    refused(wsi_dala("info", kit["not_a_slide"]), "notes.svs")


def test_synthesize(kit, tmp_path):
    ok(wsi_dala("synthesize", tmp_path / "s.svs", "--width", 1024, "--height", 768, "-q"))
    assert (tmp_path / "s.svs").stat().st_size > 10_000
    refused(wsi_dala("synthesize", tmp_path / "t.svs", "--width", 0), "each side must be 256 to 200000 pixels")


def test_tile(kit, tmp_path):
    ok(wsi_dala("tile", kit["slide"], "--out", tmp_path / "t", "--mpp", 1, "--tile-size", 64, "-q"))
    assert (tmp_path / "t" / "tiles.zarr").is_dir()
    refused(wsi_dala("tile", tmp_path / "missing.svs", "--out", tmp_path / "u"), "file not found")


def test_run(kit, tmp_path):
    ok(wsi_dala("run", kit["slide"], "--model", kit["model"], "--out", tmp_path / "r", "-q"))
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "complete"
    refused(wsi_dala("run", kit["slide"], "--model", tmp_path / "none.safetensors"), "none.safetensors")


def test_batch(kit, tmp_path):
    ok(wsi_dala("batch", kit["slide"].parent, "--model", kit["model"], "--out", tmp_path / "b", "-q"))
    assert json.loads((tmp_path / "b" / "batch.json").read_text())["counts"] == {"done": 1}
    refused(wsi_dala("batch", tmp_path / "nowhere", "--model", kit["model"], "--out", tmp_path / "c"), "nowhere")


def test_demo_refuses_bad_settings(tmp_path):
    refused(wsi_dala("demo", tmp_path / "d", "--epochs", -1), "--epochs: -1 is outside [1, 1000]")
    assert not (tmp_path / "d").exists()


def test_train(kit, trained, tmp_path):
    assert trained.exists() and (trained.parent / "train.json").exists()
    refused(wsi_dala("train", "--folder", tmp_path / "none", "--out", tmp_path / "t", *TINY_TRAIN), "none")


def test_evaluate(kit, trained, tmp_path):
    ok(wsi_dala("evaluate", "--model", trained, "--folder", kit["images"], "--out", tmp_path / "e", "-q"))
    assert "roc_auc" in json.loads((tmp_path / "e" / "metrics.json").read_text())["overall"]
    refused(wsi_dala("evaluate", "--model", kit["not_a_slide"], "--folder", kit["images"], "--out", tmp_path), "notes")


def test_calibrate(kit, trained, tmp_path):
    ok(wsi_dala("calibrate", "--model", trained, "--folder", kit["images"], "--out", tmp_path / "c", "-q"))
    assert (tmp_path / "c" / "calibrated.safetensors").exists()
    refused(wsi_dala("calibrate", "--model", trained, "--out", tmp_path / "d"), "--folder")


def test_mil_and_slide_thresholds_refuse_bad_input_through_the_console_script(kit, tmp_path):
    """Their good paths through this script are in tests/test_mil.py and tests/test_slide_level.py."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\ncase.svs,Tumor\ncase.svs,Non-tumor\n")
    refused(wsi_dala("mil", "train", "--labels", labels, "--features", tmp_path, "--out", tmp_path / "m"), "twice")
    refused(wsi_dala("mil", "evaluate", "--predictions", labels, "--out", tmp_path / "e"), "labels.csv")
    refused(wsi_dala("calibrate", "--model", kit["model"], "--slide-labels", labels, "--out", tmp_path / "c"), "--runs")


def test_cam(kit, trained, tmp_path):
    image = next((kit["images"] / "tumour").glob("*.png"))
    ok(wsi_dala("cam", image, "--model", trained, "--out", tmp_path / "cam", "-q"))
    assert list((tmp_path / "cam").glob("*.png"))
    refused(wsi_dala("cam", tmp_path / "missing.png", "--model", trained, "--out", tmp_path / "x"), "missing.png")


def test_export_model(kit, tmp_path):
    ok(wsi_dala("export-model", kit["model"], "--out", tmp_path / "w", "--format", "wsinfer", "-q"))
    assert (tmp_path / "w" / "torchscript_model.pt").exists()
    refused(wsi_dala("export-model", kit["not_a_slide"], "--out", tmp_path / "x", "--format", "onnx"), "notes.svs")


def test_pretrain(kit, tmp_path):
    args = ["--folder", kit["images"], "--folder-mpp", 1, "--arch", "resnet18", "--pretrained", "none"]
    ok(wsi_dala("pretrain", *args, "--out", tmp_path / "p", "--epochs", 1, "--batch-size", 8, "-q"))
    assert (tmp_path / "p" / "backbone.safetensors").exists()
    refused(wsi_dala("pretrain", *args, "--out", tmp_path / "q", "--epochs", -1), "epochs")


def test_gan_train_and_sample(kit, tmp_path):
    gan = tmp_path / "gan"
    settings = ["--resolution", 32, "--steps", 2, "--batch-size", 4, "--channel-max", 32, "--mpp", 1]
    ok(wsi_dala("gan", "train", "--folder", kit["images"], "--out", gan, *settings, "--checkpoint-every", 1, "-q"))
    ok(wsi_dala("gan", "sample", "--model", gan / "gan.safetensors", "--class", "tumour", "--n", 4,
                "--out", tmp_path / "s", "-q"))  # fmt: skip
    assert len(list((tmp_path / "s").glob("*.png"))) == 4
    refused(wsi_dala("gan", "train", "--folder", kit["images"], "--out", tmp_path / "g", "--resolution", 48), "48")
    refused(wsi_dala("gan", "sample", "--model", tmp_path / "no.safetensors", "--class", "x", "--out", gan), "no.")


@pytest.mark.parametrize(
    ("module", "command", "extra"),
    [
        ("timm", ["train", "--arch", "timm:vit_tiny_patch16_224", "--weights", "none", "--epochs", 1], "timm"),
        ("onnxruntime", ["export-model", "MODEL", "--format", "onnx"], "onnxruntime"),
        ("torch_fidelity", ["gan", "train", "--steps", 1, "--resolution", 32, "--kid-inception", "INCEPTION"], "gan"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(kit, tmp_path, module, command, extra):
    """Without an optional package the command says which extra installs it (here the package is hidden by a
    module of its name that fails to import, as an uninstalled one does)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / f"{module}.py").write_text("raise ImportError('not installed (hidden by the test)')\n")
    inception = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({}, inception)  # a weights-only file, so the check that reads it passes
    args = [{"MODEL": kit["model"], "INCEPTION": inception}.get(a, a) if isinstance(a, str) else a for a in command]
    if command[0] in ("train", "gan"):
        args += ["--folder", kit["images"], *(["--mpp", 1] if command[0] == "gan" else TINY_TRAIN[4:])]
    env = {**os.environ, "PYTHONPATH": str(hidden)}
    result = subprocess.run(
        [WSI_DALA, *map(str, args), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
    )  # fmt: skip
    refused(result, f"pip install 'wsi-dala[{extra}]'")
