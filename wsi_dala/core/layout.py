"""Every path the program writes, in one place, so no two modules disagree on a file name.

One small frozen object per kind of output folder: a slide's run, a training run, an evaluation, a
calibration, a batch over an archive (and each slide's folder in it), the demo. Nothing else in the
package spells an output file name (``tests/test_layout.py`` greps for them).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from wsi_dala.core.formats import SLIDE_SUFFIXES, WRAPPER_SUFFIXES
from wsi_dala.core.locks import pid_alive

DEFAULT_RUNS_DIR = Path("wsi-dala-runs")  # `wsi-dala run` without --out writes below this, one folder per slide
DEFAULT_DEMO_DIR = "wsi-dala-demo"
SYNTHETIC_CARD_NAME = "synthetic.json"  # beside generated tiles: class, tile size, µm/px, generator
TILES_STORE_NAME = "tiles.zarr"  # in every run folder, and what `pretrain --archive` looks for
FEATURES_STORE_NAME = "features.zarr"  # wsi-dala features, beside tiles.zarr
PARTIAL_SUFFIX = ".partial"  # what is being written; renamed into place when complete
RUN_FORMAT = "wsi-dala.run/1"  # run.json's format: a run of another format is redone, never trusted


class _Below:
    """A fixed file or folder below a layout's ``root``: ``run_json = _Below("run.json")``."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.__doc__ = doc or name

    def __get__(self, layout: _Rooted | None, owner: type | None = None) -> Path:
        if layout is None:
            raise AttributeError(f"{self.name}: a path of a layout object, not of its class")
        return layout.root / self.name


class _Rooted(Protocol):
    @property
    def root(self) -> Path: ...


class _Layout:
    """Every layout's root is a Path, whatever the caller passed (a string from argparse, say): a layout
    built from a string once made every batch end in a TypeError after its work was done."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


def safe_stem(name: str) -> str:
    """A file-name-safe stem from a slide's name (never trust names from inputs)."""
    stem = Path(name).name
    suffix = Path(stem).suffix.lower()
    if suffix in SLIDE_SUFFIXES | WRAPPER_SUFFIXES:
        stem = stem[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or "slide"


def building_path(final: Path) -> Path:
    """The hidden name a folder (Zarr store) is built under before it is renamed to ``final``."""
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def partial_prefix(final: Path) -> str:
    """Prefix of the hidden temporary files written beside ``final`` before the atomic rename; the writer's
    process id follows it, so a later run can tell a dead writer's leftovers from a live one's."""
    return f".{final.name}."


_PARTIAL_PID = re.compile(r"\.(\d+)(?:-[0-9a-f]+)?(?:\.[A-Za-z]+)?" + re.escape(PARTIAL_SUFFIX) + "$")
STALE_PARTIAL_S = 24 * 3600.0  # a partial file with no writer we can see is this old: its writer is gone


def remove_stale_partials(folder: Path) -> int:
    """Remove the partial files in ``folder`` whose writer is gone: those named with a process id (see
    :func:`writing_path`) of a process no longer running on this host, and any untouched for a day. For
    folders no lock guards (export, training, engine caches), so that a kill -9 leaves nothing behind the
    next run of the command; returns how many were removed."""
    import time

    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.glob(f".*{PARTIAL_SUFFIX}"):
        match = _PARTIAL_PID.search(path.name)
        try:
            stale = time.time() - path.lstat().st_mtime > STALE_PARTIAL_S
        except FileNotFoundError:
            continue
        if match and not stale:
            stale = not pid_alive(int(match.group(1)))
        if stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_partials(folder: Path) -> int:
    """Remove what a killed writer left in ``folder`` (``.*.partial`` files and store folders); returns how
    many. Only for a folder this process holds the lock of: another writer's partials are live."""
    removed = 0
    for path in folder.glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def default_run_dir(slide_path: str | Path) -> Path:
    return DEFAULT_RUNS_DIR / safe_stem(str(slide_path))


def annotations_beside(slide_path: Path) -> Path:
    """Where `train --slide SLIDE` looks for QuPath annotations when none are named: ``<stem>.geojson``."""
    return slide_path.with_suffix(".geojson")


def cam_figure(out_dir: Path, image_path: Path) -> Path:
    """`wsi-dala cam`: one side-by-side figure per input image."""
    return out_dir / f"{safe_stem(image_path.stem)}.cam.png"


@dataclass(frozen=True)
class RunLayout(_Layout):
    """The output folder of one slide's run (also what `wsi-dala tile` writes)."""

    root: Path
    slide_stem: str = "slide"

    @classmethod
    def for_slide(cls, root: str | Path, slide_path: str | Path) -> RunLayout:
        return cls(Path(root), safe_stem(str(slide_path)))

    tiles_store = _Below(TILES_STORE_NAME)
    features_store = _Below(FEATURES_STORE_NAME, "a foundation model's tile features (wsi-dala features)")
    tissue_mask_png = _Below("tissue_mask.png")
    thumbnail_png = _Below("thumbnail.png")
    qc_png = _Below("qc.png", "The thumbnail with tissue outline, ink, folds and blurred tiles, and a legend.")
    heatmap_store = _Below("heatmap.zarr")
    heatmap_ngff = _Below("heatmap.ome.zarr", "The heatmap as an OME-NGFF 0.5 image (c, y, x in µm) for napari.")
    overview_png = _Below("overview.png")
    overlay_png = _Below("overlay.png")
    uncertainty_png = _Below("uncertainty.png", "The per-tile probability SD over the thumbnail (--tta, --mc-dropout).")
    attention_png = _Below("attention.png", "An attention-MIL model's attention over the thumbnail (--mil).")
    dicom_dir = _Below("dicom", "`run --dicom`, `export-dicom`: the results as DICOM (and the slide, when it was not).")

    @property
    def dicom_segmentation(self) -> Path:
        return self.dicom_dir / "tumour-probability.seg.dcm"

    @property
    def dicom_annotations(self) -> Path:
        return self.dicom_dir / "tumour-regions.ann.dcm"

    run_json = _Below("run.json")
    lock = _Below("run.lock", "Held while a run writes this folder: a second run on it is refused.")

    def tiles_geojson(self, gzip: bool = False) -> Path:
        return self.root / f"{self.slide_stem}.tiles.geojson{'.gz' if gzip else ''}"

    def tumour_geojson(self, gzip: bool = False) -> Path:
        return self.root / f"{self.slide_stem}.tumour.geojson{'.gz' if gzip else ''}"

    def slide_geojson(self, gzip: bool = False) -> Path:
        """One annotation over the whole tissue, carrying the slide answer as measurements."""
        return self.root / f"{self.slide_stem}.slide.geojson{'.gz' if gzip else ''}"


@dataclass(frozen=True)
class TrainLayout(_Layout):
    """The folder of one training run (`wsi-dala train --out DIR`)."""

    root: Path

    best_checkpoint = _Below("best.safetensors")
    last_state = _Below("last-state.pt", "Weights, optimiser and scheduler after the last epoch: the resume point.")
    metrics_csv = _Below("metrics.csv")
    curves_png = _Below("curves.png")
    reliability_png = _Below(
        "reliability.png",
        "The best checkpoint's reliability on the validation split, before and after its temperature.",
    )
    train_json = _Below("train.json", "The run's summary; `evaluate --split-from` reads its validation groups back.")
    tiles_dir = _Below("tiles", "`train --slide`: one tile-store folder per annotated slide below this.")
    features_dir = _Below(
        "features",
        "`train --freeze-backbone` on image folders: the encoder's pooled features, one Zarr per encoder "
        "(slide tiles keep theirs in features.zarr beside their tiles).",
    )


@dataclass(frozen=True)
class GanLayout(_Layout):
    """The folder of one GAN training run (`wsi-dala gan train --out DIR`)."""

    root: Path

    checkpoint = _Below("gan.safetensors", "Generator (and its EMA) and discriminator with their card: `gan sample`.")
    last_state = _Below("last-state.pt", "Optimisers, step, ADA p and random state: the resume point.")
    losses_csv = _Below("losses.csv", "Per step: discriminator and generator loss, R1, ADA p, r_t.")
    kid_csv = _Below("kid.csv", "KID of generated against held-out real tiles, per measurement.")
    curves_png = _Below("curves.png")
    samples_png = _Below("samples.png", "A grid of generated tiles per class at the last checkpoint.")


def generated_tile_name(class_name: str, seed: int, index: int) -> str:
    """The file of one `gan sample` tile: class, latent seed and number (never a path: the class is sanitised)."""
    return f"{safe_stem(class_name.lower())}-{seed}-{index:05d}.png"


@dataclass(frozen=True)
class PretrainLayout(_Layout):
    """The folder of one pre-training run (`wsi-dala pretrain --out DIR`)."""

    root: Path

    backbone = _Below("backbone.safetensors", "The encoder's weights and their card: `train --pretrained` takes it.")
    last_state = _Below("last-state.pt", "Encoder, projection head, optimiser after the last epoch: the resume point.")
    loss_csv = _Below("loss.csv", "The loss of every step (epoch, step, loss).")
    loss_png = _Below("loss.png")
    pretrain_json = _Below("pretrain.json", "The run's settings, data and final loss.")


LESION_MASKS_ARRAY = "masks"  # in a lesion-mask store: [N, S, S] bool, row i the mask of tile i


def lesion_masks_store(tiles_store: Path) -> Path:
    """`train --mask-guided`: the lesion mask of each tile of an annotated slide's ``tiles.zarr``, beside it."""
    return Path(tiles_store).parent / "lesion_masks.zarr"


def feature_cache_store(cache_dir: Path, key: str) -> Path:
    """One encoder's features of one set of training tiles (``key``: what they were computed from)."""
    return cache_dir / f"features-{key}.zarr"


def features_store_beside(tiles_store: Path) -> Path:
    """The features store of a tile store's tiles (``features``, and ``train --freeze-backbone`` on slides)."""
    return tiles_store.parent / FEATURES_STORE_NAME


def slide_tiles_dir(tiles_root: Path, slide_path: Path) -> Path:
    """The folder (holding ``tiles.zarr``) of one annotated slide's training tiles."""
    return tiles_root / safe_stem(slide_path.name)


@dataclass(frozen=True)
class EvalLayout(_Layout):
    """The folder of one evaluation (`wsi-dala evaluate --out DIR`)."""

    root: Path

    metrics_json = _Below("metrics.json")
    reliability_png = _Below("reliability.png", "Accuracy against confidence, at T = 1 and at the card's temperature.")
    tiles_dir = _Below("tiles", "`evaluate --slide`: one tile-store folder per annotated slide below this.")

    def confusion_png(self, magnification: str | None = None) -> Path:
        return self.root / (f"confusion_{magnification}.png" if magnification else "confusion.png")


@dataclass(frozen=True)
class CalibrateLayout(_Layout):
    """The folder of one calibration (`wsi-dala calibrate --out DIR`); the input checkpoint is never touched."""

    root: Path

    checkpoint = _Below("calibrated.safetensors", "The same weights, with temperature, calibration and CAM profile.")
    calibration_json = _Below("calibration.json", "Written last: the temperature, ECE/Brier/NLL before and after.")
    reliability_png = _Below("reliability.png")
    tiles_dir = _Below("tiles", "`calibrate --slide`: one tile-store folder per annotated slide below this.")
    slide_thresholds_json = _Below(
        "slide_thresholds.json", "`calibrate --slide-labels`: the thresholds and each slide."
    )
    slide_thresholds_png = _Below("slide_thresholds.png", "Each labelled slide's measure, and the thresholds.")


@dataclass(frozen=True)
class MilLayout(_Layout):
    """The folder of `wsi-dala mil train` (and `mil evaluate`'s: its metrics and curve)."""

    root: Path

    model = _Below("mil.safetensors", "The attention-MIL model; its card names the encoder and the thresholds.")
    predictions_csv = _Below("oof_predictions.csv", "Each slide's out-of-fold probability and its fold.")
    metrics_json = _Below("slide_metrics.json", "AUC, balanced accuracy, sensitivity at 95 % specificity, ECE.")
    roc_png = _Below("slide_roc.png")
    record_json = _Below("mil.json", "Written last: settings, folds, seconds.")


@dataclass(frozen=True)
class BatchSlideLayout(_Layout):
    """One slide's folder inside a batch output: its run, its batch state and its lock."""

    root: Path

    state_json = _Below("state.json")
    lock = _Below("slide.lock")
    report_thumbnail = _Below("report-thumbnail.png", "report.html's picture of this slide: its overlay, small.")


@dataclass(frozen=True)
class BatchLayout(_Layout):
    """The output folder of `wsi-dala batch`: one folder per slide, and the batch's reports."""

    root: Path

    def slide(self, slide_id: str) -> BatchSlideLayout:
        return BatchSlideLayout(self.root / slide_id)

    batch_json = _Below("batch.json")
    report_md = _Below("report.md")
    review_csv = _Below("review.csv", "The review list for a spreadsheet: tumour calls first, largest burden first.")
    report_html = _Below("report.html", "The review list as a page: sortable, thumbnails, links to `wsi-dala view`.")


@dataclass(frozen=True)
class DemoLayout(_Layout):
    """Everything `wsi-dala demo` writes."""

    root: Path

    slides_dir = _Below("slides")

    def training_slide(self, number: int) -> Path:
        return self.slides_dir / f"train_{number}.svs"

    @property
    def case_slide(self) -> Path:
        return self.slides_dir / "case.svs"

    training_tiles_dir = _Below("training-tiles")

    @property
    def model(self) -> TrainLayout:
        return TrainLayout(self.root / "model")

    @property
    def run(self) -> RunLayout:
        return RunLayout.for_slide(self.root / "run", self.case_slide)

    demo_json = _Below("demo.json")


def engine_dir_beside(checkpoint: Path) -> Path:
    """The folder beside a checkpoint that holds its engine files (``wsi_dala.inference.engines``)."""
    return checkpoint.parent / f"{checkpoint.name}.engines"


def writing_path(final: Path, pid: int, step: str = "") -> Path:
    """The hidden file one process writes before renaming it to ``final`` (``step``: an intermediate file)."""
    return final.with_name(f".{final.name}.{pid}{step}{PARTIAL_SUFFIX}")


@dataclass(frozen=True)
class EngineLayout(_Layout):
    """One checkpoint's engine files: ONNX exports (fp32, int8), measured speeds, OpenVINO's compile cache."""

    root: Path
    stem: str  # the checkpoint's file stem

    def onnx(self, sha256: str, tile_px: int, variant: str = "") -> Path:
        return self.root / f"{self.stem}-{sha256[:16]}-{tile_px}px{variant}.onnx"

    def exports(self) -> list[Path]:
        """Every export of this checkpoint name, whatever its hash."""
        return sorted(self.root.glob(f"{self.stem}-*px*.onnx"))

    def is_of(self, path: Path, sha256: str) -> bool:
        return path.name.startswith(f"{self.stem}-{sha256[:16]}-")

    @staticmethod
    def external_data(export: Path) -> Path:
        """The weights file of an export over ONNX's 2 GB single-file limit (the name the exporter gives it)."""
        return export.with_name(export.name + ".data")

    speed_json = _Below("speed.json", "tiles/s per engine, CPU, checkpoint, tile size, batch and threads")
    openvino_cache = _Below("openvino-cache")


@dataclass(frozen=True)
class WSInferModelLayout(_Layout):
    """A WSInfer model folder (the wsinfer-zoo layout, and QuPath's ``local/<model>/``): read by ``run --model
    DIR``, written by ``export-model --format wsinfer``; the checkpoint it was imported as sits in ``.wsi-dala/``."""

    root: Path

    config_json = _Below("config.json", "the wsinfer-zoo model config (spec 1.0)")
    torchscript = _Below("torchscript_model.pt", "the TorchScript model: tiles in, logits out")
    import_dir = _Below(".wsi-dala", "the wsi-dala checkpoint made from this folder")

    def imported_checkpoint(self, cache_dir: Path, digest: str, name: str | None = None) -> Path:
        """``name`` for a hub snapshot, whose folder is named by its commit."""
        return cache_dir / f"{name or self.root.name or 'model'}-{digest[:16]}.safetensors"


# A model repository on the Hugging Face hub, as `run --model NAME` fetches it (wsi_dala.interop.model_hub).
HUB_MODEL_FILES = ("config.json", "torchscript_model.pt")  # the WSInfer model folder (WSInferModelLayout)
HUB_README = "README.md"  # the repository's model card: its YAML front matter names the licence
ZOO_REGISTRY_FILE = "wsinfer-zoo-registry.json"  # in the dataset kaczmarj/wsinfer-model-zoo-json


def imported_torchscript(checkpoint: Path) -> Path:
    """The TorchScript beside an imported checkpoint of an architecture we have no eager network for."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".torchscript.pt")


def is_import_cache(folder: Path) -> bool:
    """A folder imported WSInfer models are kept in: a model folder's ``.wsi-dala/``, or the user's cache."""
    own = WSInferModelLayout(folder.parent).import_dir
    return folder == own or folder.resolve() == IMPORT_CACHE_DIR.expanduser().resolve()


ONNX_MODEL_NAME = "model.onnx"  # export-model --format onnx
TORCHSCRIPT_CARD_NAME = "wsi_dala_model_card.json"  # our model card inside an exported TorchScript archive
IMPORT_CACHE_DIR = Path("~/.cache/wsi-dala/imported")  # imported WSInfer models of read-only folders
# A Hugging Face model repository's weights, as transformers and timm name them (the foundation presets).
HF_SAFETENSORS_WEIGHTS = "model.safetensors"
HF_TORCH_WEIGHTS = "pytorch_model.bin"


def encoder_engine_anchor(preset: str) -> Path:
    """What a foundation model's engine files are kept beside (``features --backend``): its exports live in
    ``<this>.engines/`` in the user cache, named by the encoder's weights hash, so a new set of weights for the
    same preset replaces the old export rather than adding 1-5 GB beside it."""
    return user_cache_dir() / "encoders" / f"{preset}.weights"


def user_cache_dir() -> Path:
    """The user's wsi-dala cache (``$XDG_CACHE_HOME/wsi-dala``, else ``~/.cache/wsi-dala``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsi-dala"


def checked_weights_record(sha256: str) -> Path:
    """The record that a checkpoint with this content hash loaded strictly (``wsi_dala.model.checked_weights``)."""
    return user_cache_dir() / "checked-weights" / f"{sha256}.json"
