"""Stitching: the vectorised sum-and-count equals a plain per-tile loop; the CAM's border attenuation is
measured and divided out (no tile grid in the map); the uncertainty layer; outlines between cell centres."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr

from qupath_export.polygons import contour_polygons, mask_to_polygons
from wsi_dala.core.config import HeatmapConfig, PipelineConfig, TilingConfig
from wsi_dala.explain.border_profile import (
    PRIOR_TILES_CARD,
    blend_profile,
    correct,
    measure_profile,
    profile_sum,
    symmetrised,
)
from wsi_dala.outputs.cam_reference import interior_positive, reference_tiles
from wsi_dala.outputs.heatmap import stitch
from wsi_dala.outputs.tumour_layer import cam_evidence
from wsi_dala.runs.pipeline import run_slide
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.store_records import ScoringRecord


@pytest.fixture(scope="module")
def scored(tmp_path_factory, colour_checkpoint):
    """A small slide run end to end with the colour reference scorer (8 x 8 CAM cells per tile)."""
    folder = tmp_path_factory.mktemp("heatmap")
    spec = SyntheticSlideSpec(width=4096, height=3072, mpp=0.5, seed=3, label_px=8, pen_marks=False)
    slide = write_synthetic_slide(folder / "slide.svs", spec)
    config = PipelineConfig(model=str(colour_checkpoint), tiling=TilingConfig(min_tissue=0.05))
    return run_slide(slide.path, folder / "run", config, progress=False)


def _copy_store(summary, tmp_path):
    import shutil

    target = tmp_path / "tiles.zarr"
    shutil.copytree(summary.layout.tiles_store, target)
    return TileStore(target, mode="r+")


def _loop_stitch(
    store: TileStore, profile: np.ndarray, scale: float, evidence_profile: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one tile and one cell at a time. The tumour layer's cell is the probability interpolated
    bilinearly between the centres of the tiles around it (those with a value), weighed against the cell's CAM
    evidence (divided by its mean at that cell over typical tumour tiles): sigmoid(logit(p~) + 2 logit(e)), e
    clipped to [0.08, 0.92]."""
    info = store.info
    grid = info.scoring.cam_grid
    cell = info.tile_size_l0 / grid
    stride, tile = info.tiling.stride_l0, info.tile_size_l0
    rows, cols = int(np.ceil(info.tiling.slide.height / cell)), int(np.ceil(info.tiling.slide.width / cell))
    sums = np.zeros((2, rows + grid, cols + grid))
    counts = np.zeros((rows + grid, cols + grid))
    coords, probability = store.coords(), store.positive_scores()
    origin = coords.min(axis=0)
    node = {tuple(np.round((c - origin) / stride).astype(int)): p for c, p in zip(coords, probability, strict=True)}
    cells = np.round(coords / cell).astype(int)
    for (cx, cy), (x0, y0), p, cam in zip(cells, coords, probability, store.cams(), strict=True):
        evidence = cam_evidence(correct(cam[None], profile)[0] / scale)
        values = np.zeros((grid, grid))
        for a in range(grid):
            for b in range(grid):
                y = (y0 - origin[1] + (a + 0.5) * cell - tile / 2) / stride  # the cell's centre, in tile steps
                x = (x0 - origin[0] + (b + 0.5) * cell - tile / 2) / stride
                total = weight = 0.0
                for ny in (int(np.floor(y)), int(np.floor(y)) + 1):
                    for nx in (int(np.floor(x)), int(np.floor(x)) + 1):
                        w = (1 - abs(y - ny)) * (1 - abs(x - nx))
                        if w > 0 and (nx, ny) in node:
                            total, weight = total + w * node[(nx, ny)], weight + w
                smooth = min(max(total / weight, 1e-6), 1 - 1e-6)
                e = min(max(min(evidence[a, b] / evidence_profile[a, b], 1.0), 0.08), 0.92)
                logit = math.log(smooth / (1 - smooth)) + 2 * math.log(e / (1 - e))
                values[a, b] = 1 / (1 + math.exp(-logit))
        sums[0, cy : cy + grid, cx : cx + grid] += p
        sums[1, cy : cy + grid, cx : cx + grid] += values
        counts[cy : cy + grid, cx : cx + grid] += 1
    with np.errstate(invalid="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)[:, :rows, :cols]
    return mean[0], mean[1]


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory, colour_checkpoint, scored):
    """The same slide cut at half stride: every cell under four tiles."""
    config = PipelineConfig(model=str(colour_checkpoint), tiling=TilingConfig(min_tissue=0.05, stride_px=32))
    return run_slide(scored.record.slide["path"], tmp_path_factory.mktemp("overlap"), config, progress=False)


@pytest.mark.parametrize("run", ["scored", "overlapping"])
def test_vectorised_stitch_equals_the_per_tile_loop(request, run):
    summary = request.getfixturevalue(run)
    config = HeatmapConfig(min_cell_tissue=0.0)
    heatmap = stitch(summary.layout.tiles_store, config)
    store = TileStore(summary.layout.tiles_store)
    probability, tumour = _loop_stitch(store, heatmap.cam_profile, heatmap.cam_scale, heatmap.evidence_profile)
    assert np.isfinite(heatmap.probability).sum() > 1000
    np.testing.assert_allclose(heatmap.probability, probability, rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(heatmap.tumour, tumour, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert heatmap.uncertainty is None  # scoring measured no spread: no layer


def test_border_attenuation_is_divided_out(scored, tmp_path):
    """CAMs dimmed at tile borders and corners, as a CNN's are: without correction the map shows the tile grid
    where the CAM speaks (the colour scorer's tiles are often undecided, p 0.5-0.8, so its CAM reaches inside
    tumour); with it the corner dip shrinks to under 0.6 of that (the rest is the blend's: at a tile's corner
    the interpolated probability is more undecided, and this scorer's evidence sits below its probability).
    A trained model, confident inside tumour, reads 1.00 (benchmarks/unseen.py)."""
    store = _copy_store(scored, tmp_path)
    grid = store.info.scoring.cam_grid
    edge = np.where((np.arange(grid) == 0) | (np.arange(grid) == grid - 1), 0.45, 1.0)
    attenuation = np.outer(edge, edge)  # corners 0.2, edges 0.45, inside 1
    cams = store.cams()
    store.group["cams"][:] = (cams * attenuation).astype(np.float32)
    interior = interior_positive(store, HeatmapConfig())
    assert interior.sum() >= 8 and reference_tiles(store, HeatmapConfig(), interior).sum() >= 8
    plain = stitch(store.path, HeatmapConfig(border_correction=False))
    corrected = stitch(store.path, HeatmapConfig())
    assert plain.seam_index is not None and plain.seam_index < 0.95
    assert corrected.seam_index is not None and 0.95 <= corrected.seam_index <= 1.03
    assert abs(1 - corrected.seam_index) < 0.6 * abs(1 - plain.seam_index)
    profile = corrected.cam_profile
    corners = profile[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    assert corners < 0.5 * profile[1:-1, 1:-1].mean()  # the planted dimming, measured back (the colour
    # scorer's own maps are patchy, so the profile is only roughly the planted one; see the next test)


def test_evidence_saturates_smoothly_and_keeps_gradations(scored):
    np.testing.assert_allclose(cam_evidence(np.array([0.0, 1.0, 2.0, -1.0, np.nan])), [0, 0.95, 0.9975, 0, 0])
    heatmap = stitch(scored.layout.tiles_store, HeatmapConfig())
    values = heatmap.tumour[np.isfinite(heatmap.tumour) & (heatmap.probability >= 0.5)]
    # not a mask: a cell reads the maximum only where every tile around it is certain (here 8 %)
    assert values.size > 100 and (values >= np.nanmax(heatmap.tumour) - 1e-6).mean() <= 0.15


def test_profile_estimate_and_prior():
    rng = np.random.default_rng(0)
    truth = np.outer([0.3, 1.0, 1.0, 0.5], [0.4, 1.0, 1.0, 0.6])
    cams = truth[None] * rng.gamma(8.0, 1 / 8.0, size=(400, 4, 4))  # ~35 % noise per cell
    profile = measure_profile(cams)
    assert profile is not None and profile.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(profile, truth / truth.mean(), rtol=0.08)
    total, n = profile_sum(cams[:3])
    assert n == 3 and np.array_equal(blend_profile(total, n, None), np.ones((4, 4)))  # too few tiles: flat
    prior = truth / truth.mean()
    expected = (total + PRIOR_TILES_CARD * prior) / (n + PRIOR_TILES_CARD)
    np.testing.assert_allclose(blend_profile(total, n, prior), expected / expected.mean())  # the card as prior
    many, n_many = profile_sum(cams)
    assert np.abs(blend_profile(many, n_many, np.ones((4, 4))) - prior).max() < 0.1  # 400 tiles: the slide wins
    assert measure_profile(np.zeros((5, 4, 4))) is None
    flips, d4 = symmetrised(truth, "flips"), symmetrised(truth, "d4")  # a card's profile under --tta
    assert np.allclose(flips, flips[::-1, :]) and np.allclose(flips, flips[:, ::-1]) and not np.allclose(flips, flips.T)
    assert np.allclose(d4, np.rot90(d4)) and d4.mean() == pytest.approx(truth.mean())


def test_uncertainty_layer_when_scoring_measured_a_spread(scored, tmp_path):
    store = _copy_store(scored, tmp_path)
    n = store.info.n_tiles
    sd = np.linspace(0.0, 0.2, n).astype(np.float32)
    store.group["score_sd"][:] = sd
    record = store.info.scoring
    store.mark_scores_complete(
        ScoringRecord(record.class_names, record.positive_class, record.cam_grid, record.precision, "tta:d4")
    )
    heatmap = stitch(store.path, HeatmapConfig(min_cell_tissue=0.0))
    assert heatmap.uncertainty is not None
    values = heatmap.uncertainty[np.isfinite(heatmap.uncertainty)]
    assert values.min() >= 0.0 and values.max() <= 0.2 + 1e-6 and values.std() > 0.01


def test_run_json_says_uncalibrated_and_records_the_seam_index(scored):
    record = json.loads(scored.layout.run_json.read_text())
    assert record["calibration"]["status"] == "uncalibrated" and record["calibration"]["temperature"] == 1.0
    assert set(record["heatmap"]) >= {"seam_index", "cam_scale", "border_profile", "cell_um"}
    group = zarr.open_group(scored.layout.heatmap_store, mode="r")
    assert set(group.attrs["layers"]) == {"probability", "tumour", "qc_flagged"}


def test_contours_have_holes_no_staircase_and_stay_within_half_a_cell():
    values = np.zeros((30, 30))
    values[4:24, 5:25] = 0.9
    values[10:14, 10:14] = 0.1  # a hole
    values[12:20, 22:28] = 0.8  # a bump: corners to round
    cell = 16.0
    regions = contour_polygons(values, 0.5, cell)
    staircase = mask_to_polygons(values >= 0.5, cell)
    assert len(regions.geoms) == 1 and len(regions.geoms[0].interiors) == 1 and regions.is_valid
    assert shapely.hausdorff_distance(regions.boundary, staircase.boundary) <= 0.5 * cell + 1e-9
    assert regions.area == pytest.approx(staircase.area, rel=0.02)
    diagonal = [
        (a, b)
        for ring in [regions.geoms[0].exterior]
        for a, b in zip(ring.coords[:-1], ring.coords[1:], strict=True)
        if a[0] != b[0] and a[1] != b[1]
    ]
    assert diagonal  # corners are cut: the cell staircase is gone
    assert contour_polygons(values, 0.95, cell).is_empty


def test_contours_end_at_the_tissue_edge_and_honour_thresholds():
    values = np.full((8, 8), np.nan)
    values[2:6, 2:6] = 0.9
    square = contour_polygons(values, 0.5, 10.0)
    x0, y0, x1, _y1 = square.bounds
    assert 20.0 <= x0 <= 21.0 and 59.0 <= x1 <= 60.0 and 20.0 <= y0 <= 21.0  # within a tenth of a cell
    ramp = np.tile(np.linspace(0, 1, 11), (5, 1))
    for threshold in (0.3, 0.7):
        region = contour_polygons(ramp, threshold, 1.0)
        assert region.bounds[0] == pytest.approx(threshold * 10 + 0.5, abs=1e-6)  # where the ramp crosses


def test_regions_of_a_real_texture_slide_follow_its_tumour_without_a_grid(tmp_path):
    """The second generator's slide (real H&E texture, branching tumour), scored by an oracle that knows the
    planted tumour: each tile's probability a confident majority vote of its cover (as a classifier trained on
    tiles labelled by majority is), its CAM the cover of each cell. The stitch and export then owe us regions
    within IoU 0.9 of the truth, outlines within half a tile, and no tile grid inside the tumour."""
    from wsi_dala.core.config import ExportConfig
    from wsi_dala.outputs.geojson import export_regions
    from wsi_dala.runs.truth import outline_distance_um, tumour_iou
    from wsi_dala.slides.synthetic import TUMOUR
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide
    from wsi_dala.tiling.grid import tissue_fractions
    from wsi_dala.tiling.tiler import tile_slide

    textures = load_textures(Path(__file__).parent / "data" / "textures" / "textures.json", 0.5)
    spec = TextureSlideSpec(width=5760, height=4320, seed=7, tumour_fraction=0.35)
    slide = write_texture_slide(tmp_path / "texture.svs", textures["normal"], textures["tumour"], spec)
    tiled = tile_slide(slide.path, tmp_path / "run", TilingConfig(mpp=0.5, tile_size_px=128), progress=False)
    store = TileStore(tiled.store, mode="r+")
    grid, tumour = 4, slide.labels == TUMOUR
    coords, side = store.coords(), store.info.tile_size_l0
    cover = tissue_fractions(tumour, float(slide.label_px), coords, side)
    offsets = [np.array([c, r]) * side / grid for r in range(grid) for c in range(grid)]
    cells = np.stack(
        [tissue_fractions(tumour, float(slide.label_px), coords + offset, side / grid) for offset in offsets], axis=1
    ).reshape(-1, grid, grid)
    p = 1 / (1 + np.exp(-12 * (cover - 0.5)))
    done = store.prepare_scores(2, grid, "oracle")
    for index, rows in enumerate(store.info.chunk_rows()):
        store.write_scores(index, np.stack([1 - p[rows], p[rows]], axis=1), cells[rows].astype(np.float32))
        store.mark_score_chunk_done(index, done)
    store.mark_scores_complete(ScoringRecord(["Non-tumor", "Tumor"], "Tumor", grid, "fp32"))
    heatmap = stitch(store.path, HeatmapConfig())
    regions = tmp_path / "texture.tumour.geojson"
    export_regions(heatmap, regions, ExportConfig())
    assert tumour_iou(slide, regions) >= 0.9
    distance = outline_distance_um(slide, regions)
    assert distance is not None and distance <= side * slide.spec.mpp / 2
    assert heatmap.seam_index is not None and 0.97 <= heatmap.seam_index <= 1.03
    assert heatmap.tile_period_power is not None and heatmap.tile_period_power <= 1.5
