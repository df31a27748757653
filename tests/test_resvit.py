"""ResViT-GANNet: two branches fused by TAMA; trains, checkpoints, reloads bit-exactly, scores through `run`
and gives DT Grad-CAM on the CNN branch. Tiny inputs and a tiny timm ViT keep it CPU-sized."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from tests.images import write_blob_folder
from wsi_dala.cli import main
from wsi_dala.core.errors import CheckpointError
from wsi_dala.explain.cam import logits_and_raw_cams
from wsi_dala.model import build_model, load_checkpoint, read_card
from wsi_dala.model.resvit import CNN_CHANNELS, resnet_grid

TINY = {
    "vit": "timm:vit_tiny_patch16_224",
    "vit_options": {"depth": 3, "embed_dim": 48, "num_heads": 2},
    "fused_blocks": 2,
    "heads": 4,
}
TINY_FLAGS = ["--vit", "timm:vit_tiny_patch16_224", "--vit-option", "depth=3", "--vit-option", "embed_dim=48"]
TINY_FLAGS += ["--vit-option", "num_heads=2", "--fused-blocks", "2", "--tama-heads", "4"]


def test_grids_and_shapes():
    assert [resnet_grid(s) for s in (224, 64, 96, 100)] == [7, 2, 3, 4]
    torch.manual_seed(0)
    before = build_model("resvit-gannet", 3, "none", {**TINY, "cam_layer": "cnn"}, input_size=64).eval()
    features = before.forward_features(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, CNN_CHANNELS + 48, 2, 2)  # the ViT's 4 x 4 patches pooled onto the CNN's 2 x 2
    assert before(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    weights = torch.softmax(before.fusion_logits, 0)
    assert weights.shape == (2,) and torch.allclose(weights, torch.full((2,), 0.5))
    after = build_model("resvit-gannet", 3, "none", TINY, input_size=64).eval()
    after.load_state_dict(before.state_dict())  # the split point moves; the parameters are the same
    images = torch.rand(2, 3, 64, 64)
    assert after.forward_features(images).shape == (2, 2 * 48, 2, 2)  # TAMA-attended CNN and ViT tokens
    torch.testing.assert_close(after(images), before(images))


def test_grad_cam_on_the_tama_attended_cnn_tokens_is_their_class_activation_map():
    torch.manual_seed(2)
    model = build_model("resvit-gannet", 2, "none", TINY, input_size=64).eval()
    images = torch.rand(3, 3, 64, 64)
    _, raw = logits_and_raw_cams(model, images, positive_index=1)
    features = model.forward_features(images)
    weights = model.head.classifier[-1].weight[1, 48:]  # the classifier's CNN half (after the ViT half)
    cam = torch.relu(torch.einsum("d,ndhw->nhw", weights, features[:, :48]) / 4)
    torch.testing.assert_close(raw, cam.detach(), rtol=1e-4, atol=1e-6)


def test_bad_options_are_refused_by_name():
    with pytest.raises(CheckpointError, match="16-px patches do not divide the tile size 72; use --input-size"):
        build_model("resvit-gannet", 2, "none", TINY, input_size=72)
    with pytest.raises(CheckpointError, match="--tama-heads 5 does not divide the ViT width 48"):
        build_model("resvit-gannet", 2, "none", {**TINY, "heads": 5}, input_size=64)
    with pytest.raises(CheckpointError, match="--fused-blocks 9: the ViT has 3 blocks"):
        build_model("resvit-gannet", 2, "none", {**TINY, "fused_blocks": 9}, input_size=64)
    with pytest.raises(CheckpointError, match="unknown ResViT-GANNet options"):
        build_model("resvit-gannet", 2, "none", {**TINY, "depth": 3}, input_size=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("resvit")
    data = write_blob_folder(root / "data", size=64, n=32, groups=4)
    argv = ["train", "--folder", str(data), "--out", str(root / "run"), "--arch", "resvit-gannet", *TINY_FLAGS]
    argv += ["--pretrained", "none", "--input-size", "64", "--epochs", "1", "--batch-size", "8", "--mpp", "1.0"]
    assert main([*argv, "--precision", "fp32", "-q"]) == 0
    return root / "run" / "best.safetensors"


def test_it_trains_checkpoints_and_reloads_bit_exactly(trained):
    card = read_card(trained)
    assert card.architecture == "resvit-gannet" and card.options == {**TINY, "cam_layer": "tama"}
    model, _ = load_checkpoint(trained)
    saved = load_file(str(trained))
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.slow
def test_run_scores_a_slide_with_its_cams(trained, svs_050, tmp_path):
    cli = [sys.executable, "-m", "wsi_dala", "run", str(svs_050.path), "--model", str(trained), "-q"]
    done = subprocess.run([*cli, "--out", str(tmp_path / "run"), "--backend", "torch"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["architecture"] == "resvit-gannet" and record["model"]["cam"] == "DT Grad-CAM"
    store = zarr.open_group(tmp_path / "run" / "tiles.zarr", mode="r")
    cams = np.asarray(store["cams"][:])
    assert cams.shape[1:] == (2, 2) and np.isfinite(cams).all() and (cams > 0).any()


def test_resvit_flags_need_the_architecture(capsys, tmp_path):
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    code = main(["train", "--folder", str(data), "--out", str(tmp_path / "o"), "--fused-blocks", "2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "apply to --arch resvit-gannet only" in err[0], err
