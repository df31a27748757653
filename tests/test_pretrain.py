"""`wsi-dala pretrain`: SimCLR on unlabelled tile stores. The views (HED jitter equal to scikit-image's,
crops at the tile's scale), the loss (NT-Xent against its textbook form), an end-to-end run on real
tile stores of generated slides (the loss falls, the resumed run continues the same curve, the
backbone reloads bit-exactly into `train --pretrained`), and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from skimage import data as skdata
from skimage.color import hed2rgb, rgb2hed

from wsi_dala.cli import main
from wsi_dala.cli.common import EXIT_INTERRUPTED
from wsi_dala.core.config import PretrainConfig
from wsi_dala.core.errors import CheckpointError, ConfigError
from wsi_dala.model import build_model, read_card
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training import pretrain as pretrain_module
from wsi_dala.training.losses import nt_xent_loss
from wsi_dala.training.unlabelled import slide_balanced_weights, unlabelled_set
from wsi_dala.training.views import ViewSettings, hed_jitter, hed_to_rgb, histology_view, rgb_to_hed

TILE_PX = 64
QUICK = ["--arch", "resnet18", "--pretrained", "none", "--batch-size", "16", "--tiles-per-epoch", "128", "-q"]


def _ihc_crop() -> np.ndarray:
    return skdata.immunohistochemistry()[100:164, 200:264]  # a real IHC image (haematoxylin + DAB)


def test_hed_transforms_equal_scikit_image_on_a_real_stained_image():
    rgb = _ihc_crop()
    batch = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    ours = rgb_to_hed(batch)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, rgb2hed(rgb), atol=2e-5)
    back = hed_to_rgb(torch.from_numpy(rgb2hed(rgb)).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, hed2rgb(rgb2hed(rgb)), atol=2e-5)


def test_hed_jitter_changes_each_stain_within_its_bounds():
    batch = torch.from_numpy(_ihc_crop()).permute(2, 0, 1)[None].float().repeat(8, 1, 1, 1) / 255.0
    generator = torch.Generator().manual_seed(0)
    jittered = hed_jitter(batch, scale=0.2, shift=0.0, generator=generator)
    before, after = rgb_to_hed(batch), rgb_to_hed(jittered)
    ratios = after.sum(dim=(2, 3)) / before.sum(dim=(2, 3))  # [8, 3]: each image's stain amounts scaled
    stained = ratios[:, [0, 2]]  # haematoxylin and DAB (this IHC image has no eosin)
    assert ((stained > 0.78) & (stained < 1.22)).all()  # each within U(1 ± 0.2), clipping aside
    assert ratios[:, 0].std() > 0.02  # and not all by the same factor
    assert not torch.allclose(jittered, batch, atol=1e-3)
    unchanged = hed_jitter(batch, scale=0.0, shift=0.0, generator=generator)
    assert (unchanged - hed_to_rgb(rgb_to_hed(batch))).abs().max() < 1e-5


def test_a_view_is_a_crop_at_the_tiles_own_scale_turned_or_mirrored():
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (4, 3, TILE_PX, TILE_PX), dtype=np.uint8))
    plain = ViewSettings(hed_scale=0, hed_shift=0, blur_probability=0, brightness=0, contrast=0)
    views = histology_view(tiles, plain, torch.Generator().manual_seed(1))
    side = plain.crop_px(TILE_PX)
    assert views.shape == (4, 3, side, side) and side == 48
    identity_of_hed = hed_to_rgb(rgb_to_hed(tiles.float() / 255))
    for view, tile in zip(views, identity_of_hed, strict=True):
        candidates = [torch.rot90(tile, k, dims=(1, 2)) for k in range(4)]
        candidates += [torch.flip(c, dims=(2,)) for c in candidates]
        found = any(
            torch.allclose(view, c[:, y : y + side, x : x + side], atol=1e-5)
            for c in candidates
            for y in range(TILE_PX - side + 1)
            for x in range(TILE_PX - side + 1)
        )
        assert found, "a view is not an unscaled crop of a turned or mirrored tile"


def test_nt_xent_equals_its_textbook_form():
    torch.manual_seed(0)
    first, second = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(6, 16), dim=1)
    embeddings = torch.cat([first, second])
    logits = embeddings @ embeddings.T / 0.3
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    expected = F.cross_entropy(logits, targets)
    assert torch.isclose(nt_xent_loss(first, second, 0.3), expected, atol=1e-6)
    assert nt_xent_loss(first, first, 0.3) < nt_xent_loss(first, second, 0.3)  # matching views: lower loss


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Tile stores of two generated slides at 64 px, 2 µm/px, written by `wsi-dala tile`."""
    root = tmp_path_factory.mktemp("pretrain-stores")
    runs = []
    for seed in (11, 12):
        spec = SyntheticSlideSpec(width=3072, height=2304, seed=seed)
        slide = write_synthetic_slide(root / f"s{seed}.svs", spec).path
        run = root / f"run{seed}"
        assert main(["tile", str(slide), "--out", str(run), "--mpp", "2.0", "--tile-size", str(TILE_PX), "-q"]) == 0
        runs.append(run)
    return runs


def test_slides_get_equal_shares_of_the_draws(stores):
    data = unlabelled_set([stores[0] / "tiles.zarr", stores[1]], None, [])
    weights = slide_balanced_weights(data.samples)
    groups = np.array([s.group for s in data.samples])
    shares = [weights[groups == g].sum() for g in np.unique(groups)]
    assert len(shares) == 2 and np.isclose(shares[0], shares[1])
    assert data.tile_size_px == TILE_PX and data.mpp == pytest.approx(2.0, rel=0.02)


@pytest.fixture(scope="module")
def pretrained(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain-run")
    argv = ["pretrain", "--stores", *map(str, stores), "--out", str(out), "--epochs", "4", *QUICK]
    assert main(argv) == 0
    return out


def test_pretraining_lowers_the_loss_and_writes_a_backbone_with_its_card(pretrained):
    losses = np.loadtxt(pretrained / "loss.csv", delimiter=",", skiprows=1)[:, 2]
    per_epoch = losses.reshape(4, -1).mean(axis=1)
    assert per_epoch[2:].mean() < per_epoch[0] - 0.1, per_epoch  # from near log(2N - 1) = 3.43 (chance)
    assert (pretrained / "loss.png").stat().st_size > 10_000
    with safe_open(str(pretrained / "backbone.safetensors"), framework="pt") as handle:
        card = json.loads(handle.metadata()["wsi_dala.pretrain_card"])
        keys = list(handle.keys())
    assert card["architecture"] == "resnet18" and card["epochs"] == 4 and card["data"]["slides"] == 2
    assert card["mpp"] == pytest.approx(2.0, rel=0.02) and card["view_size_px"] == 48
    assert "SimCLR" in card["method"] and not any(k.startswith("head.") for k in keys)


def test_the_backbone_reloads_bit_exactly_into_train(pretrained):
    saved = load_file(str(pretrained / "backbone.safetensors"))
    model = build_model("resnet18", 3, str(pretrained / "backbone.safetensors"), input_size=TILE_PX)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items()) and len(saved) == len(own) - 2  # all but the head


def test_a_resumed_run_continues_the_same_curve(stores, pretrained, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_save = pretrain_module._save_state

    def save_then_crash(path, key, epoch, *args):
        real_save(path, key, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt  # killed after the second epoch was saved

    monkeypatch.setattr(pretrain_module, "_save_state", save_then_crash)
    interrupted = main(["pretrain", "--stores", *map(str, stores), "--out", str(out), "--epochs", "4", *QUICK])
    assert interrupted == EXIT_INTERRUPTED
    monkeypatch.setattr(pretrain_module, "_save_state", real_save)
    assert main(["pretrain", "--stores", *map(str, stores), "--out", str(out), "--epochs", "4", *QUICK]) == 0
    resumed = np.loadtxt(out / "loss.csv", delimiter=",", skiprows=1)[:, 2]
    straight = np.loadtxt(pretrained / "loss.csv", delimiter=",", skiprows=1)[:, 2]
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)
    a, b = load_file(str(out / "backbone.safetensors")), load_file(str(pretrained / "backbone.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_backbone_is_refused_where_a_classifier_is_wanted_and_for_another_architecture(pretrained):
    backbone = pretrained / "backbone.safetensors"
    with pytest.raises(CheckpointError, match=r"a pre-trained backbone \(wsi-dala pretrain\), not a classifier"):
        read_card(backbone)
    with pytest.raises(CheckpointError, match="pre-trained for resnet18, not resnet50; use --arch resnet18"):
        build_model("resnet50", 2, str(backbone), input_size=TILE_PX)


def test_bad_stores_are_refused_with_the_file_named(stores, tmp_path, blank_slide, capsys):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(stores[0], incomplete)
    import zarr

    group = zarr.open_group(incomplete / "tiles.zarr", mode="r+")
    assert group.attrs["complete"] is True
    group.attrs["complete"] = False  # as a store whose tiling was interrupted
    with pytest.raises(ConfigError, match=r"incomplete.*tiles\.zarr: tile store is incomplete"):
        unlabelled_set([incomplete], None, [])
    empty = tmp_path / "empty-run"
    main(["tile", str(blank_slide), "--out", str(empty), "--mpp", "2.0", "--tile-size", str(TILE_PX), "-q"])
    if (empty / "tiles.zarr").is_dir():
        with pytest.raises(ConfigError, match=r"empty-run/tiles\.zarr: tile store has no tiles"):
            unlabelled_set([empty], None, [])
    other = tmp_path / "other"
    slide = write_synthetic_slide(tmp_path / "o.svs", SyntheticSlideSpec(width=2048, height=1536, seed=13)).path
    main(["tile", str(slide), "--out", str(other), "--mpp", "2.0", "--tile-size", "32", "-q"])
    with pytest.raises(ConfigError, match=r"other/tiles\.zarr: tiles are 32 px, those of .* are 64 px"):
        unlabelled_set([stores[0], other], None, [])
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(ConfigError, match=r"nothing: no tiles\.zarr below this folder"):
        unlabelled_set([], nothing, [])
    code = main(["pretrain", "--out", str(tmp_path / "x"), "-q"])
    assert code == 2 and "give --stores, --archive or --folder" in capsys.readouterr().err


def test_pretrain_config_refuses_a_bad_setting():
    with pytest.raises(ValueError, match="crop_fraction"):
        PretrainConfig(crop_fraction=1.5)


def test_train_from_a_pretrained_backbone_records_the_pretraining_in_its_card(pretrained, tmp_path):
    from tests.images import write_blob_folder

    folder = write_blob_folder(tmp_path / "blobs", TILE_PX, 24)
    out = tmp_path / "train"
    backbone = pretrained / "backbone.safetensors"
    argv = ["train", "--folder", str(folder), "--out", str(out), "--arch", "resnet18", "--pretrained", str(backbone)]
    assert main([*argv, "--input-size", str(TILE_PX), "--epochs", "1", "--batch-size", "8", "-q"]) == 0
    card = read_card(out / "best.safetensors")
    assert "SimCLR" in card.training_data["pretraining"]["method"]
    assert card.training_data["pretraining"]["data"]["slides"] == 2


def test_a_linear_probe_on_a_pretrained_backbone_trains_the_head_alone(pretrained, tmp_path, capsys):
    """`train --pretrained BACKBONE --freeze-backbone` with a torchvision CNN: the encoder is the
    backbone bit for bit, the head learns on cached pooled features; an MLP head (vgg16) is refused."""
    from tests.images import write_blob_folder

    folder = write_blob_folder(tmp_path / "blobs", TILE_PX, 32)
    out = tmp_path / "probe"
    backbone = pretrained / "backbone.safetensors"
    argv = ["train", "--folder", str(folder), "--out", str(out), "--arch", "resnet18", "--pretrained", str(backbone)]
    argv += ["--freeze-backbone", "--input-size", str(TILE_PX), "--epochs", "15", "--patience", "15"]
    assert main([*argv, "--lr-head", "0.03", "--batch-size", "8", "--precision", "fp32", "-q"]) == 0
    trained, saved = load_file(str(out / "best.safetensors")), load_file(str(backbone))
    assert all(torch.equal(trained[k], v) for k, v in saved.items()) and len(saved) == len(trained) - 2
    losses = np.loadtxt(out / "metrics.csv", delimiter=",", skiprows=1, usecols=1)
    assert len(losses) == 15 and losses[-3:].mean() < 0.8 * losses[0], losses
    assert len(list((out / "features").glob("features-*.zarr"))) == 2  # training and validation tiles
    card = read_card(out / "best.safetensors")
    assert card.training_data["encoder"]["frozen"] is True and "SimCLR" in card.training_data["pretraining"]["method"]
    code = main(
        ["train", "--folder", str(folder), "--out", str(tmp_path / "vgg"), "--arch", "vgg16", "--freeze-backbone"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pooled linear head" in err[0] and "not vgg16" in err[0], err
    assert not (tmp_path / "vgg").exists()


def test_a_collapsed_encoder_is_recognised_by_its_loss_at_chance(pretrained):
    from wsi_dala.training.pretrain import chance_loss, collapsed

    assert chance_loss(16) == pytest.approx(np.log(31))
    assert collapsed([np.log(31)] * 8, 4, 16) and not collapsed([3.0] * 8, 4, 16)
    with safe_open(str(pretrained / "backbone.safetensors"), framework="pt") as handle:
        card = json.loads(handle.metadata()["wsi_dala.pretrain_card"])
    assert card["collapsed"] is False and card["final_epoch_loss"] < card["chance_loss"]


def test_pretrain_takes_the_architecture_options_of_train_and_train_must_match_them(stores, tmp_path, capsys):
    out = tmp_path / "se"
    argv = ["pretrain", "--stores", *map(str, stores), "--out", str(out), "--epochs", "1", "--arch", "dalaresnet50"]
    argv += ["--attention-kind", "se", "--pretrained", "none", "--batch-size", "8", "--tiles-per-epoch", "16", "-q"]
    assert main(argv) == 0
    backbone = out / "backbone.safetensors"
    with safe_open(str(backbone), framework="pt") as handle:
        card = json.loads(handle.metadata()["wsi_dala.pretrain_card"])
    assert card["options"]["attention_kind"] == "se"
    se = {"attention_position": "end", "attention_kind": "se", "gate_mode": "x*a"}
    model = build_model("dalaresnet50", 2, str(backbone), options=se, input_size=TILE_PX)
    saved = load_file(str(backbone))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(CheckpointError, match=r"do not fit this dalaresnet50; it was pre-trained with options .*'se'"):
        build_model("dalaresnet50", 2, str(backbone), options={**se, "attention_kind": "gate"}, input_size=TILE_PX)
    wrong = ["--vit-option", "depth=1"]  # a resvit-gannet option given with resnet18
    code = main(["pretrain", "--stores", str(stores[0]), "--out", str(tmp_path / "x"), *QUICK, *wrong])
    assert code == 2 and "apply to --arch resvit-gannet only" in capsys.readouterr().err
