"""Stain measurement (wsi_dala.tissue.stain) and normalisation (wsi_dala.model.stain_normalise), with numbers.

Synthetic images are composed by Beer-Lambert from known stain vectors, so the truth is known; the
real H-DAB sample ships with scikit-image; the real H&E crop (CMU-1) is used only where present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from wsi_dala.core.errors import ConfigError
from wsi_dala.model import stain_normalise
from wsi_dala.model.stain_normalise import StainNormaliser, lab_to_srgb, normalise_tiles, srgb_to_lab
from wsi_dala.tissue.stain import (
    MAX_PIXELS,
    REFERENCE_PROFILE,
    StainError,
    StainProfile,
    is_out_of_distribution,
    measure_stain,
    stain_distance,
)

CMU_SMALL = Path(__file__).parent / "data" / "cmu_small_region.svs"  # committed (CC0), see tests/data/README.md

# Stain A: a haematoxylin like Ruifrok's, an eosin like CMU-1's (measured); far enough from
# REFERENCE_PROFILE (Macenko's HERef: 8.5° for H, 12.6° for E) for normalisation to have work to do.
STAINS_A = np.array([[0.650, 0.704, 0.286], [0.16, 0.91, 0.38]])
STAINS_A /= np.linalg.norm(STAINS_A, axis=1, keepdims=True)
STAINS_B = np.asarray(REFERENCE_PROFILE.stain_matrix)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(min(1.0, cos)))


def concentrations(size: int = 256, seed: int = 0) -> np.ndarray:
    """[size, size, 2] H and E: 20 % nuclei (H only), 30 % stroma (E only), 40 % both, 10 % glass."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=(size, size), p=[0.2, 0.3, 0.4, 0.1])
    h = np.where(kind == 0, rng.uniform(0.4, 2.0, kind.shape), 0.0)
    e = np.where(kind == 1, rng.uniform(0.5, 2.0, kind.shape), 0.0)
    both = kind == 2
    h[both], e[both] = rng.uniform(0.1, 1.2, both.sum()), rng.uniform(0.1, 1.2, both.sum())
    return np.stack([h, e], axis=-1)


def compose(c: np.ndarray, stains: np.ndarray, noise: float = 1.0, seed: int = 1) -> np.ndarray:
    """Beer-Lambert with Macenko's convention: I = 240 exp(-OD) - 1, plus Gaussian noise, uint8."""
    rng = np.random.default_rng(seed)
    intensity = 240.0 * np.exp(-(c @ stains)) - 1.0 + rng.normal(0.0, noise, (*c.shape[:2], 3))
    return np.clip(intensity, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def image_a() -> np.ndarray:
    return compose(concentrations(), STAINS_A)


@pytest.fixture(scope="module")
def profile_a(image_a) -> StainProfile:
    return measure_stain(image_a)


def nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    """As the pipeline makes batches: a channels-first view of channels-last memory."""
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)


def as_tiles(image: np.ndarray, tile_px: int) -> np.ndarray:
    h, w = image.shape[0] // tile_px, image.shape[1] // tile_px
    tiles = image[: h * tile_px, : w * tile_px].reshape(h, tile_px, w, tile_px, 3).swapaxes(1, 2)
    return np.ascontiguousarray(tiles.reshape(-1, tile_px, tile_px, 3))


# ---- measurement -------------------------------------------------------------------------------------


def test_measure_recovers_known_stain_vectors_h_first(image_a, profile_a):
    h, e = np.asarray(profile_a.stain_matrix)
    assert angle_deg(h, STAINS_A[0]) < 3.0
    assert angle_deg(e, STAINS_A[1]) < 3.0
    assert np.allclose(np.linalg.norm([h, e], axis=1), 1.0, atol=1e-9)
    assert (h > 0).all() and (e > 0).all()
    # maxC: the 99th percentile of the true concentrations of the same pixels (all of them, as Macenko).
    true_max = np.percentile(concentrations().reshape(-1, 2), 99, axis=0)
    assert np.abs(np.log2(np.asarray(profile_a.max_concentrations) / true_max)).max() < 0.1
    lab = rgb2lab(image_a).reshape(-1, 3)
    assert np.allclose(profile_a.lab_mean, lab.mean(axis=0), atol=1e-6)
    assert np.allclose(profile_a.lab_std, lab.std(axis=0), atol=1e-6)
    assert profile_a.n_pixels == image_a.shape[0] * image_a.shape[1]


def test_measure_orders_h_first_whatever_the_input_order():
    swapped = compose(concentrations()[..., ::-1], STAINS_A[::-1])  # same image, stains listed E then H
    h, e = np.asarray(measure_stain(swapped).stain_matrix)
    assert angle_deg(h, STAINS_A[0]) < 3.0 and angle_deg(e, STAINS_A[1]) < 3.0


def test_measure_mask_alpha_subsampling_and_determinism(image_a, profile_a):
    rgba = np.concatenate([image_a, np.full((*image_a.shape[:2], 1), 7, np.uint8)], axis=2)
    assert measure_stain(rgba) == profile_a  # the alpha channel is ignored

    mask = np.zeros(image_a.shape[:2], bool)
    mask[:, :128] = True
    half = measure_stain(image_a, mask)
    assert half.n_pixels == mask.sum()
    assert half == measure_stain(np.ascontiguousarray(image_a[:, :128]))  # masking = cropping to the mask

    big = np.tile(image_a, (8, 12, 1))  # 2048 x 3072 px: subsampled to MAX_PIXELS, deterministically
    first, second = measure_stain(big), measure_stain(big)
    assert first == second and first.n_pixels == MAX_PIXELS
    assert stain_distance(first, profile_a)["score"] < 0.5


def test_measure_refuses_what_it_cannot_measure(image_a):
    glass = np.full((64, 64, 3), 245, np.uint8)
    with pytest.raises(StainError, match="stained pixels"):
        measure_stain(glass)
    few = np.zeros(image_a.shape[:2], bool)
    few[:5, :10] = True
    with pytest.raises(StainError, match="50 pixels"):
        measure_stain(image_a, few)
    one_stain = compose(concentrations() * [1.0, 0.0], STAINS_A, noise=0.0)
    with pytest.raises(StainError):
        measure_stain(one_stain)
    assert issubclass(StainError, ValueError)
    with pytest.raises(ValueError, match="uint8"):
        measure_stain(image_a.astype(np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        measure_stain(image_a, np.ones((3, 3), bool))


def test_measure_runs_on_real_h_dab_image():
    from skimage.data import immunohistochemistry

    profile = measure_stain(immunohistochemistry())
    matrix = np.asarray(profile.stain_matrix)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0)
    assert np.isfinite(matrix).all() and matrix[0, 0] > matrix[1, 0]
    assert all(math.isfinite(v) and v > 0 for v in (*profile.max_concentrations, *profile.lab_std))
    # DAB is not eosin: H-DAB is out of distribution for an H&E reference (E/DAB vector 25° away).
    distance = stain_distance(profile, REFERENCE_PROFILE)
    assert distance["e_angle_deg"] > 20.0
    assert is_out_of_distribution(distance)


def test_measure_real_h_and_e_cmu1():
    import openslide  # a dependency of the package: never skipped

    slide = openslide.OpenSlide(str(CMU_SMALL))
    rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    profile = measure_stain(rgb)
    h, e = np.asarray(profile.stain_matrix)
    # torchstain 1.4.1 (torch backend, all 6.6 M pixels) fits H (0.8153, 0.5013, 0.2899), E (0.1604, 0.9122, 0.3772).
    assert angle_deg(h, np.array([0.8153, 0.5013, 0.2899])) < 1.5
    assert angle_deg(e, np.array([0.1604, 0.9122, 0.3772])) < 1.0
    assert np.allclose(profile.max_concentrations, (2.0666, 2.1297), rtol=0.05)


# ---- profiles: dict round trip, validation, distance ------------------------------------------------


def test_profile_dict_round_trip(profile_a):
    d = json.loads(json.dumps(profile_a.to_dict()))
    back = StainProfile.from_dict(d, source="card.json")
    assert np.allclose(back.stain_matrix, profile_a.stain_matrix, atol=1e-5)
    assert np.allclose(back.lab_std, profile_a.lab_std, atol=1e-5)
    assert back.n_pixels == profile_a.n_pixels
    assert StainProfile.from_dict(REFERENCE_PROFILE.to_dict(), source="x") == REFERENCE_PROFILE


def _broken(**change) -> dict:
    d = REFERENCE_PROFILE.to_dict()
    d.update(change)
    return d


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (_broken(stain_matrix=[[float("nan"), 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]]), "finite"),
        (_broken(stain_matrix=[[0.5626, 0.7201], [0.2159, 0.8012]]), "shape"),
        (_broken(stain_matrix=[[0.5626, 0.7201, 0.4062]]), "shape"),
        (_broken(stain_matrix=[[1.0, 1.0, 1.0], [0.2159, 0.8012, 0.5581]]), "unit"),
        (_broken(stain_matrix=[[0.5626, 0.7201, 0.4062], [0.5626, 0.7201, 0.4062]]), "apart"),
        (_broken(lab_std=[19.0, -1.0, 5.0]), "lab_std must be positive"),
        (_broken(lab_std=[19.0, float("inf"), 5.0]), "finite"),
        (_broken(lab_mean=[169.0, 15.0, -6.0]), "outside"),
        (_broken(max_concentrations=[1.9, 0.0]), "positive"),
        (_broken(max_concentrations=["1.9", 1.0]), "numbers"),
        (_broken(max_concentrations=[True, 1.0]), "numbers"),
        (_broken(n_pixels=-3), "n_pixels"),
        (_broken(n_pixels=2.5), "n_pixels"),
        (_broken(extra=1), "unknown keys extra"),
        ({"stain_matrix": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]]}, "lacks"),
        ([1, 2, 3], "mapping"),
    ],
)
def test_from_dict_rejects_bad_input_naming_the_source(bad, words):
    with pytest.raises(ConfigError) as info:
        StainProfile.from_dict(bad, source="models/card.json")
    message = str(info.value)
    assert message.startswith("models/card.json: stain profile") and words in message
    assert "\n" not in message


def test_stain_distance_and_out_of_distribution(profile_a):
    same = stain_distance(REFERENCE_PROFILE, REFERENCE_PROFILE)
    assert all(abs(v) < 1e-9 for v in same.values())
    d = stain_distance(profile_a, REFERENCE_PROFILE)
    assert d["h_angle_deg"] == pytest.approx(angle_deg(STAINS_A[0], STAINS_B[0]), abs=2.0)  # 8.5°
    assert d["e_angle_deg"] == pytest.approx(angle_deg(STAINS_A[1], STAINS_B[1]), abs=2.0)  # 12.6°
    assert d["score"] == max(d["h_angle_deg"], d["e_angle_deg"])
    ratio = np.log2(np.asarray(profile_a.max_concentrations) / REFERENCE_PROFILE.max_concentrations)
    assert (d["h_log2_ratio"], d["e_log2_ratio"]) == pytest.approx(tuple(ratio))
    reverse = stain_distance(REFERENCE_PROFILE, profile_a)
    assert reverse["h_angle_deg"] == pytest.approx(d["h_angle_deg"])
    assert reverse["e_log2_ratio"] == pytest.approx(-d["e_log2_ratio"])

    near = {"h_angle_deg": 14.9, "e_angle_deg": 3.0, "h_log2_ratio": -0.99, "e_log2_ratio": 0.5}
    assert not is_out_of_distribution(near)
    assert is_out_of_distribution({**near, "e_angle_deg": 15.1})
    assert is_out_of_distribution({**near, "h_log2_ratio": -1.01})
    assert not is_out_of_distribution({**near, "e_angle_deg": 15.1}, max_angle_deg=20.0)


# ---- normalisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_to_the_own_profile_changes_nearly_nothing(method, image_a, profile_a):
    out = StainNormaliser(method, profile_a, profile_a)(nchw(image_a[None]))
    diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - image_a)
    assert diff.mean() < (1.0 if method == "macenko" else 0.1)
    assert diff.max() <= (12 if method == "macenko" else 1)  # Macenko drops the noise off the H/E plane


def test_macenko_moves_the_stain_to_the_target(image_a, profile_a):
    out = StainNormaliser("macenko", profile_a, REFERENCE_PROFILE)(nchw(image_a[None]))[0]
    after = measure_stain(out.permute(1, 2, 0).numpy())
    d = stain_distance(after, REFERENCE_PROFILE)
    assert stain_distance(profile_a, REFERENCE_PROFILE)["score"] > 8.0
    assert d["h_angle_deg"] < 1.0 and d["e_angle_deg"] < 1.0  # measured: 0.06° and 0.05°
    assert abs(d["h_log2_ratio"]) < 0.1 and abs(d["e_log2_ratio"]) < 0.1


def test_reinhard_moves_lab_statistics_to_the_target(image_a, profile_a):
    # The target: the same kind of tissue stained with B. (Towards REFERENCE_PROFILE, whose spread is
    # smaller than this synthetic image's, gamut clipping costs up to 1.5 L* and 20 % of the L* spread.)
    target = measure_stain(compose(concentrations(seed=5), STAINS_B, seed=6))
    out = StainNormaliser("reinhard", profile_a, target)(nchw(image_a[None]))[0]
    lab = rgb2lab(out.permute(1, 2, 0).numpy()).reshape(-1, 3)
    assert stain_distance(profile_a, target)["lab_delta_e"] > 10.0
    assert np.abs(lab.mean(axis=0) - target.lab_mean).max() < 0.1
    assert np.abs(np.log2(lab.std(axis=0) / target.lab_std)).max() < 0.02


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_batch_equals_tile_by_tile_and_keeps_dtype_shape_layout(method, image_a, profile_a):
    normaliser = StainNormaliser(method, profile_a, REFERENCE_PROFILE)
    tiles = as_tiles(image_a, 64)  # 16 tiles
    batch = nchw(tiles)
    out = normaliser(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape and out.device == batch.device
    assert out.stride() == batch.stride()  # channels-last memory in, channels-last memory out
    one_by_one = torch.cat([normaliser(batch[i : i + 1]) for i in range(batch.shape[0])])
    assert torch.equal(out, one_by_one)
    contiguous = normaliser(batch.contiguous())
    assert contiguous.is_contiguous() and torch.equal(contiguous, out)
    assert not torch.equal(out, batch)
    assert np.array_equal(normalise_tiles(tiles, normaliser, batch_tiles=5), out.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_cpu_blocks_do_not_change_the_result(method, image_a, profile_a, monkeypatch):
    normaliser = StainNormaliser(method, profile_a, REFERENCE_PROFILE)
    batch = nchw(as_tiles(image_a, 64))
    whole = normaliser(batch)  # 65,536 pixels: one block
    monkeypatch.setattr(stain_normalise, "CPU_BLOCK_PIXELS", 1000)  # blocks that cut tiles and rows
    assert torch.equal(normaliser(batch), whole)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_callers_autocast_does_not_lower_precision(method, image_a, profile_a):
    normaliser = StainNormaliser(method, profile_a, REFERENCE_PROFILE)
    batch = nchw(as_tiles(image_a, 64)[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = normaliser(batch)
    assert torch.equal(under_autocast, normaliser(batch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_gpu_matches_cpu(method, image_a, profile_a):
    normaliser = StainNormaliser(method, profile_a, REFERENCE_PROFILE)
    batch = nchw(as_tiles(image_a, 64))
    on_gpu = normaliser(batch.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    assert (on_gpu.cpu().int() - normaliser(batch).int()).abs().max() <= 1


def test_none_is_identity_and_bad_input_is_refused(image_a, profile_a):
    batch = nchw(as_tiles(image_a, 64))
    none = StainNormaliser("none", profile_a, REFERENCE_PROFILE)
    assert none(batch) is batch
    tiles = as_tiles(image_a, 64)
    assert normalise_tiles(tiles, none) is tiles
    with pytest.raises(ValueError, match="method"):
        StainNormaliser("vahadane", profile_a, REFERENCE_PROFILE)
    with pytest.raises(ValueError, match="uint8"):
        StainNormaliser("macenko", profile_a, REFERENCE_PROFILE)(batch.float())
    with pytest.raises(ValueError, match="uint8"):
        StainNormaliser("macenko", profile_a, REFERENCE_PROFILE)(batch[:, :2])


def test_torch_lab_matches_skimage():
    rng = np.random.default_rng(3)
    colours = np.concatenate([rng.integers(0, 256, (20_000, 3)), [[0, 0, 0], [255, 255, 255], [3, 1, 0]]])
    rgb01 = colours.astype(np.float64) / 255.0
    ours = srgb_to_lab(torch.from_numpy(rgb01).float()).numpy()
    theirs = rgb2lab(rgb01[None])[0]
    assert np.abs(ours - theirs).max() < 0.01  # brief allows 0.5; float32 gets ~2e-4
    back = lab_to_srgb(torch.from_numpy(theirs).float()).numpy()
    assert np.abs(back - rgb01).max() < 0.5 / 255


def test_reference_profile_is_valid_and_documented_values():
    assert StainProfile.from_dict(REFERENCE_PROFILE.to_dict(), source="REFERENCE_PROFILE") == REFERENCE_PROFILE
    assert REFERENCE_PROFILE.stain_matrix == ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581))
    assert REFERENCE_PROFILE.max_concentrations == (1.9705, 1.0308)
    # The Reinhard target is pink H&E: light, red (a* > 0) and slightly blue (b* < 0).
    light, a, b = REFERENCE_PROFILE.lab_mean
    assert 50 < light < 85 and a > 5 and b < 0


def test_stain_module_does_not_import_torch():
    code = "import sys, wsi_dala.tissue.stain; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_profile_is_frozen(profile_a):
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile_a.n_pixels = 3  # type: ignore[misc]
