"""Our checkpoints in other tools' formats: WSInfer (TorchScript + config.json) and ONNX, checked against
our own scoring on the same tiles, and the configs against wsinfer-zoo's own validator."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsi_dala.core.errors import CheckpointError
from wsi_dala.inference.scoring import score_tiles
from wsi_dala.interop.model_export import export_model
from wsi_dala.model import write_untrained_checkpoint


@pytest.fixture(scope="module")
def dala_64(tmp_path_factory):
    """An untrained 64-px DALAResNet50 at 1 µm/px (speed, not skill, is what this size buys)."""
    torch.manual_seed(0)
    return write_untrained_checkpoint(tmp_path_factory.mktemp("dala") / "dala.safetensors", tile_size_px=64, mpp=1.0)


def _tiles(size: int, n: int = 6) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _our_probabilities(checkpoint, tiles: np.ndarray, n_classes: int = 2) -> np.ndarray:
    return score_tiles(tiles, str(checkpoint), "cpu", "fp32", batch_size=8)[:, :n_classes]


def test_wsinfer_export_validates_and_gives_our_probabilities(dala_64, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # wsinfer_zoo makes ~/.wsinfer-zoo when imported
    from wsinfer_zoo.client import ModelConfiguration, validate_config_json

    files = export_model(dala_64, tmp_path / "wsinfer", "wsinfer")
    assert sorted(p.name for p in files) == ["config.json", "torchscript_model.pt"]
    config = json.loads((tmp_path / "wsinfer" / "config.json").read_text())
    validate_config_json(config)  # raises on a schema violation
    parsed = ModelConfiguration.from_dict(config)
    assert (parsed.patch_size_pixels, parsed.spacing_um_px, parsed.num_classes) == (64, 1.0, 2)
    assert [t.name for t in parsed.transform] == ["Resize", "ToTensor", "Normalize"]

    tiles = _tiles(64)
    module = torch.jit.load(str(tmp_path / "wsinfer" / "torchscript_model.pt")).eval()
    normalize = config["transform"][2]["arguments"]
    mean = torch.tensor(normalize["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalize["std"]).view(1, 3, 1, 1)
    images = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std  # ToTensor, Normalize
    with torch.no_grad():
        theirs = torch.softmax(module(images), dim=1).numpy()  # what WSInfer does with the logits
    np.testing.assert_allclose(theirs, _our_probabilities(dala_64, tiles), atol=1e-4)


def test_onnx_export_gives_our_probabilities_under_onnxruntime(colour_checkpoint, tmp_path):
    import onnx
    import onnxruntime

    from wsi_dala.model import read_card

    (path,) = export_model(colour_checkpoint, tmp_path / "onnx", "onnx")
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    card = {p.key: p.value for p in proto.metadata_props}["wsi_dala.model_card"]
    assert json.loads(card)["class_names"] == read_card(colour_checkpoint).class_names
    size = read_card(colour_checkpoint).tile_size_px
    tiles = _tiles(size, n=5)  # another batch size than the export's example
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rgb01 = (tiles.transpose(0, 3, 1, 2) / 255).astype(np.float32)
    (theirs,) = session.run(["probabilities"], {"rgb01": rgb01})
    n_classes = len(read_card(colour_checkpoint).class_names)
    np.testing.assert_allclose(theirs, _our_probabilities(colour_checkpoint, tiles, n_classes), atol=1e-4)


def test_export_refusals_name_the_file_and_the_problem(tmp_path, colour_checkpoint):
    no_mpp = write_untrained_checkpoint(tmp_path / "no-mpp.safetensors", "colour-reference", tile_size_px=64, mpp=None)
    with pytest.raises(CheckpointError, match="spacing_um_px"):
        export_model(no_mpp, tmp_path / "out", "wsinfer")
    with pytest.raises(CheckpointError, match="unknown export format 'tflite'"):
        export_model(colour_checkpoint, tmp_path / "out", "tflite")
    cli = [sys.executable, "-m", "wsi_dala", "export-model", str(colour_checkpoint), "--out", str(tmp_path / "o")]
    done = subprocess.run([*cli, "--format", "tflite"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'tflite'" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2  # usage line + the error
    done = subprocess.run([*cli, "--format", "wsinfer"], capture_output=True, text=True)
    assert done.returncode == 0 and "torchscript_model.pt" in done.stdout


@pytest.fixture(scope="module")
def resnet18_folder(tmp_path_factory):
    """An untrained 64-px ResNet-18 checkpoint and its WSInfer export."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("resnet18")
    checkpoint = write_untrained_checkpoint(root / "resnet18.safetensors", "resnet18", tile_size_px=64, mpp=1.0)
    export_model(checkpoint, root / "wsinfer", "wsinfer")
    return checkpoint, root / "wsinfer"


def test_a_wsinfer_folder_imports_with_its_weights_card_and_grad_cam(resnet18_folder):
    from wsi_dala.interop.model_import import imported_checkpoint
    from wsi_dala.model import read_card

    checkpoint, folder = resnet18_folder
    imported = imported_checkpoint(folder)
    assert imported.parent == folder / ".wsi-dala" and imported_checkpoint(folder) == imported  # made once
    card, original = read_card(imported), read_card(checkpoint)
    assert (card.architecture, card.tile_size_px, card.mpp) == ("resnet18", 64, 1.0)
    assert card.class_names == original.class_names and card.positive_class == "Tumor"
    assert card.normalisation == original.normalisation
    tiles = _tiles(64)
    ours = score_tiles(tiles, str(checkpoint), "cpu", "fp32", batch_size=8)
    theirs = score_tiles(tiles, str(imported), "cpu", "fp32", batch_size=8)
    np.testing.assert_allclose(theirs[:, :2], ours[:, :2], atol=1e-5)  # the same probabilities
    np.testing.assert_allclose(theirs[:, 3:], ours[:, 3:], rtol=1e-4, atol=1e-6)  # and the same Grad-CAM


def test_our_export_keeps_its_positive_class_when_the_names_do_not_say_it(tmp_path):
    from wsi_dala.interop.model_import import imported_checkpoint
    from wsi_dala.model import read_card

    checkpoint = write_untrained_checkpoint(
        tmp_path / "grades.safetensors", "resnet18", 64, 1.0, class_names=("low", "high"), positive_class="high"
    )
    export_model(checkpoint, tmp_path / "wsinfer", "wsinfer")
    assert read_card(imported_checkpoint(tmp_path / "wsinfer")).positive_class == "high"  # from the card inside
    asked = imported_checkpoint(tmp_path / "wsinfer", positive_class="low")
    assert read_card(asked).positive_class == "low"


def test_an_edited_config_of_our_export_is_named_not_silently_ignored(resnet18_folder, tmp_path, caplog):
    import shutil

    from wsi_dala.interop.model_import import imported_checkpoint
    from wsi_dala.model import read_card

    _, exported = resnet18_folder
    folder = tmp_path / "edited"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns(".wsi-dala"))
    with caplog.at_level("WARNING", logger="wsi_dala.interop.model_import"):
        imported_checkpoint(folder)
    assert not caplog.records, "an untouched export converts without a warning"
    config = json.loads((folder / "config.json").read_text())
    config["spacing_um_px"] = 0.25
    config["class_names"] = ["benign", "malignant"]
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="wsi_dala.interop.model_import"):
        card = read_card(imported_checkpoint(folder))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "class_names, spacing_um_px differ from the model card inside torchscript_model.pt" in warning
    assert (card.mpp, card.class_names[1]) == (1.0, "Tumor"), "the card inside wins, as the warning says"


def test_run_takes_a_wsinfer_folder(resnet18_folder, svs_050, tmp_path):
    _, folder = resnet18_folder
    cli = [sys.executable, "-m", "wsi_dala", "run", str(svs_050.path), "--model", str(folder), "-q"]
    done = subprocess.run([*cli, "--out", str(tmp_path / "run"), "--backend", "torch"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["counts"]["tiles"] > 0 and record["model"]["architecture"] == "resnet18"


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory, resnet18_folder):
    """A WSInfer-zoo-style folder: a traced torchvision ResNet-18 (no wsi-dala card inside) and its config."""
    from torchvision import models as tvm

    torch.manual_seed(2)
    network = tvm.resnet18(weights=None, num_classes=2).eval()
    for module in network.modules():  # BN statistics that are not the identity, as a trained net's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("zoo") / "breast-tumor-resnet18"
    folder.mkdir()
    torch.jit.save(torch.jit.trace(network, torch.rand(1, 3, 64, 64)), str(folder / "torchscript_model.pt"))
    _, ours = resnet18_folder
    config = {**json.loads((ours / "config.json").read_text()), "class_names": ["notumor", "tumor"]}
    config["patch_size_pixels"] = 128  # 128 px at 0.5 µm/px, resized to 64: tiles of 64 px at 1 µm/px
    config["spacing_um_px"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    return network, folder


def test_a_zoo_model_folder_imports_into_the_eager_network(zoo_folder):
    from wsi_dala.interop.model_import import imported_checkpoint
    from wsi_dala.model import read_card

    network, folder = zoo_folder
    imported = imported_checkpoint(folder)
    card = read_card(imported)
    assert (card.architecture, card.tile_size_px, card.mpp, card.positive_class) == ("resnet18", 64, 1.0, "tumor")
    assert "128 px at 0.5 µm/px, resized to 64 px" in card.mpp_note
    tiles = _tiles(64)
    mean = torch.tensor(card.normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card.normalisation["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(network((torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255 - mean) / std), 1)
    rows = score_tiles(tiles, str(imported), "cpu", "fp32", batch_size=8)
    np.testing.assert_allclose(rows[:, :2], expected.numpy(), atol=1e-5)
    cams = rows[:, 3:].reshape(len(tiles), 2, 2)  # 64 px through a ResNet: a 2 x 2 feature map
    assert np.isfinite(cams).all() and (cams.max(axis=(1, 2)) > cams.min(axis=(1, 2))).any()


def _folder(tmp_path, config: dict | None, script: bytes | None):
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if script is not None:
        (folder / "torchscript_model.pt").write_bytes(script)
    return folder


def test_bad_wsinfer_folders_get_one_line_naming_the_file(zoo_folder, tmp_path):
    from wsi_dala.interop.model_import import imported_checkpoint

    _, good = zoo_folder
    config = json.loads((good / "config.json").read_text())
    script = (good / "torchscript_model.pt").read_bytes()
    cases = [
        ({k: v for k, v in config.items() if k != "patch_size_pixels"}, script, r"config\.json: patch_size_pixels"),
        ({k: v for k, v in config.items() if k != "spacing_um_px"}, script, r"config\.json: spacing_um_px is missing"),
        (  # no eager network: the TorchScript itself must give one logit per class
            {**config, "architecture": "efficientnet_b0", "num_classes": 3, "class_names": ["notumor", "tumor", "x"]},
            script,
            r"torchscript_model\.pt: gives \(1, 2\) for one patch, not \[1, 3\] class logits",
        ),
        ({**config, "class_names": ["a", "b"]}, script, "which class is the positive one"),
        ({**config, "num_classes": 3}, script, r"num_classes \(3\) must equal"),
        (config, b"not torchscript", r"torchscript_model\.pt: not a loadable TorchScript file"),
        ({**config, "architecture": "resnet34"}, script, "its weights do not fit resnet34"),
    ]
    for index, (bad_config, bad_script, message) in enumerate(cases):
        root = tmp_path / f"case{index}"
        root.mkdir()
        with pytest.raises(CheckpointError, match=message):
            imported_checkpoint(_folder(root, bad_config, bad_script))
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        imported_checkpoint(tmp_path / "bad-json")
    named = _folder(
        tmp_path / "6" if (tmp_path / "6").mkdir() is None else tmp_path, {**config, "class_names": ["a", "b"]}, script
    )
    assert imported_checkpoint(named, positive_class="b").exists()


@pytest.fixture(scope="module")
def scripted_folder(tmp_path_factory):
    """A WSInfer folder of an architecture with no eager network here: a small traced CNN of its own, whose
    tumour logit grows with blue over red (so the slide's tiles get clearly different probabilities)."""
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 1, bias=False),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]]).view(2, 3, 1, 1) * 4)
    folder = tmp_path_factory.mktemp("zoo") / "tils-cnn"
    folder.mkdir()
    torch.jit.save(torch.jit.trace(network, torch.rand(1, 3, 64, 64)), str(folder / "torchscript_model.pt"))
    config = {
        "spec_version": "1.0",
        "architecture": "tils-cnn-v2",
        "num_classes": 2,
        "class_names": ["other", "tumor"],
        "patch_size_pixels": 64,
        "spacing_um_px": 1.0,
        "transform": [
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
        ],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return network, folder


@pytest.mark.slow
def test_a_model_without_an_eager_network_scores_through_its_torchscript_without_cam(
    scripted_folder, svs_050, tmp_path
):
    import zarr

    from tests.qupath_rules import check_file

    network, folder = scripted_folder
    cli = [sys.executable, "-m", "wsi_dala", "run", str(svs_050.path), "--model", str(folder), "-q"]
    done = subprocess.run([*cli, "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "has no eager network here" in done.stderr  # said once, as a warning
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["architecture"] == "torchscript" and record["model"]["cam"].startswith("none")
    assert record["scoring"]["backend"]["engine"] == "torch" and record["scoring"]["backend"]["precision"] == "fp32"
    store = zarr.open_group(tmp_path / "run" / "tiles.zarr", mode="r")
    tiles, scores = store["tiles"][:32], store["scores"][:32]
    assert len(tiles) == 32 and np.isnan(store["cams"][:32]).all()
    images = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        expected = torch.softmax(network(images), dim=1).numpy()
    np.testing.assert_allclose(scores[:, :2], expected, atol=1e-5)
    assert np.ptp(scores[:, 1]) > 0.05  # the comparison means something: the tiles differ
    heatmap = zarr.open_group(tmp_path / "run" / "heatmap.zarr", mode="r")
    np.testing.assert_array_equal(heatmap["tumour/0"][:], heatmap["probability/0"][:])  # NaN where no tissue
    tiles_geojson = json.loads(next((tmp_path / "run").glob("*.tiles.geojson")).read_text())
    measured = tiles_geojson["features"][0]["properties"]["measurements"]
    assert "Tumor probability" in measured and not any("CAM" in name for name in measured)
    check_file(next((tmp_path / "run").glob("*.tiles.geojson")))


def test_the_torchscript_of_an_import_runs_only_from_its_import_cache(scripted_folder, tmp_path):
    import shutil

    from wsi_dala.core.layout import imported_torchscript
    from wsi_dala.interop.model_import import imported_checkpoint
    from wsi_dala.model import load_checkpoint

    _, source = scripted_folder
    folder = tmp_path / "model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".wsi-dala"))
    checkpoint = imported_checkpoint(folder)
    model, card = load_checkpoint(checkpoint)
    assert card.architecture == "torchscript" and model(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (checkpoint, imported_torchscript(checkpoint)):
        shutil.copy(path, elsewhere / path.name)
    with pytest.raises(CheckpointError, match="loaded only from the import cache of a WSInfer model folder"):
        load_checkpoint(elsewhere / checkpoint.name)
    with open(imported_torchscript(checkpoint), "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(CheckpointError, match=r"torchscript\.pt: changed since it was imported"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="imported from a WSInfer TorchScript already"):
        export_model(checkpoint, tmp_path / "out", "onnx")
