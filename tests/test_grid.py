"""Tile-grid geometry: level choice, exact coordinates and physical sizes, tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_dala.core.errors import ResolutionError
from wsi_dala.tiling.grid import block_order, choose_level, grid_origins, tissue_fractions

LEVELS_025 = ([0.25, 1.0, 4.0], [1.0, 4.0, 16.0])
LEVELS_050 = ([0.5, 2.0, 8.0], [1.0, 4.0, 16.0])


@pytest.mark.parametrize(
    ("levels", "target", "level", "read_px", "tile_l0"),
    [
        (LEVELS_025, 0.5, 0, 448, 448),  # 40x slide, 20x tiles: read 448 at level 0, shrink by 2
        (LEVELS_025, 1.0, 1, 224, 896),  # 40x slide, 10x tiles: level 1 matches exactly
        (LEVELS_050, 0.5, 0, 224, 224),  # 20x slide, 20x tiles: no resize
        (LEVELS_050, 1.0, 0, 448, 448),  # 20x slide, 10x tiles: read 448 at level 0
    ],
)
def test_level_choice_and_physical_size_are_exact(levels, target, level, read_px, tile_l0):
    mpps, downsamples = levels
    choice = choose_level(mpps, downsamples, target, 224)
    assert choice.level == level
    assert choice.read_size_level_px == read_px
    assert choice.tile_size_l0 == tile_l0
    # Physical side of a tile: exactly tile_size * target µm.
    assert choice.tile_size_l0 * mpps[0] == pytest.approx(224 * target, abs=1e-9)
    assert choice.effective_mpp == pytest.approx(target, abs=1e-12)


def test_within_tolerance_no_resize_and_never_upsample():
    choice = choose_level([0.2527, 1.0108], [1.0, 4.0], 0.25, 224)
    assert choice.level == 0 and choice.resize_factor == 1.0
    assert choice.effective_mpp == pytest.approx(0.2527)
    with pytest.raises(ResolutionError, match=r"finer than the slide's finest level .*--allow-upsample"):
        choose_level([0.5, 2.0], [1.0, 4.0], 0.25, 224, slide_name="x.svs")
    up = choose_level([0.5, 2.0], [1.0, 4.0], 0.25, 224, allow_upsample=True)
    assert up.level == 0 and up.read_size_level_px == 112 and up.resize_factor == 0.5


def test_grid_covers_image_with_edge_tiles():
    origins = grid_origins(1000, 500, 448, 448)
    assert origins.shape == (3 * 2, 2)
    assert set(origins[:, 0]) == {0, 448, 896}
    assert set(origins[:, 1]) == {0, 448}
    overlapping = grid_origins(1000, 448, 448, 224)
    assert sorted(set(overlapping[:, 0])) == [0, 224, 448, 672]
    assert set(overlapping[:, 1]) == {0}


def test_tissue_fraction_by_integral_image():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:5, 0:5] = True  # top-left quarter is tissue
    # mask_downsample 32: a 160-px tile spans 5 mask px; the tile at (64, 64) overlaps 3 x 3 of 25.
    origins = np.array([[0, 0], [160, 0], [64, 64], [480, 480]])
    fractions = tissue_fractions(mask, 32.0, origins, 160.0)
    np.testing.assert_allclose(fractions, [1.0, 0.0, 9 / 25, 0.0], atol=1e-6)


def test_block_order_groups_neighbours():
    origins = grid_origins(4 * 448, 2 * 448, 448, 448)
    order = block_order(origins, 2 * 448)
    blocks = (origins[order] // (2 * 448)).tolist()
    # Each block's tiles are contiguous.
    seen = []
    for block in blocks:
        if not seen or seen[-1] != block:
            assert block not in seen
            seen.append(block)
    assert len(seen) == 2
