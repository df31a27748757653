"""Mask-guided training (Deep Pneumonia): lesion masks from QuPath polygons, hard attention, attention
supervision, and the supervised-contrastive term."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import torch
import zarr

from tests.images import write_blob_folder
from tests.test_slide_training import _write_qupath_annotations
from wsi_dala.cli import main
from wsi_dala.model import build_model, read_card
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.guidance import Guidance, guided_logits_and_loss
from wsi_dala.training.lesion_masks import lesion_geometry, tile_mask
from wsi_dala.training.losses import supervised_contrastive_loss


def test_a_tile_mask_is_exact_for_a_polygon_with_a_hole():
    ring = shapely.Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], holes=[[(20, 20), (80, 20), (80, 80), (20, 80)]])
    mask = tile_mask(lesion_geometry([ring]), 0.0, 0.0, 100.0, 50)
    assert mask.mean() == pytest.approx(1 - 0.6**2)  # pixel edges on the polygon's: exact
    assert not mask[25, 25] and mask[5, 5]  # the hole is a hole
    shifted = tile_mask(lesion_geometry([ring]), 50.0, 50.0, 100.0, 50)  # a tile half off the polygon
    assert shifted.mean() == pytest.approx((50 * 50 - 30 * 30) / 100**2)


def test_supervised_contrastive_loss_prefers_clustered_classes():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    mixed = clustered[[0, 2, 1, 3]]
    assert supervised_contrastive_loss(clustered, labels, 0.1) < supervised_contrastive_loss(mixed, labels, 0.1)
    assert supervised_contrastive_loss(clustered, torch.tensor([0, 1, 2, 3]), 0.1) == 0  # no positive pairs


def _batch():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    masks = torch.zeros(4, 1, 64, 64)
    masks[:2, :, :, :32] = 1.0  # two lesion tiles, lesion on their left half
    return images, torch.tensor([1, 1, 0, 0]), masks


def test_hard_attention_damps_the_features_outside_the_lesion():
    model = build_model("resnet18", 2, "none", input_size=64).eval()
    images, targets, masks = _batch()
    plain, extra = guided_logits_and_loss(model, images, targets, masks, Guidance(1))
    torch.testing.assert_close(plain, model(images))
    assert float(extra) == 0.0
    guided, _ = guided_logits_and_loss(model, images, targets, masks, Guidance(1, hard_attention_floor=0.0))
    features = model.forward_features(images)
    keep = torch.zeros_like(features[:2])
    keep[..., :1] = 1.0  # the 2 x 2 feature map: its left column is inside the lesion
    torch.testing.assert_close(guided[:2], model.forward_head(features[:2] * keep))
    torch.testing.assert_close(guided[2:], plain[2:])  # other tiles untouched


@pytest.mark.parametrize("arch", ["dalaresnet50", "resnet18"])
def test_attention_supervision_trains_the_gate_or_the_cam(arch):
    model = build_model(arch, 2, "none", input_size=64).train()
    images, targets, masks = _batch()
    _, extra = guided_logits_and_loss(model, images, targets, masks, Guidance(1, attention_loss_weight=1.0))
    assert float(extra) > 0
    extra.backward()
    if arch == "dalaresnet50":  # the spatial gate itself is pulled toward the mask
        trained = next(model.attention[0].parameters())
    else:  # no gate: the differentiable Grad-CAM carries the supervision into the last stage
        trained = dict(model.named_parameters())["features.7.1.conv2.weight"]
    assert trained.grad is not None and trained.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lesions")
    paths = []
    for seed in (21, 22, 23):
        slide = write_synthetic_slide(
            folder / f"case{seed}.svs", SyntheticSlideSpec(width=4096, height=3072, mpp=0.25, seed=seed)
        )
        _write_qupath_annotations(slide, folder / f"case{seed}.geojson")
        paths.append(slide.path)
    return folder, paths


def test_mask_guided_training_from_annotated_slides(annotated):
    folder, paths = annotated
    argv = ["train", *[f"--slide={p}" for p in paths], "--unannotated-class", "Normal", "--mpp", "1.0"]
    argv += ["--input-size", "64", "--out", str(folder / "run"), "--pretrained", "none", "--epochs", "1"]
    argv += ["--batch-size", "16", "--mask-guided", "--contrastive-weight", "0.1", "--precision", "fp32", "-q"]
    assert main(argv) == 0
    card = read_card(folder / "run" / "best.safetensors")
    guidance = card.training_data["guidance"]
    assert guidance["mask_guided"] and guidance["lesion_class"] == "Tumor" and guidance["hard_attention_floor"] == 0.1
    stores = sorted((folder / "run" / "tiles").glob("*/lesion_masks.zarr"))
    assert stores
    masks = np.asarray(zarr.open_group(stores[0], mode="r")["masks"][:])
    assert masks.dtype == bool and masks.shape[1:] == (64, 64) and masks.any()
    summary = json.loads((folder / "run" / "train.json").read_text())
    assert summary["config"]["mask_guided"] is True


def test_mask_guidance_errors_are_one_line(annotated, capsys, tmp_path):
    _, paths = annotated
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    assert main(["train", "--folder", str(data), "--out", str(tmp_path / "a"), "--mask-guided", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mask-guided needs slides annotated in QuPath (--slide S.svs=S.geojson)" in err[0]
    argv = ["train", f"--slide={paths[0]}", f"--slide={paths[1]}", "--unannotated-class", "Normal", "--mpp", "2.0"]
    argv += ["--input-size", "64", "--out", str(tmp_path / "b"), "--pretrained", "none", "--epochs", "1"]
    argv += ["--mask-guided", "--positive-class", "Normal", "-q"]  # Normal is drawn nowhere: no lesion polygon
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no polygon of the lesion class 'Normal'" in err[0], err
