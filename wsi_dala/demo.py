"""``wsi-dala demo``: the whole pipeline on generated data, with no download and no data of your own.

1. writes two synthetic H&E slides with planted tumour for training (and QuPath annotations of their
   tumour, as a pathologist would draw them) and a third slide to analyse;
2. trains a small-input DALAResNet50 from scratch on tiles cut from the annotated slides (one slide
   trains, the other validates: a split by slide);
3. runs ``wsi-dala run`` on the third slide;
4. reports the IoU of the exported tumour regions against the planted truth.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import shapely

from qupath_export.annotations import read_annotations
from qupath_export.geojson import annotation_feature, write_feature_collection
from qupath_export.polygons import mask_to_polygons
from wsi_dala.config import PipelineConfig, TilingSection
from wsi_dala.pipeline import RunSummary, run_slide
from wsi_dala.synthetic import TUMOUR, SyntheticSlide, SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.tiling import TilingConfig
from wsi_dala.training.slide_tiles import AnnotatedSlide, annotated_slide_samples
from wsi_dala.training.train import TrainConfig, train_model


@dataclass(frozen=True)
class DemoSettings:
    slide_width: int = 12288
    slide_height: int = 9216
    train_width: int = 8192
    train_height: int = 6144
    tile_size_px: int = 128
    tile_mpp: float = 0.5
    epochs: int = 3
    seed: int = 20


def write_truth_annotations(slide: SyntheticSlide, path: Path) -> Path:
    """The planted tumour as QuPath annotations (what a pathologist would draw and export)."""
    regions = mask_to_polygons(slide.labels == TUMOUR, pixel_size=slide.label_px)
    features = [f for f in (annotation_feature(p, "Tumor", "planted tumour") for p in regions.geoms) if f]
    write_feature_collection(path, features)
    return path


def tumour_iou(slide: SyntheticSlide, regions_geojson: Path) -> float:
    """IoU of exported tumour annotations with the planted tumour (level-0 polygons)."""
    truth = mask_to_polygons(slide.labels == TUMOUR, pixel_size=slide.label_px)
    found = shapely.union_all([a.geometry for a in read_annotations(regions_geojson)])
    union = shapely.union(truth, found).area
    return float(shapely.intersection(truth, found).area / union) if union > 0 else 0.0


def run_demo(
    out_dir: str | Path, settings: DemoSettings | None = None, progress: bool = True, say=print
) -> tuple[RunSummary, float]:
    settings = settings or DemoSettings()
    out = Path(out_dir)
    started = time.perf_counter()
    slides_dir = out / "slides"
    say(f"[1/4] writing synthetic slides into {slides_dir}")
    train_slides = []
    for offset in (1, 2):
        spec = SyntheticSlideSpec(
            width=settings.train_width,
            height=settings.train_height,
            mpp=0.25,
            seed=settings.seed + offset,
            tumour_regions=4,
        )
        slide = write_synthetic_slide(slides_dir / f"train_{offset}.svs", spec)
        write_truth_annotations(slide, slides_dir / f"train_{offset}.geojson")
        train_slides.append(slide)
    target = write_synthetic_slide(
        slides_dir / "case.svs",
        SyntheticSlideSpec(width=settings.slide_width, height=settings.slide_height, mpp=0.25, seed=settings.seed),
    )

    say(
        f"[2/4] training DALAResNet50 from scratch on tiles of the annotated slides "
        f"({settings.tile_size_px} px at {settings.tile_mpp} µm/px, {settings.epochs} epochs, CPU is fine)"
    )
    tiling = TilingConfig(target_mpp=settings.tile_mpp, tile_size_px=settings.tile_size_px, min_tissue=0.25)
    samples, names, mpp = annotated_slide_samples(
        [AnnotatedSlide(s.path, s.path.with_suffix(".geojson")) for s in train_slides],
        out / "training-tiles",
        tiling,
        min_cover=0.5,
        unannotated_class="Non-tumor",
        progress=progress,
    )
    train = [s for s in samples if s.group == train_slides[0].path.name]
    val = [s for s in samples if s.group == train_slides[1].path.name]
    config = TrainConfig(
        pretrained="none",
        input_size=settings.tile_size_px,
        epochs=settings.epochs,
        batch_size=32,
        lr_backbone=1e-3,
        precise_bn_batches=8,
        seed=settings.seed,
    )
    card_fields = {
        "mpp": mpp,
        "mpp_note": "measured by the wsi-dala tiler (demo)",
        "training_data": {
            "source": "wsi-dala demo synthetic slides",
            "split": "by slide",
            "train_tiles": len(train),
            "val_tiles": len(val),
        },
    }
    trained = train_model(train, val, names, "Tumor", config, out / "model", card_fields, progress=progress)
    say(
        f"      validation balanced accuracy {trained.best_metrics['balanced_accuracy']:.3f} "
        f"(epoch {trained.best_epoch}); checkpoint {trained.checkpoint}"
    )

    say(f"[3/4] wsi-dala run {target.path}")
    pipeline = replace(PipelineConfig(), model=str(trained.checkpoint), tiling=TilingSection(min_tissue=0.25))
    summary = run_slide(target.path, out / "run", pipeline, progress=progress)
    iou = tumour_iou(target, summary.layout.tumour_geojson())
    say(f"[4/4] done in {time.perf_counter() - started:.0f} s")
    (out / "demo.json").write_text(json.dumps({"tumour_iou": iou, "run": str(summary.layout.run_json)}, indent=2))
    return summary, iou
