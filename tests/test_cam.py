"""DT Grad-CAM: thresholds, the head-only gradient shortcut, and maps that land on what decides the class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.images import blob_image
from wsi_dala.cli import main
from wsi_dala.explain.cam import CamSettings, dt_gradcam, dynamic_threshold, logits_and_raw_cams
from wsi_dala.model import DALAResNet50, load_checkpoint
from wsi_dala.model.devices import normalise


def test_thresholds_follow_each_maps_distribution():
    cam = np.zeros((10, 10), dtype=np.float32)
    cam[:2] = 1.0  # 20 % of the map is hot
    assert dynamic_threshold(cam, CamSettings("mean_std", k=1.0)) == pytest.approx(0.2 + 0.4)
    assert dynamic_threshold(cam, CamSettings("percentile", percentile=50)) == pytest.approx(0.0)
    assert dynamic_threshold(cam, CamSettings("percentile", percentile=90)) == pytest.approx(1.0)
    assert 0 < dynamic_threshold(cam, CamSettings("otsu")) <= 1.0
    spike = np.zeros((10, 10), dtype=np.float32)
    spike[5, 5] = 1.0
    assert dynamic_threshold(spike, CamSettings("mean_std", k=50.0)) == 1.0  # clipped: never empty
    with pytest.raises(ValueError):
        CamSettings("median")


def test_masks_are_never_empty_and_maps_are_thresholded():
    raw = torch.rand(3, 4, 4)
    result = dt_gradcam(raw, 32, CamSettings("mean_std", k=3.0))
    assert result.maps.shape == (3, 32, 32) and result.masks.dtype == bool
    assert all(mask.any() for mask in result.masks)
    assert np.all(result.maps[~result.masks] == 0)
    assert np.all(result.maps[result.masks] >= result.thresholds.repeat(32 * 32).reshape(3, 32, 32)[result.masks])


def test_head_only_gradient_equals_full_grad_cam():
    """The shortcut (no autograd through the backbone) gives exactly classic Grad-CAM."""
    torch.manual_seed(0)
    model = DALAResNet50(2).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, raw = logits_and_raw_cams(model, x, positive_index=1)
    features = model.forward_features(x)
    features.retain_grad()
    model.forward_head(features)[:, 1].sum().backward()
    alpha = features.grad.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((alpha * features).sum(1)).detach()
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, model(x).detach())


def test_dt_gradcam_lands_on_the_blob(blob_model):
    result, _ = blob_model
    model, card = load_checkpoint(result.checkpoint)
    rng = np.random.default_rng(123)
    inside, hotter = [], []
    for _ in range(12):
        image, blob = blob_image(96, True, rng)
        x = normalise(
            torch.from_numpy(image).permute(2, 0, 1)[None], card.normalisation["mean"], card.normalisation["std"]
        )
        logits, raw = logits_and_raw_cams(model, x, card.positive_index)
        assert torch.softmax(logits, 1)[0, card.positive_index] > 0.5
        cam = dt_gradcam(raw, 96)
        mask = cam.masks[0]
        inside.append((mask & blob).sum() / mask.sum())
        hotter.append(cam.gradcam[0][blob].mean() > cam.gradcam[0][~blob].mean())
    blob_share = blob.mean()
    assert np.mean(hotter) >= 0.9
    assert np.mean(inside) >= 3 * blob_share  # the mask sits on the blob far more than by chance


def test_cam_cli_writes_side_by_side_pngs(blob_model, tmp_path, capsys):
    from PIL import Image

    result, _ = blob_model
    rng = np.random.default_rng(7)
    paths = []
    for i in range(2):
        image, _ = blob_image(120, i == 1, rng)  # larger than the model's input: centre-cropped
        paths.append(tmp_path / f"tile{i}.png")
        Image.fromarray(image).save(paths[-1])
    code = main(
        [
            "cam",
            *map(str, paths),
            "--model",
            str(result.checkpoint),
            "--out",
            str(tmp_path / "cams"),
            "--threshold-method",
            "otsu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("tumour probability") == 2
    figure = Image.open(tmp_path / "cams" / "tile1.cam.png")
    assert figure.size == (3 * 96 * 3, 96 * 3 + 30)  # 96-px tiles enlarged 3x (whole pixels) under a title
    pixels = np.asarray(figure.convert("RGB"))[30:]
    assert (pixels[::3, ::3] == pixels[1::3, 1::3]).all()  # nearest-neighbour: each tile pixel a 3x3 block


@pytest.mark.skipif(
    not __import__("wsi_dala.model.devices", fromlist=["x"]).cpu_supports_bf16(),
    reason="this CPU has no native bf16; scoring runs in fp32 here",
)
def test_bf16_scoring_stays_within_stated_tolerance_of_fp32(blob_model):
    from wsi_dala.inference.scoring import score_tiles

    result, _ = blob_model
    rng = np.random.default_rng(3)
    tiles = np.stack([blob_image(96, i % 2 == 1, rng)[0] for i in range(32)])
    fp32 = score_tiles(tiles, str(result.checkpoint), "cpu", "fp32", 16)
    bf16 = score_tiles(tiles, str(result.checkpoint), "cpu", "bf16", 16)
    assert np.abs(fp32[:, :2] - bf16[:, :2]).max() <= 0.05  # the tolerance docs/how-it-works.md states
    assert ((fp32[:, 1] >= 0.5) == (bf16[:, 1] >= 0.5)).all()
    cams32, cams16 = fp32[:, 3:], bf16[:, 3:]  # rows: 2 probabilities, the SD (NaN: not asked for), the CAM
    assert np.abs(cams32 - cams16).max() <= 0.05 * cams32.max()
