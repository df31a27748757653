"""Slide-level answers (issue 31): thresholds chosen from slide labels, the slide call, QC and stain warnings
capping it, the whole-tissue QuPath annotation, and the batch's review list and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from tests.qupath_rules import check_file
from tests.test_cli_commands import ok, wsi_dala
from wsi_dala.core.errors import CheckpointError, ConfigError
from wsi_dala.model import read_card, write_untrained_checkpoint
from wsi_dala.model.colour import CLASS_NAMES
from wsi_dala.model.slide_thresholds import (
    CALL_INDETERMINATE,
    CALL_NONE,
    CALL_TUMOUR,
    SlideThresholds,
    fit_slide_thresholds,
    slide_call,
)
from wsi_dala.runs.batch_report import write_review_csv
from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi_dala.training.slide_labels import read_slide_labels

NEGATIVE, POSITIVE = CLASS_NAMES  # "Non-tumor", "Tumor"


def test_thresholds_meet_their_targets_on_the_slides_they_were_fitted_on():
    rng = np.random.default_rng(0)
    negatives, positives = rng.uniform(0.0, 0.6, 40), rng.uniform(0.4, 1.0, 40)
    scores = np.concatenate([negatives, positives])
    tumour = np.r_[np.zeros(40, bool), np.ones(40, bool)]
    record = fit_slide_thresholds(scores, tumour, "top_k_mean_probability", "test")
    thresholds = SlideThresholds.from_card(record)
    assert thresholds is not None and thresholds.no_tumour_below <= thresholds.tumour_at
    called_tumour = scores >= thresholds.tumour_at
    called_none = scores < thresholds.no_tumour_below
    assert (called_tumour[~tumour]).sum() <= 2  # 95 % specificity: at most floor(0.05 * 40) false calls
    assert (called_none[tumour]).sum() <= 2  # 95 % sensitivity kept out of "no tumour"
    assert 0 < record["indeterminate_share"] < 0.6 and record["specificity"] >= 0.95
    assert abs(record["auc"] - 0.9) < 0.08
    # Separable slides: no indeterminate band; every slide lands on its own side.
    clean = fit_slide_thresholds(
        np.r_[0.1, 0.2, 0.3, 0.8, 0.9], np.r_[0, 0, 0, 1, 1].astype(bool), "tumour_area_mm2", "t"
    )
    assert clean["tumour_at"] == clean["no_tumour_below"] == pytest.approx(0.55)
    assert clean["sensitivity"] == clean["specificity"] == 1.0 and clean["indeterminate_share"] == 0.0


def test_the_call_and_the_warnings_that_cap_it():
    thresholds = SlideThresholds("top_k_mean_probability", tumour_at=0.8, no_tumour_below=0.3)
    assert slide_call(0.9, thresholds, [])[0] == CALL_TUMOUR
    assert slide_call(0.9, thresholds, ["40 % of tissue out of focus"])[0] == CALL_TUMOUR  # a warning never hides
    assert slide_call(0.5, thresholds, [])[0] == CALL_INDETERMINATE
    assert slide_call(0.1, thresholds, [])[0] == CALL_NONE
    call, reason = slide_call(0.1, thresholds, ["40 % of tissue out of focus"])
    assert call == CALL_INDETERMINATE and "out of focus" in reason
    assert slide_call(0.1, None, [])[0] == CALL_INDETERMINATE
    assert slide_call(None, thresholds, [])[0] == CALL_INDETERMINATE


def test_bad_thresholds_and_labels_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="one class only"):
        fit_slide_thresholds(np.r_[0.1, 0.2], np.r_[True, True], "tumour_area_mm2", "labels.csv")
    with pytest.raises(ConfigError, match="measure"):
        SlideThresholds.from_card({"measure": "mood", "tumour_at": 1, "no_tumour_below": 0})
    with pytest.raises(ConfigError, match="above"):
        SlideThresholds.from_card({"measure": "tumour_area_mm2", "tumour_at": 0.1, "no_tumour_below": 0.5})
    checkpoint = write_untrained_checkpoint(tmp_path / "m.safetensors", "colour-reference", 64, 1.0, CLASS_NAMES)
    card = read_card(checkpoint)
    card.slide_thresholds = {"measure": "tumour_area_mm2", "tumour_at": "high"}
    with pytest.raises(CheckpointError, match="slide_thresholds"):
        card.validate("m.safetensors")
    table = tmp_path / "labels.csv"
    for text, problem in (
        ("", "no slide labels"),
        ("name,diagnosis\na.svs,Tumor\n", "needs columns slide and label"),
        ("slide,label\na.svs,Tumor\nsub/a.svs,Non-tumor\n", "listed twice"),
        ("slide,label,split\na.svs,Tumor,later\n", "split"),
        ("slide,label\na.svs,\n", "no label"),
    ):
        table.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            read_slide_labels(table)


def test_the_review_csv_keeps_a_slide_name_a_spreadsheet_would_run_as_text(tmp_path):
    path = tmp_path / "review.csv"
    write_review_csv(path, [{"rank": 1, "slide": '=HYPERLINK("http://x")', "call": "tumour", "tumour_mm2": 1.5}])
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["slide"].startswith("'=") and rows[0]["tumour_mm2"] == "1.5"


# ---------------------------------------------------------------- end to end, through the console script


@pytest.fixture(scope="module")
def labelled_archive(tmp_path_factory):
    """Six small slides: three with tumour, three without (one of them inked), a batch over them with the
    colour scorer, and their labels."""
    root = tmp_path_factory.mktemp("slide_level")
    archive = root / "archive"
    rows = ["slide,label"]
    for i in range(6):
        tumour = i % 2 == 0
        spec = SyntheticSlideSpec(
            width=2048,
            height=1536,
            mpp=0.5,
            seed=50 + i,
            app_mag=20,
            tumour_regions=2 if tumour else 0,
            pen_marks=i == 5,
            debris=False,
        )
        write_synthetic_slide(archive / f"s{i}.svs", spec)
        rows.append(f"s{i}.svs,{POSITIVE if tumour else NEGATIVE}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    model = write_untrained_checkpoint(root / "colour.safetensors", "colour-reference", 64, 1.0, CLASS_NAMES)
    config = root / "pipeline.yaml"
    config.write_text(f"model: {model}\nscoring:\n  precision: fp32\n  batch_size: 16\n")
    ok(wsi_dala("batch", archive, "--out", root / "runs", "--config", config, "-q", timeout_s=300))
    return {"root": root, "archive": archive, "labels": labels, "model": model, "runs": root / "runs"}


@pytest.mark.slow
def test_calibrate_on_slide_labels_then_every_slide_gets_its_call(labelled_archive, tmp_path):
    kit = labelled_archive
    out = tmp_path / "calibrated"
    result = ok(
        wsi_dala(
            "calibrate", "--model", kit["model"], "--slide-labels", kit["labels"], "--runs", kit["runs"], "--out", out
        )
    )
    assert "slide AUC 1.000" in result.stdout, result.stdout
    thresholds = read_card(out / "calibrated.safetensors").slide_thresholds
    assert thresholds["slides"] == 6 and thresholds["tumour_slides"] == 3 and thresholds["auc"] == 1.0
    assert (out / "slide_thresholds.png").stat().st_size > 5000
    # The weights are the input's, byte for byte: only the card changed.
    from safetensors.numpy import load_file

    before, after = load_file(str(kit["model"])), load_file(str(out / "calibrated.safetensors"))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)

    config = tmp_path / "calibrated.yaml"
    config.write_text(f"model: {out / 'calibrated.safetensors'}\nscoring:\n  precision: fp32\n  batch_size: 16\n")
    batch = tmp_path / "batch"
    ok(wsi_dala("batch", kit["archive"], "--out", batch, "--config", config, "-q", timeout_s=300))
    answers = {
        Path(json.loads(p.read_text())["slide"]["path"]).name: json.loads(p.read_text())["slide_answer"]
        for p in batch.rglob("run.json")
    }
    assert [answers[f"s{i}.svs"]["call"] for i in (0, 2, 4)] == [CALL_TUMOUR] * 3
    assert [answers[f"s{i}.svs"]["call"] for i in (1, 3)] == [CALL_NONE] * 2
    inked = answers["s5.svs"]  # tumour-free by its label, but inked: never "no tumour"
    assert inked["warnings"] and inked["call"] == CALL_INDETERMINATE and "marker ink" in inked["call_reason"]

    # The review list: tumour calls first, largest burden first, then indeterminate, then no tumour.
    rows = list(csv.DictReader((batch / "review.csv").open(encoding="utf-8")))
    assert [row["call"] for row in rows] == [CALL_TUMOUR] * 3 + [CALL_INDETERMINATE] + [CALL_NONE] * 2
    burdens = [float(row["tumour_mm2"]) for row in rows[:3]]
    assert burdens == sorted(burdens, reverse=True) and burdens[-1] > 0
    report = (batch / "report.md").read_text(encoding="utf-8")
    first_table = report[report.index("| #") :].splitlines()[2]
    assert rows[0]["slide"] in first_table and "Review list" in report.split("| #")[0]

    # The whole-tissue annotation carries the slide answer, over the tissue, and QuPath accepts the file.
    for folder in batch.iterdir():
        if not (folder / "run.json").is_file():
            continue
        record = json.loads((folder / "run.json").read_text())
        answer = record["slide_answer"]
        tissue = check_file(folder / record["outputs"]["slide_geojson"])
        assert len(tissue) == 1 and tissue[0]["properties"]["classification"]["name"] == "Tissue"
        measurements = tissue[0]["properties"]["measurements"]
        assert measurements["Tumour area mm^2"] == pytest.approx(answer["tumour_area_mm2"], abs=1e-4)
        assert measurements["Tumour regions"] == answer["regions"]
        assert tissue[0]["properties"]["metadata"]["Slide call"] == answer["call"]
        outline_mm2 = shape(tissue[0]["geometry"]).area * record["resolution"]["slide_mpp"] ** 2 / 1e6
        assert outline_mm2 == pytest.approx(answer["tissue_area_mm2"], rel=0.1)


def test_calibrate_on_slide_labels_refuses_bad_input_in_one_line(labelled_archive, tmp_path, capsys):
    from wsi_dala.cli import main

    kit = labelled_archive
    labels = tmp_path / "labels.csv"

    def refused_in_process(phrase: str, *extra: object, model: Path | None = None) -> None:
        argv = ["calibrate", "--model", model or kit["model"], "--out", tmp_path / "out", *extra]
        code = main([str(a) for a in argv])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and phrase in lines[0], lines

    labels.write_text("slide,label\ns0.svs,Tumor\ns1.svs,benign\n")
    refused_in_process("label 'benign' is not one of the model's", "--slide-labels", labels, "--runs", kit["runs"])
    labels.write_text("slide,label\ns0.svs,Tumor\nnever-run.svs,Non-tumor\n")
    refused_in_process("no run of slide(s) never-run.svs", "--slide-labels", labels, "--runs", kit["runs"])
    labels.write_text("slide,label\ns0.svs,Tumor\ns2.svs,Tumor\n")
    refused_in_process("one class only", "--slide-labels", labels, "--runs", kit["runs"])
    refused_in_process("give --runs DIR", "--slide-labels", kit["labels"])
    other = write_untrained_checkpoint(tmp_path / "other.safetensors", "colour-reference", 64, 0.5, CLASS_NAMES)
    refused_in_process(
        "made with another checkpoint", "--slide-labels", kit["labels"], "--runs", kit["runs"], model=other
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["real CMU-1 crop", "texture generator"])
def test_the_whole_tissue_annotation_follows_tissue_we_did_not_draw(source, colour_checkpoint, tmp_path):
    """The slide-level annotation on real H&E (the CMU-1 crop: ragged edges, fragments, a torn lumen) and on
    the second generator (real H&E texture): QuPath accepts it, it covers the tissue the run measured (IoU
    with the tissue mask >= 0.9, area within 5 %), and on the generated slide the planted tissue (IoU >= 0.85)."""
    from PIL import Image

    from wsi_dala.core.config import PipelineConfig
    from wsi_dala.runs.pipeline import run_slide
    from wsi_dala.slides.reader import Slide
    from wsi_dala.slides.synthetic import BACKGROUND
    from wsi_dala.slides.synthetic_texture import TextureSlideSpec, load_textures, write_texture_slide

    truth = None
    if source == "real CMU-1 crop":
        path = Path(__file__).parent / "data" / "cmu_small_region.svs"
    else:
        textures = load_textures(Path(__file__).parent / "data" / "textures" / "textures.json", 0.5)
        spec = TextureSlideSpec(width=3840, height=2880, seed=3, pieces=3)
        written = write_texture_slide(tmp_path / "texture.svs", textures["normal"], textures["tumour"], spec)
        path, truth = written.path, (written.labels != BACKGROUND, written.label_px)
    summary = run_slide(path, tmp_path / "run", PipelineConfig(model=str(colour_checkpoint)), progress=False)
    folder = summary.layout.root
    record = json.loads((folder / "run.json").read_text())
    features = check_file(folder / record["outputs"]["slide_geojson"])
    assert len(features) == 1 and features[0]["properties"]["classification"]["name"] == "Tissue"
    outline = shape(features[0]["geometry"])
    with Slide(path) as slide:
        width, height = slide.info.level_dimensions[0]
    mask = np.asarray(Image.open(folder / record["outputs"]["tissue_mask"]).convert("L")) > 127
    step_x, step_y = width / mask.shape[1], height / mask.shape[0]
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    inside = shapely.contains_xy(outline, (xs + 0.5) * step_x, (ys + 0.5) * step_y)
    iou = (inside & mask).sum() / (inside | mask).sum()
    assert iou >= 0.9, (source, iou)
    outline_mm2 = outline.area * record["resolution"]["slide_mpp"] ** 2 / 1e6
    assert outline_mm2 == pytest.approx(record["slide_answer"]["tissue_area_mm2"], rel=0.05), source
    if truth is not None:
        planted, label_px = truth
        ys, xs = np.mgrid[0 : planted.shape[0], 0 : planted.shape[1]]
        inside = shapely.contains_xy(outline, (xs + 0.5) * label_px, (ys + 0.5) * label_px)
        planted_iou = (inside & planted).sum() / (inside | planted).sum()
        assert planted_iou >= 0.85, planted_iou
