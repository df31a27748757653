"""Test-time augmentation and MC dropout: exact views, CAMs mapped back, a per-tile SD that means something,
the card's temperature applied, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from wsi_dala.cli import main
from wsi_dala.core.errors import ConfigError
from wsi_dala.inference.scoring import Uncertainty, cached_model, score_tiles
from wsi_dala.inference.tta import VIEWS, apply_view, dropout_modules, require_square, undo_view
from wsi_dala.model import load_checkpoint, read_card, save_checkpoint, write_untrained_checkpoint
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import TileStore

PURPLE, PINK = (120, 40, 150), (235, 170, 210)


def _score(tiles, checkpoint, uncertainty=None):
    packed = score_tiles(tiles, str(checkpoint), "cpu", "fp32", 8, None, uncertainty)
    n_classes = len(read_card(checkpoint).class_names)
    grid = round((packed.shape[1] - n_classes - 1) ** 0.5)
    return packed[:, :n_classes], packed[:, n_classes], packed[:, n_classes + 1 :].reshape(len(packed), grid, grid)


def _corner_tile() -> np.ndarray:
    """A pink 64-px tile with a purple (tumour-coloured) patch in its top-left corner: an asymmetric CAM."""
    tile = np.empty((64, 64, 3), dtype=np.uint8)
    tile[:] = PINK
    tile[:24, :16] = PURPLE
    return tile


def test_views_form_the_group_and_undo_is_exact():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    seen = {}
    for kind, group in VIEWS.items():
        images = {apply_view(x, view).numpy().tobytes() for view in group}
        assert len(images) == len(group), kind  # every view is a different picture
        for view in group:
            assert torch.equal(undo_view(apply_view(x, view), view), x)
        seen[kind] = images
    assert seen["flips"] < seen["d4"] and len(seen["d4"]) == 8
    left_right = apply_view(x, VIEWS["flips"][1])
    top_bottom = apply_view(x, VIEWS["flips"][2])
    assert torch.equal(left_right, torch.flip(x, dims=(-1,))) and torch.equal(top_bottom, torch.flip(x, dims=(-2,)))


def test_cams_are_mapped_back_into_the_tile_frame(colour_checkpoint):
    """The colour scorer's CAM is its purple map, so it turns with the image: averaged over all eight
    views, mapped back, it must equal the plain CAM — hot in the top-left corner, not smeared round."""
    tiles = np.stack([_corner_tile()])
    plain_p, plain_sd, plain_cam = _score(tiles, colour_checkpoint)
    d4_p, d4_sd, d4_cam = _score(tiles, colour_checkpoint, Uncertainty("d4"))
    assert np.isnan(plain_sd).all()  # nothing asked for: nothing measured
    assert plain_cam[0, 0, 0] > 0.5 and plain_cam[0, -1, -1] < 0.05  # the corner patch
    np.testing.assert_allclose(d4_cam, plain_cam, atol=1e-5)
    np.testing.assert_allclose(d4_p, plain_p, atol=1e-5)  # colour is blind to turns: SD 0
    assert d4_sd[0] == pytest.approx(0.0, abs=1e-6)


def test_temperature_from_the_card_divides_the_logits(colour_checkpoint, tmp_path):
    model, card = load_checkpoint(colour_checkpoint)
    card.temperature = 2.0
    hot = save_checkpoint(tmp_path / "calibrated.safetensors", model, card)
    tiles = np.stack([_corner_tile()])
    plain, _, _ = _score(tiles, colour_checkpoint)
    scaled, _, _ = _score(tiles, hot)
    logit = np.log(plain[0, 1] / plain[0, 0])
    assert abs(logit) > 0.5  # a tile the model has an opinion on
    assert scaled[0, 1] == pytest.approx(1 / (1 + np.exp(-logit / 2.0)), rel=1e-4)


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory):
    """An untrained DALAResNet50 at 64 px (head dropout 0.5), the smallest that has a 2 x 2 CAM."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("dala") / "dala.safetensors", tile_size_px=64)


def test_mc_dropout_gives_a_spread_repeatably_and_leaves_the_model_as_it_was(dropout_checkpoint):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    plain_p, _, plain_cam = _score(tiles, dropout_checkpoint)
    p, sd, cam = _score(tiles, dropout_checkpoint, Uncertainty(mc_dropout=6))
    again = _score(tiles, dropout_checkpoint, Uncertainty(mc_dropout=6))
    assert (sd > 0).all() and np.isfinite(sd).all()
    np.testing.assert_array_equal(sd, again[1])  # seeded: a rerun (or a resumed chunk) gives the same SD
    np.testing.assert_allclose(p, plain_p, atol=1e-6)  # the reported probability stays the deterministic one
    np.testing.assert_allclose(cam, plain_cam, atol=1e-6)
    model, _card = cached_model(str(dropout_checkpoint), "cpu")
    assert dropout_modules(model) and not any(m.training for m in model.modules())


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match=r"slide.svs: --tta needs square tiles; these are 48 x 64 px"):
        require_square(64, 48, "slide.svs")
    require_square(64, 64, "slide.svs")


def test_run_with_tta_stores_and_exports_the_spread(tmp_path, capsys, colour_checkpoint):
    slide = write_synthetic_slide(
        tmp_path / "small.svs", SyntheticSlideSpec(width=2048, height=1536, mpp=0.5, seed=7, pen_marks=False)
    )
    out = tmp_path / "run"
    args = ["run", str(slide.path), "--model", str(colour_checkpoint), "--out", str(out), "--min-tissue", "0.05"]
    assert main([*args, "--tta", "flips", "-q"]) == 0
    record = json.loads((out / "run.json").read_text())
    store = TileStore(out / "tiles.zarr")
    assert store.info.scoring.uncertainty == "tta:flips" and record["settings"]["scoring"]["tta"] == "flips"
    assert np.isfinite(store.score_sd()).all() and (store.score_sd() >= 0).all()
    tiles = json.loads((out / "small.tiles.geojson").read_text())["features"]
    assert all("Tumor probability SD" in f["properties"]["measurements"] for f in tiles)
    assert "uncertainty" in zarr.open_group(out / "heatmap.zarr", mode="r").attrs["layers"]
    assert (out / record["outputs"]["uncertainty"]).exists()
    # MC dropout on a model whose head has no dropout, and one pass: refused before any work
    capsys.readouterr()
    assert main([*args, "--mc-dropout", "4", "-q"]) == 2
    assert "--mc-dropout needs dropout in the model's head; ColourReferenceScorer has none" in capsys.readouterr().err
    assert main([*args, "--mc-dropout", "1", "-q"]) == 2
    assert "mc_dropout: one pass gives no spread" in capsys.readouterr().err
