"""`train --arch timm:NAME --weights FILE [--freeze-backbone]`: any timm encoder with a linear head, its
weights from a local file, a head trained on features cached in a Zarr, Grad-CAM on a ViT's patch tokens,
and scoring through `run`. Small randomly initialised timm networks stand in for UNI and friends."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from tests.images import write_blob_folder
from wsi_dala.cli import main
from wsi_dala.core.errors import CheckpointError
from wsi_dala.explain.cam import logits_and_raw_cams
from wsi_dala.model import build_model, load_checkpoint

TINY_VIT = "timm:vit_tiny_patch16_224"
TINY_VIT_OPTIONS = {"depth": 2, "embed_dim": 48, "num_heads": 2}


def _tiny_vit_encoder(size: int = 32, **extra):
    import timm

    torch.manual_seed(0)
    return timm.create_model(TINY_VIT[5:], pretrained=False, num_classes=0, img_size=size, **TINY_VIT_OPTIONS, **extra)


@pytest.mark.parametrize(
    ("arch", "options", "grid"),
    [(TINY_VIT, TINY_VIT_OPTIONS, 2), (TINY_VIT, {**TINY_VIT_OPTIONS, "reg_tokens": 4}, 2), ("timm:resnet18", {}, 1)],
)
def test_the_feature_map_is_spatial_and_grad_cam_is_the_class_activation_map(arch, options, grid):
    model = build_model(arch, 2, "none", options, input_size=32).eval()
    images = torch.rand(3, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape[0] == 3 and features.shape[2:] == (grid, grid)
    logits, raw = logits_and_raw_cams(model, images, positive_index=1)
    torch.testing.assert_close(logits, model(images))
    # mean pooling + linear: Grad-CAM's weights are w_c / (h*w), so the map is the CAM of the positive class
    head = model.head.weight.detach()
    cam = torch.relu(torch.einsum("c,nchw->nhw", head[1], features.detach()) / grid**2)
    torch.testing.assert_close(raw, cam, rtol=1e-4, atol=1e-6)


def test_vit_patch_tokens_are_laid_out_on_the_patch_grid():
    model = build_model(TINY_VIT, 2, "none", TINY_VIT_OPTIONS, input_size=64).eval()
    images = torch.rand(1, 3, 64, 64)
    tokens, grid = model.encoder.forward_features(images), model.forward_features(images)
    assert tokens.shape == (1, 1 + 16, 48) and grid.shape == (1, 48, 4, 4)
    # token 1 + 4*r + c (after the class token) is grid cell (r, c): row-major, as patch_embed flattens
    torch.testing.assert_close(grid[0, :, 2, 3], tokens[0, 1 + 4 * 2 + 3])


def test_encoder_weights_load_from_safetensors_and_from_a_wrapped_torch_file(tmp_path):
    encoder = _tiny_vit_encoder(32)
    save_file(encoder.state_dict(), tmp_path / "encoder.safetensors")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in encoder.state_dict().items()}}
    wrapped["state_dict"]["module.head.weight"] = torch.zeros(5, 48)  # a classifier the encoder has no place for
    torch.save(wrapped, tmp_path / "encoder.bin")
    for name in ("encoder.safetensors", "encoder.bin"):
        model = build_model(TINY_VIT, 2, str(tmp_path / name), TINY_VIT_OPTIONS, input_size=32)
        for key, value in encoder.state_dict().items():
            assert torch.equal(model.encoder.state_dict()[key], value), (name, key)


def test_a_vit_trained_at_another_size_gets_its_position_embedding_resampled(tmp_path):
    encoder = _tiny_vit_encoder(32)  # 2x2 patch grid
    save_file(encoder.state_dict(), tmp_path / "small.safetensors")
    model = build_model(TINY_VIT, 2, str(tmp_path / "small.safetensors"), TINY_VIT_OPTIONS, input_size=64)
    assert model.encoder.pos_embed.shape == (1, 1 + 16, 48)
    torch.testing.assert_close(model.encoder.pos_embed[:, 0], encoder.pos_embed[:, 0])  # class token kept
    assert model.forward_features(torch.rand(2, 3, 64, 64)).shape == (2, 48, 4, 4)


def test_weight_files_that_do_not_fit_are_refused_by_name(tmp_path):
    missing = tmp_path / "uni" / "pytorch_model.bin"
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: encoder weights file not found; put"):
        build_model(TINY_VIT, 2, str(missing), TINY_VIT_OPTIONS, input_size=32)
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match=r"other\.safetensors: does not fit timm:vit_tiny"):
        build_model(TINY_VIT, 2, str(other), TINY_VIT_OPTIONS, input_size=32)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    hostile = tmp_path / "hostile.bin"
    torch.save({"state_dict": Payload()}, hostile)
    with pytest.raises(CheckpointError, match=r"hostile\.bin: not a weights-only torch file"):
        build_model(TINY_VIT, 2, str(hostile), TINY_VIT_OPTIONS, input_size=32)
    with pytest.raises(CheckpointError, match="has no model 'no_such_net'"):
        build_model("timm:no_such_net", 2, "none", {}, input_size=32)
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        build_model(TINY_VIT, 2, "imagenet", TINY_VIT_OPTIONS, input_size=32)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """A head trained with --freeze-backbone on a tiny random ViT, from a weights file, via the CLI."""
    root = tmp_path_factory.mktemp("encoder")
    data = write_blob_folder(root / "data", size=32, n=48, groups=6)
    weights = root / "vit.safetensors"
    save_file(_tiny_vit_encoder(32).state_dict(), weights)
    options = [f"--timm-option={k}={v}" for k, v in TINY_VIT_OPTIONS.items()]
    argv = ["train", "--folder", str(data), "--arch", TINY_VIT, *options, "--weights", str(weights)]
    argv += ["--freeze-backbone", "--input-size", "32", "--epochs", "20", "--patience", "20"]
    argv += ["--lr-head", "0.03", "--batch-size", "8"]
    argv += ["--mpp", "0.5", "--precision", "fp32", "-q", "--feature-cache", str(root / "cache")]
    assert main([*argv, "--out", str(root / "run")]) == 0
    return root, argv, weights


def test_freeze_backbone_trains_the_head_alone_on_cached_features(frozen_run):
    root, _, weights = frozen_run
    checkpoint = root / "run" / "best.safetensors"
    trained, original = load_file(str(checkpoint)), load_file(str(weights))
    for key, value in original.items():
        assert torch.equal(trained[f"encoder.{key}"], value), key  # the encoder did not move
    assert not torch.equal(trained["head.weight"], torch.zeros_like(trained["head.weight"]))
    rows = (root / "run" / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in rows]
    assert len(losses) == 20 and losses[-1] < 0.8 * losses[0], losses
    stores = sorted((root / "cache").glob("features-*.zarr"))
    assert len(stores) == 2  # training and validation tiles
    sizes = sorted(zarr.open_group(s, mode="r")["features"].shape for s in stores)
    assert [shape[1] for shape in sizes] == [48, 48] and sum(shape[0] for shape in sizes) == 48
    model, card = load_checkpoint(checkpoint)
    assert card.architecture == TINY_VIT and card.options == TINY_VIT_OPTIONS
    assert card.training_data["encoder"]["frozen"] is True and card.mpp == 0.5
    # reloaded bit-exactly
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_a_second_run_reuses_the_cached_features(frozen_run):
    root, argv, _ = frozen_run
    stores = sorted((root / "cache").glob("features-*.zarr"))
    before = {s: (s / "zarr.json").stat().st_mtime_ns for s in stores}
    assert main([*[a if a != "0.01" else "0.02" for a in argv], "--out", str(root / "again")]) == 0
    assert sorted((root / "cache").glob("features-*.zarr")) == stores
    assert {s: (s / "zarr.json").stat().st_mtime_ns for s in stores} == before


def test_run_scores_a_slide_with_a_vit_head_and_its_patch_token_cams(frozen_run, svs_050, tmp_path):
    root, _, _ = frozen_run
    checkpoint = root / "run" / "best.safetensors"
    cli = [sys.executable, "-m", "wsi_dala", "run", str(svs_050.path), "--model", str(checkpoint), "-q"]
    done = subprocess.run([*cli, "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["counts"]["tiles"] > 0 and record["model"]["architecture"] == TINY_VIT
    tiles = zarr.open_group(tmp_path / "run" / "tiles.zarr", mode="r")
    cams = np.asarray(tiles["cams"][:])
    assert cams.shape[1:] == (2, 2) and np.isfinite(cams).all() and (cams > 0).any()


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--weights", "{tmp}/missing.safetensors"], ["missing.safetensors", "encoder weights file not found"]),
        ([], ["--weights FILE", "nothing is downloaded"]),
        (["--weights", "none", "--timm-option", "depth"], ["--timm-option 'depth'", "KEY=VALUE"]),
    ],
)
def test_encoder_option_errors_are_one_line(capsys, tmp_path, extra, fragments):
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    argv = ["train", "--folder", str(data), "--out", str(tmp_path / "o"), "--arch", TINY_VIT, "-q"]
    code = main([*argv, *[e.format(tmp=tmp_path) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not (tmp_path / "o").exists()


def test_freeze_backbone_needs_an_encoder(capsys, tmp_path):
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    code = main(["train", "--folder", str(data), "--out", str(tmp_path / "o"), "--freeze-backbone", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--freeze-backbone needs an encoder with a pooled linear head" in err[0], err


def test_weights_of_another_layout_are_refused_before_any_data_is_read(capsys, tmp_path):
    """A UNI-like file without the layer-scale tensors that init_values adds: refused before the (possibly
    long) tiling of training slides, with what is missing and the option that adds it."""
    save_file(_tiny_vit_encoder(32).state_dict(), tmp_path / "plain.safetensors")
    data = write_blob_folder(tmp_path / "data", size=32, n=8, groups=4)
    argv = ["train", "--folder", str(data), "--out", str(tmp_path / "o"), "--arch", TINY_VIT, "-q"]
    argv += [f"--timm-option={k}={v}" for k, v in TINY_VIT_OPTIONS.items()]
    argv += ["--timm-option", "init_values=1e-5", "--weights", str(tmp_path / "plain.safetensors")]
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "plain.safetensors: does not fit timm:vit_tiny" in err[0] and "ls1.gamma" in err[0], err[0]
    assert "training on" not in captured.out and not (tmp_path / "o").exists()


def test_the_linear_head_list_agrees_with_the_models_it_names():
    """`TrainConfig` checks --freeze-backbone against a list of names (the config must not import torch);
    the models decide by their head's structure. The two must agree for every torchvision baseline."""
    from wsi_dala.model.registry import LINEAR_HEAD_ARCHITECTURES
    from wsi_dala.model.weights import TORCHVISION as _TORCHVISION

    for arch in _TORCHVISION:
        model = build_model(arch, 2, "none", input_size=224)
        probe = model.linear_probe_encoder()
        assert (probe is not None) == (arch in LINEAR_HEAD_ARCHITECTURES), arch
        assert probe is None or probe is model.features, arch


@pytest.mark.slow
def test_a_frozen_encoder_on_slides_stores_its_features_beside_the_tiles_for_the_next_head(
    tmp_path, monkeypatch, capsys
):
    """`train --freeze-backbone --slide ...` with a timm encoder writes each slide's features.zarr beside its
    training tiles (the store `wsi-dala features` writes, no private cache); a second head trained on them
    (`--features OUT/tiles`) runs no encoder and learns from the same rows; other weights or another stain
    mapping are refused by name before any epoch."""
    from tests.test_features import _count_encoder_passes
    from tests.test_slide_training import _write_qupath_annotations
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    slides = []
    for seed in (21, 22):
        slide = write_synthetic_slide(
            tmp_path / f"case{seed}.svs", SyntheticSlideSpec(width=4096, height=3072, mpp=0.25, seed=seed)
        )
        _write_qupath_annotations(slide, tmp_path / f"case{seed}.geojson")
        slides += ["--slide", f"{slide.path}={tmp_path / f'case{seed}.geojson'}"]
    weights = tmp_path / "vit.safetensors"
    save_file(_tiny_vit_encoder(32).state_dict(), weights)
    argv = ["train", *slides, "--arch", TINY_VIT, *[f"--timm-option={k}={v}" for k, v in TINY_VIT_OPTIONS.items()]]
    argv += ["--weights", str(weights), "--freeze-backbone", "--input-size", "32", "--mpp", "2", "--epochs", "3"]
    argv += ["--batch-size", "32", "--precision", "fp32", "--unannotated-class", "Non-tumor", "-q"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    stores = sorted((tmp_path / "first" / "tiles").glob("*/features.zarr"))
    assert [s.parent.name for s in stores] == ["case21", "case22"] and not (tmp_path / "first" / "features").exists()
    for store in stores:
        group = zarr.open_group(store, mode="r")
        tiles = zarr.open_group(store.parent / "tiles.zarr", mode="r")
        assert group.attrs["complete"] and group.attrs["encoder"]["architecture"] == TINY_VIT
        assert group.attrs["encoder"]["options"] == TINY_VIT_OPTIONS and group.attrs["encoder"]["input_px"] == 32
        assert group["token_mean"].shape == (tiles["coords"].shape[0], 48)
        np.testing.assert_array_equal(group["coords"][:], tiles["coords"][:])
    # The rows are the frozen encoder's pooled map of each tile, as the head sees it.
    model, card = load_checkpoint(tmp_path / "first" / "best.safetensors")
    tiles = zarr.open_group(stores[0].parent / "tiles.zarr", mode="r")
    images = torch.from_numpy(np.asarray(tiles["tiles"][:4])).permute(0, 3, 1, 2).float() / 255.0
    mean, std = (torch.tensor(card.normalisation[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = model.forward_features((images - mean) / std).mean(dim=(2, 3)).numpy()
    stored = np.asarray(zarr.open_group(stores[0], mode="r")["token_mean"][:4], dtype=np.float32)
    np.testing.assert_allclose(stored, expected, atol=2e-3 * np.abs(expected).max())

    passes = _count_encoder_passes(monkeypatch)
    second = [a if a != "3" else "4" for a in argv]  # another head: one more epoch
    assert main([*second, "--out", str(tmp_path / "second"), "--features", str(tmp_path / "first" / "tiles")]) == 0
    assert passes["n"] == 0  # every training and validation tile's features read from the first training's stores
    assert load_checkpoint(tmp_path / "second" / "best.safetensors")[1].training_data["encoder"]["features_from"]
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    save_file(_tiny_vit_encoder(32).state_dict() | {"cls_token": torch.ones(1, 1, 48)}, other)
    for label, extra in (("weights", ["--weights", str(other)]), ("stain", ["--stain-normalise", "macenko"])):
        code = main([*argv, *extra, "--out", str(tmp_path / label), "--features", str(tmp_path / "first" / "tiles")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"no features store of this encoder ({TINY_VIT}" in err[0], (label, err)
        assert "stores found: 2" in err[0], err
