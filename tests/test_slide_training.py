"""Training tiles from slides annotated in QuPath: tiled by the tiler, labelled by annotation class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qupath_export.annotations import read_annotations
from qupath_export.polygons import mask_to_polygons
from tests.conftest import QUICK
from wsi_dala.core.config import TilingConfig, TrainConfig
from wsi_dala.slides.synthetic import TUMOUR, SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.slide_tiles import AnnotatedSlide, annotated_slide_samples, parse_slide_argument
from wsi_dala.training.train import train_model


def _write_qupath_annotations(slide, path):
    """Tumour truth as QuPath would export it: a classified annotation per region, level-0 pixels."""
    polygons = mask_to_polygons(slide.labels == TUMOUR, pixel_size=slide.label_px)
    features = [
        {
            "type": "Feature",
            "id": f"0b8f8a52-4a0e-4d43-9a55-2f3c1a7de{i:03d}",
            "geometry": json.loads(json.dumps(polygon.__geo_interface__)),
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        }
        for i, polygon in enumerate(polygons.geoms)
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def annotated_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotated")
    slides = []
    for seed in (11, 12, 13):
        slide = write_synthetic_slide(
            folder / f"case{seed}.svs",
            SyntheticSlideSpec(width=4096, height=3072, mpp=0.25, seed=seed, tumour_regions=3),
        )
        _write_qupath_annotations(slide, folder / f"case{seed}.geojson")
        slides.append(slide)
    return slides


def test_annotations_read_back(annotated_slides):
    slide = annotated_slides[0]
    annotations = read_annotations(slide.path.with_suffix(".geojson"))
    assert annotations and {a.class_name for a in annotations} == {"Tumor"}
    area = sum(a.geometry.area for a in annotations)
    assert area == pytest.approx((slide.labels == TUMOUR).sum() * slide.label_px**2)
    assert parse_slide_argument(str(slide.path)).annotations == slide.path.with_suffix(".geojson")


def test_tiles_labelled_by_covering_annotation(annotated_slides, tmp_path):
    items = [AnnotatedSlide(s.path, s.path.with_suffix(".geojson")) for s in annotated_slides]
    tiling = TilingConfig(mpp=2.0, tile_size_px=32, min_tissue=0.5)
    samples, names, mpp = annotated_slide_samples(
        items, tmp_path, tiling, min_cover=0.5, unannotated_class="Non-tumor", progress=False
    )
    assert names == ["Tumor", "Non-tumor"] and mpp == pytest.approx(2.0)
    assert {s.group for s in samples} == {s.path.name for s in annotated_slides}
    import zarr

    agree = []
    for sample in samples:
        group = zarr.open_group(sample.source, mode="r")
        x, y = group["coords"][sample.index]
        slide = next(s for s in annotated_slides if s.path.name == sample.group)
        side = int(group.attrs["tile_size_l0"]) // slide.label_px
        patch = slide.labels[
            y // slide.label_px : y // slide.label_px + side, x // slide.label_px : x // slide.label_px + side
        ]
        truth_tumour = (patch == TUMOUR).mean() >= 0.5
        agree.append(truth_tumour == (names[sample.label] == "Tumor"))
    assert np.mean(agree) >= 0.99
    assert sum(names[s.label] == "Tumor" for s in samples) >= 20

    by_slide = {}
    for sample in samples:
        by_slide.setdefault(sample.group, []).append(sample)
    train = by_slide[annotated_slides[0].path.name] + by_slide[annotated_slides[1].path.name]
    val = by_slide[annotated_slides[2].path.name]
    result = train_model(
        train,
        val,
        names,
        "Tumor",
        # fp32: the same numbers on CPUs with and without native bf16 (bf16 autocast changes this short run).
        TrainConfig(input_size=32, epochs=3, precision="fp32", **QUICK),
        tmp_path / "run",
        {"mpp": mpp, "mpp_note": "measured by the wsi-dala tiler"},
        progress=False,
    )
    assert result.best_metrics["balanced_accuracy"] >= 0.9
