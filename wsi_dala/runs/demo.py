"""``wsi-dala demo``: the whole pipeline on generated data, with no download and no data of your own.

1. writes two synthetic H&E slides with planted tumour for training (and QuPath annotations of their
   tumour, as a pathologist would draw them) and a third slide to analyse;
2. trains a small-input DALAResNet50 from scratch on tiles cut from the annotated slides (one slide
   trains, the other validates: a split by slide);
3. runs ``wsi-dala run`` on the third slide;
4. reports the IoU of the exported tumour regions against the planted truth.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig, TrainConfig
from wsi_dala.core.fileio import write_json_atomic
from wsi_dala.core.layout import DemoLayout, annotations_beside
from wsi_dala.model.checkpoint import store_in_half_precision
from wsi_dala.runs.pipeline import RunSummary, run_slide
from wsi_dala.runs.truth import tumour_iou, write_truth_annotations
from wsi_dala.slides.synthetic import SyntheticSlide, SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.slide_tiles import AnnotatedSlide, annotated_slide_samples
from wsi_dala.training.train import TrainResult, train_model


@dataclass(frozen=True)
class DemoSettings:
    case_size_px: tuple[int, int] = (12288, 9216)  # (width, height) at level 0 of the slide analysed
    training_size_px: tuple[int, int] = (8192, 6144)  # each of the two annotated training slides
    tile_size_px: int = 128
    tile_mpp: float = 0.5
    epochs: int = 3
    seed: int = 20


def _write_slides(layout: DemoLayout, settings: DemoSettings) -> tuple[list[SyntheticSlide], SyntheticSlide]:
    """Two annotated training slides and the case to analyse."""
    train_slides = []
    for number in (1, 2):
        spec = SyntheticSlideSpec(
            width=settings.training_size_px[0],
            height=settings.training_size_px[1],
            mpp=0.25,
            seed=settings.seed + number,
            tumour_regions=4,
        )
        slide = write_synthetic_slide(layout.training_slide(number), spec)
        write_truth_annotations(slide, annotations_beside(slide.path))
        train_slides.append(slide)
    case_spec = SyntheticSlideSpec(
        width=settings.case_size_px[0], height=settings.case_size_px[1], mpp=0.25, seed=settings.seed
    )
    return train_slides, write_synthetic_slide(layout.case_slide, case_spec)


def _train(layout: DemoLayout, slides: list[SyntheticSlide], settings: DemoSettings, progress: bool) -> TrainResult:
    """DALAResNet50 from scratch on the annotated slides' tiles: the first slide trains, the second validates."""
    tiling = TilingConfig(mpp=settings.tile_mpp, tile_size_px=settings.tile_size_px, min_tissue=0.25)
    samples, names, mpp = annotated_slide_samples(
        [AnnotatedSlide(s.path, annotations_beside(s.path)) for s in slides],
        layout.training_tiles_dir,
        tiling,
        min_cover=0.5,
        unannotated_class="Non-tumor",
        progress=progress,
    )
    train = [s for s in samples if s.group == slides[0].path.name]
    val = [s for s in samples if s.group == slides[1].path.name]
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
    return train_model(train, val, names, "Tumor", config, layout.model.root, card_fields, progress=progress)


def _shrink(layout: DemoLayout, trained: TrainResult) -> None:
    """The demo keeps what a user looks at: not the training run's resume state (300 MB) nor its tile cache, and
    the checkpoint's weights in fp16 (100 -> 50 MB), so the whole demo stays within 150 MB."""
    layout.model.last_state.unlink(missing_ok=True)
    shutil.rmtree(layout.training_tiles_dir, ignore_errors=True)
    store_in_half_precision(trained.checkpoint)


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    progress: bool = True,
    say: Callable[[str], object] = print,
) -> tuple[RunSummary, float]:
    settings = settings or DemoSettings()
    layout = DemoLayout(Path(out_dir))
    started = time.perf_counter()
    say(f"[1/4] writing synthetic slides into {layout.slides_dir}")
    train_slides, target = _write_slides(layout, settings)
    say(
        f"[2/4] training DALAResNet50 from scratch on tiles of the annotated slides "
        f"({settings.tile_size_px} px at {settings.tile_mpp} µm/px, {settings.epochs} epochs, CPU is fine)"
    )
    trained = _train(layout, train_slides, settings, progress)
    _shrink(layout, trained)
    say(
        f"      validation balanced accuracy {trained.best_metrics['balanced_accuracy']:.3f} "
        f"(epoch {trained.best_epoch}); checkpoint {trained.checkpoint}"
    )
    say(f"[3/4] wsi-dala run {target.path}")
    pipeline = PipelineConfig(
        model=str(trained.checkpoint),
        tiling=TilingConfig(min_tissue=0.25),
        # One small slide: exporting and measuring engines (10-30 s, 190 MB beside the checkpoint) costs more
        # than it saves; `wsi-dala run` with this model picks its engine as usual.
        scoring=ScoringConfig(backend="torch"),
    )
    summary = run_slide(target.path, layout.run.root, pipeline, progress=progress)
    iou = tumour_iou(target, summary.layout.tumour_geojson())
    say(f"[4/4] done in {time.perf_counter() - started:.0f} s")
    write_json_atomic(layout.demo_json, {"tumour_iou": iou, "run": str(summary.layout.run_json)})
    return summary, iou
