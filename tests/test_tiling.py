"""The tiler: pixels equal direct reads, both readers agree, writes resume to the same store."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_dala.core.config import TilingConfig
from wsi_dala.slides.reader import Slide
from wsi_dala.slides.synthetic import TUMOUR
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.tiler import resize_tile, tile_slide

SMALL = dict(chunk_tiles=8, region_level_px=1024)


def _arrays(store):
    group = TileStore(store).group
    return {name: np.asarray(group[name][:]) for name in ("tiles", "coords", "tissue_fraction")}, dict(group.attrs)


@pytest.mark.parametrize(
    ("fixture", "target", "level", "tile_l0"),
    [("svs_025", 0.5, 0, 448), ("svs_025", 1.0, 1, 896), ("svs_050", 0.5, 0, 224), ("svs_050", 1.0, 0, 448)],
)
def test_tiles_equal_direct_read_and_resize(request, tmp_path, fixture, target, level, tile_l0):
    slide_file = request.getfixturevalue(fixture)
    config = TilingConfig(mpp=target, tile_size_px=112, **SMALL)
    result = tile_slide(slide_file.path, tmp_path, config, progress=False)
    arrays, attrs = _arrays(result.store)
    assert result.n_tiles > 10
    assert attrs["complete"] is True and attrs["level"] == level
    assert attrs["tile_size_l0"] == tile_l0 / 2  # tile size 112, not 224
    assert attrs["effective_mpp"] == pytest.approx(target)
    # Every coordinate is a whole multiple of the level-0 stride: the grid is exact.
    assert (arrays["coords"] % (tile_l0 // 2) == 0).all()
    read_px = attrs["read_size_level_px"]
    with Slide(slide_file.path) as slide:
        for index in np.linspace(0, result.n_tiles - 1, 6).astype(int):
            x, y = arrays["coords"][index]
            direct = resize_tile(slide.read_region(int(x), int(y), level, read_px, read_px), 112)
            diff = np.abs(direct.astype(int) - arrays["tiles"][index].astype(int))
            assert diff.max() <= 2, f"tile {index} differs from a direct read by {diff.max()}"


def test_tiles_land_on_planted_tumour(svs_025, tmp_path):
    """Coordinates are level-0 pixels: a tile over planted tumour shows tumour colours."""
    result = tile_slide(svs_025.path, tmp_path, TilingConfig(mpp=1.0, tile_size_px=64, **SMALL), progress=False)
    arrays, attrs = _arrays(result.store)
    label_px = svs_025.label_px
    side = int(attrs["tile_size_l0"])
    checked = 0
    for (x, y), tile in zip(arrays["coords"], arrays["tiles"], strict=False):
        patch = svs_025.labels[y // label_px : (y + side) // label_px, x // label_px : (x + side) // label_px]
        if patch.size and (patch == TUMOUR).all():
            # Tumour is darker purple than normal tissue (mean green channel well below normal's).
            assert tile[..., 1].mean() < 130
            checked += 1
    assert checked >= 3


def test_both_readers_give_the_same_tiles(svs_025, tmp_path):
    config = TilingConfig(mpp=0.5, tile_size_px=96, **SMALL)
    a = tile_slide(
        svs_025.path, tmp_path / "openslide", config.model_copy(update={"reader": "openslide"}), progress=False
    )
    b = tile_slide(
        svs_025.path, tmp_path / "tiffslide", config.model_copy(update={"reader": "tiffslide"}), progress=False
    )
    arrays_a, attrs_a = _arrays(a.store)
    arrays_b, attrs_b = _arrays(b.store)
    np.testing.assert_array_equal(arrays_a["coords"], arrays_b["coords"])
    assert np.abs(arrays_a["tiles"].astype(int) - arrays_b["tiles"].astype(int)).max() <= 3
    assert (attrs_a["reader"], attrs_b["reader"]) == ("openslide", "tiffslide")


def test_interrupted_write_resumes_to_identical_store(svs_025, tmp_path):
    config = TilingConfig(mpp=0.5, tile_size_px=64, **SMALL)
    reference = tile_slide(svs_025.path, tmp_path / "ref", config, progress=False)

    written = []

    def crash_after_three(index):
        written.append(index)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tile_slide(svs_025.path, tmp_path / "cut", config, progress=False, on_chunk_written=crash_after_three)
    assert TileStore(tmp_path / "cut" / "tiles.zarr").info.complete is False
    resumed = tile_slide(svs_025.path, tmp_path / "cut", config, progress=False)
    assert resumed.chunks_resumed >= 3
    ref_arrays, ref_attrs = _arrays(reference.store)
    cut_arrays, cut_attrs = _arrays(resumed.store)
    for name, array in ref_arrays.items():
        np.testing.assert_array_equal(array, cut_arrays[name])
    assert {k: v for k, v in ref_attrs.items() if k != "slide"} == {k: v for k, v in cut_attrs.items() if k != "slide"}
    again = tile_slide(svs_025.path, tmp_path / "cut", config, progress=False)
    assert again.skipped


def test_changed_settings_retile(svs_025, tmp_path):
    first = tile_slide(svs_025.path, tmp_path, TilingConfig(mpp=1.0, tile_size_px=64, **SMALL), progress=False)
    second = tile_slide(svs_025.path, tmp_path, TilingConfig(mpp=2.0, tile_size_px=64, **SMALL), progress=False)
    assert not second.skipped and second.n_tiles < first.n_tiles


def test_no_tissue_gives_empty_valid_store(blank_slide, tmp_path, caplog):
    result = tile_slide(blank_slide.path, tmp_path, TilingConfig(mpp=1.0, **SMALL), progress=False)
    arrays, attrs = _arrays(result.store)
    assert result.n_tiles == 0 and arrays["tiles"].shape == (0, 224, 224, 3)
    assert attrs["complete"] is True
    assert "no tissue" in caplog.text


def test_overlapping_stride(svs_050, tmp_path):
    config = TilingConfig(mpp=0.5, tile_size_px=128, stride_px=64, **SMALL)
    result = tile_slide(svs_050.path, tmp_path, config, progress=False)
    arrays, attrs = _arrays(result.store)
    assert attrs["stride_l0"] == 64
    assert (arrays["coords"] % 64 == 0).all()
    xs = np.unique(arrays["coords"][:, 0])
    assert (np.diff(xs) == 64).any()


@pytest.mark.parametrize("tile_px", [32, 64, 128])
def test_small_tiles_find_the_same_tissue(svs_050, tmp_path, tile_px):
    """16 µm tiles once analysed tissue at cell resolution, where pale pixels inside tissue passed for glass
    and no tissue at all was found; the tissue fraction must not depend on the tile size."""
    result = tile_slide(svs_050.path, tmp_path, TilingConfig(mpp=0.5, tile_size_px=tile_px, **SMALL), progress=False)
    arrays, _ = _arrays(result.store)
    covered_um2 = len(arrays["coords"]) * (tile_px * 0.5) ** 2
    slide_um2 = 4096 * 3072 * 0.5**2
    assert 0.3 < covered_um2 / slide_um2 < 0.6, covered_um2 / slide_um2
