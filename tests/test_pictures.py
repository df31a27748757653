"""Framed pictures (overlay, QC): the slide's pixels land unchanged, keys and titles fit around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_dala.core.memory import limit_malloc_arenas, release_freed_memory
from wsi_dala.core.picture_frame import (
    MARGIN_PX,
    MIN_SIDE_KEY_PX,
    TITLE_PX,
    colour_bar,
    save_framed_png,
    title_width_px,
)
from wsi_dala.outputs.overlay import render_overlay
from wsi_dala.tissue.qc_figure import INK_RGB, QCPicture, render_qc


def _picture(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_framed_picture_is_pasted_pixel_exact_with_the_key_beside_it(tmp_path: Path) -> None:
    picture = _picture(300, 400)
    path = tmp_path / "framed.png"
    key = colour_bar("inferno", 1.0, "tumour probability")
    save_framed_png(picture, path, "a title", right=key)
    saved = np.asarray(Image.open(path).convert("RGB"))
    top, left = MARGIN_PX + TITLE_PX, MARGIN_PX
    np.testing.assert_array_equal(saved[top : top + 300, left : left + 400], picture)
    assert saved.shape[1] == 400 + key.size_px + 2 * MARGIN_PX
    beside = saved[top : top + 300, left + 400 :]
    assert (beside < 128).all(axis=-1).sum() > 50  # the bar's tick labels and outline are drawn
    assert len({tuple(pixel) for pixel in beside.reshape(-1, 3)}) > 50  # and its colours


def test_a_long_title_widens_the_canvas_and_a_flat_picture_keeps_a_readable_key(tmp_path: Path) -> None:
    title = "a_very_long_slide_name_from_a_scanner_export_2026-12-05_block_A3_level_2: tumour probability"
    path = tmp_path / "flat.png"
    save_framed_png(_picture(40, 120), path, title, right=colour_bar("inferno", 1.0, "p"))
    width, height = Image.open(path).size
    assert width >= title_width_px(title) > 120 + 96
    assert height >= MIN_SIDE_KEY_PX + TITLE_PX


def test_overlay_keeps_the_tissue_where_there_is_no_value_and_colours_where_there_is(tmp_path: Path) -> None:
    thumbnail = np.full((200, 300, 3), 200, dtype=np.uint8)
    layer = np.full((20, 30), np.nan, dtype=np.float32)
    layer[:, 15:] = 1.0  # right half: certain tumour
    path = tmp_path / "overlay.png"
    render_overlay(thumbnail, layer, path, "t")
    saved = np.asarray(Image.open(path).convert("RGB")).astype(int)
    top, left = MARGIN_PX + TITLE_PX, MARGIN_PX
    inside = saved[top : top + 400, left : left + 600]  # 300 px wide: drawn twice as large (600 px at least)
    np.testing.assert_array_equal(inside[:, :280], 200)  # no value: the thumbnail as it is
    from matplotlib import colormaps

    top_colour = np.asarray(colormaps["inferno"](1.0)[:3]) * 255
    expected = 0.25 * 200 + 0.75 * top_colour  # certain tumour: alpha 0.75 of the map's top colour
    assert np.abs(inside[:, 320:] - expected).max() <= 1
    assert (saved[top + 400 : top + 410, left + 320 : left + 600] != expected.round()).any()  # ends at 400 rows


def test_qc_picture_paints_ink_and_enlarges_a_small_thumbnail(tmp_path: Path) -> None:
    thumbnail = np.full((50, 60, 3), 230, dtype=np.uint8)
    tissue = np.zeros((50, 60), dtype=bool)
    tissue[10:40, 10:50] = True
    ink = np.zeros_like(tissue)
    ink[20:30, 20:30] = True
    picture = QCPicture(
        thumbnail,
        tissue,
        ink,
        np.zeros_like(ink),
        np.zeros_like(ink),
        dict.fromkeys(("tissue", "ink", "fold", "blur"), 1.0),
    )
    path = tmp_path / "qc.png"
    render_qc(picture, path, "qc")
    saved = np.asarray(Image.open(path).convert("RGB")).astype(int)
    scale = 600 / 60  # drawn at 600 px on its longest side
    top, left = MARGIN_PX + TITLE_PX, MARGIN_PX
    y, x = top + int(25 * scale), left + int(25 * scale)
    expected = np.round(0.4 * 230 + 0.6 * np.asarray(INK_RGB))
    np.testing.assert_array_equal(saved[y, x], expected)
    assert saved.shape[0] >= 500 + TITLE_PX


def test_freed_memory_is_handed_back_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim and mallopt are glibc's")
    assert release_freed_memory() is True
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the user's setting stands
