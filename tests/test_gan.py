"""`wsi-dala gan train` / `gan sample`: the StyleGAN2 pieces against their definitions, ADA's controller,
a short real run on generated tiles (the discriminator's loss falls, the checkpoint reloads exactly,
an interrupted run resumes on the same curve, KID is measured and written), sampled tiles that `train
--synthetic` takes, and the refusals."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.images import write_blob_folder
from wsi_dala.cli import main
from wsi_dala.cli.common import EXIT_INTERRUPTED
from wsi_dala.core.config import GanConfig
from wsi_dala.core.errors import CheckpointError
from wsi_dala.gan import training as gan_training
from wsi_dala.gan.ada import AdaptiveAugment, augment
from wsi_dala.gan.networks import GanShape, Generator, ModulatedConv, generate
from wsi_dala.gan.sampling import load_generator
from wsi_dala.model import build_model, read_card

PX = 32
QUICK = ["--resolution", str(PX), "--batch-size", "8", "--channel-max", "32", "--mpp", "0.5", "-q"]


def test_the_modulated_convolution_equals_a_per_sample_demodulated_weight():
    torch.manual_seed(0)
    conv = ModulatedConv(6, 5, 3, w_dim=16)
    x, w = torch.randn(4, 6, 8, 8), torch.randn(4, 16)
    styles = conv.affine(w)
    expected = []
    for i in range(4):  # the paper's definition: w'_ijk = s_i w_ijk, then w'' = w' / sqrt(sum w'^2 + eps)
        weight = conv.weight * conv.gain * styles[i][None, :, None, None]
        weight = weight / (weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
        expected.append(F.conv2d(x[i : i + 1], weight, padding=1))
    assert torch.allclose(conv(x, w), torch.cat(expected), atol=1e-5)


def test_ada_raises_p_when_the_discriminator_is_too_sure_of_real_tiles_and_lowers_it_otherwise():
    ada = AdaptiveAugment(speed_images=1000, interval=4)
    for _ in range(40):
        ada.observe(torch.ones(10))  # r_t = 1 > 0.6: overfitting
    assert ada.p == pytest.approx(0.4)  # 40 steps x 10 images / 1000
    for _ in range(8):
        ada.observe(-torch.ones(10))
    assert ada.p == pytest.approx(0.32)
    images = torch.rand(6, 3, PX, PX, requires_grad=True)
    assert torch.allclose(augment(images, 0.0), images, atol=1e-6)  # p = 0: every transform off
    augment(images, 1.0).sum().backward()  # differentiable: the generator learns through it
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_ada_geometry_keeps_each_tile_whole_a_mirrored_turned_reflect_shifted_copy():
    """Colour transforms keep the channel mean an increasing affine map of the turned, shifted tile's, so
    one of the 8 symmetries x shifts must correlate perfectly with each output: no pixel from another tile."""
    torch.manual_seed(3)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    luma_out = augment(images, 1.0).mean(1)
    shift = 32 // 8
    for tile, out in zip(images.mean(1), luma_out, strict=True):
        best = 0.0
        for mirrored in (tile, tile.flip(-1)):
            for turns in range(4):
                padded = F.pad(mirrored.rot90(turns)[None], (shift,) * 4, mode="reflect")[0]
                for dy in range(2 * shift + 1):
                    for dx in range(2 * shift + 1):
                        crop = padded[dy : dy + 32, dx : dx + 32]
                        best = max(best, float(torch.corrcoef(torch.stack([crop.flatten(), out.flatten()]))[0, 1]))
        assert best > 0.99999


def test_the_sampling_ema_ramps_up_so_a_short_run_does_not_sample_its_random_start():
    from wsi_dala.gan.training import ema_beta

    config = GanConfig(batch_size=16)  # half-life 10,000 images, ramp-up 0.05
    assert ema_beta(config, 0) == 0.0  # first step: the EMA is the trained generator
    assert ema_beta(config, 150) == pytest.approx(0.5 ** (16 / (150 * 16 * 0.05)))  # half-life 120 images
    assert ema_beta(config, 100_000) == pytest.approx(0.5 ** (16 / 10_000))
    start_left = np.prod([ema_beta(config, step) for step in range(150)])
    assert start_left < 1e-6  # of the random start in G_ema after 150 steps (0.85 without the ramp-up)
    assert ema_beta(config.model_copy(update={"ema_rampup": 0.0}), 0) == pytest.approx(0.5 ** (16 / 10_000))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_folder(tmp_path_factory.mktemp("gan-blobs"), PX, 64)


@pytest.fixture(scope="module")
def kid_backbone(tmp_path_factory):
    """A `pretrain`-format backbone (random weights) for KID's feature space."""
    from wsi_dala.training.pretrain import save_backbone

    path = tmp_path_factory.mktemp("kid") / "backbone.safetensors"
    torch.manual_seed(0)
    model = build_model("resnet18", 2, "none", input_size=PX)
    card = {"architecture": "resnet18", "options": {}, "tile_size_px": PX, "method": "none (random, for tests)"}
    save_backbone(path, model, card, leave_out={"head.2.weight", "head.2.bias"})
    return path


@pytest.fixture(scope="module")
def gan_run(blobs, kid_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan-run")
    argv = ["gan", "train", "--folder", str(blobs), "--out", str(out), "--steps", "60", "--checkpoint-every", "20"]
    argv += ["--kid-encoder", str(kid_backbone), "--kid-every", "20", "--kid-samples", "40", *QUICK]
    assert main(argv) == 0
    return out


def _rows(out):
    with open(out / "losses.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_training_lowers_the_discriminator_loss_and_writes_curves_samples_and_kid(gan_run):
    rows = _rows(gan_run)
    assert len(rows) == 60
    first, last = np.mean([r["loss_d"] for r in rows[:5]]), np.mean([r["loss_d"] for r in rows[-10:]])
    assert first > 1.0 and last < first - 0.2, (first, last)  # from about log 4 = 1.39 (no better than chance)
    with open(gan_run / "kid.csv", newline="") as handle:
        kids = list(csv.DictReader(handle))
    assert [int(k["step"]) for k in kids] == [20, 40, 60] and all(math.isfinite(float(k["kid"])) for k in kids)
    # each KID with its spread over torch-fidelity's subsets, which is what says whether a change is real
    assert all(math.isfinite(float(k["kid_sd"])) and float(k["kid_sd"]) > 0 for k in kids)
    for picture in ("curves.png", "samples.png"):
        assert Image.open(gan_run / picture).size[0] >= 600
    with safe_open(str(gan_run / "gan.safetensors"), "pt") as handle:
        card = json.loads(handle.metadata()["wsi_dala.gan_card"])
    assert card["class_names"] == ["normal", "tumour"] and card["steps"] == 60 and card["mpp"] == 0.5
    assert card["kid"]["last"] == round(float(kids[-1]["kid"]), 5) and card["kid"]["last_sd"] > 0
    assert card["tile_size_px"] == PX


def test_the_sampling_generator_reloads_bit_exactly(gan_run):
    generator, _card = load_generator(gan_run / "gan.safetensors", torch.device("cpu"))
    saved = load_file(str(gan_run / "gan.safetensors"))
    own = generator.state_dict()
    assert own.keys() == {k[len("G_ema.") :] for k in saved if k.startswith("G_ema.")}
    assert all(torch.equal(own[k], saved[f"G_ema.{k}"]) for k in own)


def test_an_interrupted_run_resumes_on_the_same_curve(blobs, kid_backbone, gan_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    argv = ["gan", "train", "--folder", str(blobs), "--out", str(out), "--steps", "60", "--checkpoint-every", "20"]
    argv += ["--kid-encoder", str(kid_backbone), "--kid-every", "20", "--kid-samples", "40", *QUICK]
    real = gan_training._checkpoint

    def checkpoint_then_crash(*args, **kwargs):
        real(*args, **kwargs)
        if args[8] == 40:  # the step
            raise KeyboardInterrupt

    monkeypatch.setattr(gan_training, "_checkpoint", checkpoint_then_crash)
    assert main(argv) == EXIT_INTERRUPTED
    monkeypatch.setattr(gan_training, "_checkpoint", real)
    assert main(argv) == 0
    resumed, straight = _rows(out), _rows(gan_run)
    np.testing.assert_allclose([r["loss_d"] for r in resumed], [r["loss_d"] for r in straight], rtol=1e-5)
    a, b = load_file(str(out / "gan.safetensors")), load_file(str(gan_run / "gan.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    kid_resumed, kid_straight = (np.loadtxt(d / "kid.csv", delimiter=",", skiprows=1) for d in (out, gan_run))
    assert kid_resumed.shape == (3, 3)  # step, KID, SD: the resumed run kept the KIDs of before the crash
    np.testing.assert_allclose(kid_resumed, kid_straight, rtol=1e-3, atol=1e-3 * np.abs(kid_straight).max())


def test_sampled_tiles_feed_train_synthetic(gan_run, blobs, tmp_path):
    samples = tmp_path / "generated"
    argv = ["gan", "sample", "--model", str(gan_run / "gan.safetensors"), "--class", "tumour", "--n", "12"]
    assert main([*argv, "--out", str(samples)]) == 0
    card = json.loads((samples / "synthetic.json").read_text())
    assert card["class"] == "tumour" and card["tile_size_px"] == PX and len(card["files"]) == 12
    assert all(Image.open(samples / name).size == (PX, PX) for name in card["files"])
    data = tmp_path / "data"
    shutil.copytree(blobs, data)
    for path in sorted((data / "tumour").glob("*.png"))[8:]:
        path.unlink()  # 32 normal, 8 tumour
    out = tmp_path / "classifier"
    train = ["train", "--folder", str(data), "--out", str(out), "--arch", "resnet18", "--pretrained", "none"]
    train += ["--input-size", str(PX), "--epochs", "1", "--batch-size", "8", "--mpp", "0.5", "-q"]
    assert main([*train, "--synthetic", str(samples)]) == 0
    mix = read_card(out / "best.safetensors").training_data["synthetic"][0]
    assert mix["class"] == "tumour" and mix["added"] > 0 and mix["generator"]["steps"] == 60


def test_gan_inputs_and_outputs_are_refused_where_they_do_not_belong(gan_run, blobs, tmp_path, capsys):
    checkpoint = gan_run / "gan.safetensors"
    with pytest.raises(CheckpointError, match=r"a GAN checkpoint \(wsi-dala gan train\), not backbone weights"):
        build_model("resnet18", 2, str(checkpoint), input_size=PX)
    with pytest.raises(CheckpointError, match="a GAN checkpoint"):
        read_card(checkpoint)
    train = ["gan", "train", "--folder", str(blobs), "--out", str(tmp_path / "g"), *QUICK]
    cases = [
        (["gan", "sample", "--model", str(checkpoint), "--class", "mitosis", "--out", str(tmp_path / "s")], "no class"),
        ([*train, "--class", "mitosis"], "--class 'mitosis' is not one of the classes"),
        ([*train, "--resolution", "48"], "power of two"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_a_generator_is_deterministic_given_its_seed():
    torch.manual_seed(0)
    generator = Generator(GanShape(resolution=PX, n_classes=2, channel_max=32)).eval()
    first = generate(generator, 1, 5, seed=3, device=torch.device("cpu"))
    second = generate(generator, 1, 5, seed=3, device=torch.device("cpu"))
    assert first.dtype == torch.uint8 and first.shape == (5, 3, PX, PX)
    assert torch.equal(first, second)  # latents and per-pixel noise both drawn from the seed
    assert not torch.equal(first, generate(generator, 1, 5, seed=4, device=torch.device("cpu")))
