"""A run's results as DICOM a hospital archive stores (``run --dicom``, ``wsi-dala export-dicom RUN_DIR``).

Written with highdicom (the Imaging Data Commons' library for derived DICOM objects) into ``RUN/dicom/``:

- ``tumour-probability.seg.dcm``: the heatmap's tumour layer as a DICOM Segmentation, FRACTIONAL
  (probability, 8 bits), at the heatmap's own cell size, tiled, in the slide's frame of reference; no tissue
  reads as 0;
- ``tumour-regions.ann.dcm``: the tumour regions at the lowest threshold (their outlines; holes are not
  kept, as the POLYGON graphic type has none) as Microscopy Bulk Simple Annotations, each with its mean
  tumour probability as a measurement.

Both reference their source image. A DICOM slide is referenced as it is (its study, series and frame of
reference; its patient and study attributes copied by highdicom). Any other slide is first written as a DICOM
WSI in ``RUN/dicom/slide/`` by wsidicomizer (through tiffslide), and the results reference that copy. Each
file is written under a temporary name and renamed: a crash leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala import __version__
from wsi_dala.core.errors import ConfigError, OutputError, SlideOpenError
from wsi_dala.core.fileio import atomic_open, ensure_writable_dir
from wsi_dala.core.layout import RunLayout, building_path
from wsi_dala.outputs.slide_answer import lowest_threshold_regions

log = logging.getLogger(__name__)
VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
IDENTITY = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "TotalPixelMatrixColumns")


class _NoDeprecations(logging.Filter):
    """pydicom logs its deprecation notices (wsidicom calls ``get_frame_offsets``): for developers, not users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()


_NO_DEPRECATIONS = _NoDeprecations()


@dataclass(frozen=True)
class DicomResults:
    source: Path  # the level-0 instance the results reference
    converted: bool  # the slide was written as DICOM first
    segmentation: Path
    annotations: Path | None
    study_uid: str


def _level0_instance(folder: Path) -> Path:
    """The finest VOLUME instance of a DICOM WSI folder."""
    import pydicom

    best, size = None, -1
    for path in sorted(folder.glob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            if str(header.get("SOPClassUID")) != VL_WSI or "TotalPixelMatrixColumns" not in header:
                continue
            kind = [str(v) for v in header.get("ImageType", [])]
        except Exception:  # not DICOM, or values pydicom refuses: not a level to build on
            continue
        if len(kind) > 2 and kind[2] not in ("VOLUME", "THUMBNAIL"):
            continue
        area = int(header.TotalPixelMatrixColumns) * int(header.TotalPixelMatrixRows)
        if area > size:
            best, size = path, area
    if best is None:
        raise SlideOpenError(f"{folder}: no DICOM whole-slide image level here")
    return best


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text.split(". ")[0].rstrip(".") or type(exc).__name__


def source_image(record: dict[str, Any], out: Path) -> tuple[Path, bool]:
    """The DICOM instance the results reference: the slide's own, or a DICOM copy written now."""
    slide = Path(str(record["slide"]["path"]))
    if not slide.exists():
        raise SlideOpenError(f"{slide}: the run's slide is not there any more; DICOM results need it")
    folder = slide if slide.is_dir() else slide.parent if slide.suffix.lower() == ".dcm" else None
    if folder is not None:
        import pydicom

        source = _level0_instance(folder)
        header = pydicom.dcmread(source, stop_before_pixels=True)
        try:
            missing = [name for name in IDENTITY if not header.get(name)]
            typed = bool(header.get("ImageType"))
        except ValueError as exc:  # a value pydicom refuses (a UID over 64 characters): results cannot cite it
            reason = _first_sentence(exc)
            raise OutputError(f"{source}: not valid DICOM ({reason}); DICOM results cannot reference it") from exc
        if missing or not typed:
            raise OutputError(
                f"{source}: lacks {', '.join(missing) or 'ImageType'}, which DICOM results must reference; "
                "they cannot point at this slide"
            )
        return source, False
    converted = out / "slide"
    if not converted.is_dir() or not any(converted.glob("*.dcm")):
        from wsidicomizer import WsiDicomizer
        from wsidicomizer.sources import TiffSlideSource

        partial = building_path(converted)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            WsiDicomizer.convert(
                slide,
                partial,
                preferred_source=TiffSlideSource,
                include_label=False,  # a label or macro carries patient data: never copied
                include_overview=False,
                include_confidential=False,
            )
        except Exception as exc:  # wsidicomizer raises its sources' errors
            shutil.rmtree(partial, ignore_errors=True)
            raise OutputError(f"{slide}: cannot be written as DICOM ({exc}); DICOM results need a DICOM slide") from exc
        shutil.rmtree(converted, ignore_errors=True)
        partial.rename(converted)
    return _level0_instance(converted), True


def with_slice_thickness(source: Any, path: Path) -> Any:
    """highdicom needs the source's pixel measures whole, and a slice thickness above zero (dciodvfy refuses
    zero); some writers leave it out or write 0. Taken then from the imaged volume's depth (the same quantity
    for a single focal plane), in memory only."""
    try:
        measures = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError) as exc:
        raise OutputError(f"{path}: no pixel measures (pixel spacing); DICOM results cannot be placed on it") from exc
    thickness = measures.get("SliceThickness")
    if thickness in (None, "") or float(thickness) <= 0:
        depth = source.get("ImagedVolumeDepth")
        if depth in (None, "") or float(depth) <= 0:
            raise OutputError(f"{path}: no slice thickness and no imaged volume depth; DICOM results need one")
        measures.SliceThickness = float(depth) / 1000  # µm -> mm
        log.info("%s: no slice thickness; the imaged volume's depth (%s µm) stands for it", path, depth)
    return source


def _algorithm() -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name="wsi-dala", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )


def _new_instance(series_number: int, model_name: str) -> dict[str, Any]:
    """What identifies a new object of ours: a new series and instance, and the software that made it."""
    import highdicom as hd

    return {
        "series_instance_uid": hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": "wsi-dala",
        "manufacturer_model_name": model_name,
        "software_versions": __version__,
        "device_serial_number": "not applicable",
    }


def _write(dataset: Any, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        dataset.save_as(handle, enforce_file_format=True)


def write_segmentation(source: Any, tumour: np.ndarray, cell_l0: float, path: Path, series_number: int) -> None:
    """The tumour layer (NaN: no tissue, written as 0) as a FRACTIONAL probability Segmentation."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row_mm, column_mm = (float(v) for v in spacing.PixelSpacing)
    thickness = float(spacing.SliceThickness)  # the source's (with_slice_thickness made sure it has one)
    transform = hd.spatial.PixelToReferenceTransformer.for_image(
        source, for_total_pixel_matrix=True
    )  # source pixel (col, row) -> slide mm
    centre = (cell_l0 - 1) / 2  # the first cell's centre, in source pixels from the first pixel's centre
    first, along, down = transform(np.array([[0, 0], [1, 0], [0, 1]]))  # the pixel grid's affine, in mm
    x, y, z = first + centre * (along - first) + centre * (down - first)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Tumour probability",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(),
    )
    values = np.nan_to_num(np.clip(tumour, 0.0, 1.0), nan=0.0).astype(np.float32)
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=values[None, ..., None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[segment],
        **_new_instance(series_number, "wsi-dala tumour heatmap"),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_description="Tumour probability",
        content_label="TUMOUR_PROB",
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(row_mm * cell_l0, column_mm * cell_l0), slice_thickness=thickness
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=[float(v) for v in source.ImageOrientationSlide]
        ),
        plane_positions=[
            hd.PlanePositionSequence(
                coordinate_system="SLIDE", image_position=(float(x), float(y), float(z)), pixel_matrix_position=(1, 1)
            )
        ],
        tile_pixel_array=True,
        tile_size=(256, 256),
        omit_empty_frames=False,
    )
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = ""  # General Image's Type 2C: present, empty for a slide (dciodvfy asks for it)
    _write(seg, path)


def write_annotations(source: Any, regions: list[tuple[np.ndarray, float]], path: Path, series_number: int) -> None:
    """Each region's outline (level-0 pixels of the source's total pixel matrix) with its mean probability."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    probability = hd.sr.CodedConcept(value="TUMPROB", scheme_designator="99WSIDALA", meaning="Tumour probability")
    group = hd.ann.AnnotationGroup(
        number=1,
        uid=hd.UID(),
        label="tumour regions",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Neoplasm,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[outline for outline, _ in regions],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(),
        measurements=[
            hd.ann.Measurements(
                name=probability,
                values=np.array([value for _, value in regions], dtype=np.float32),
                unit=codes.UCUM.NoUnits,
            )
        ],
    )
    annotations = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=[group],
        **_new_instance(series_number, "wsi-dala tumour regions"),
        content_description="Tumour regions",
        content_label="TUMOUR_REGIONS",
    )
    _write(annotations, path)


def region_outlines(regions_geojson: Path) -> list[tuple[np.ndarray, float]]:
    """The outer ring of every region at the lowest threshold (without its closing point) and its mean
    tumour probability."""
    found = []
    for feature in lowest_threshold_regions(regions_geojson):
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        mean = feature["properties"]["measurements"].get("Mean tumour probability", float("nan"))
        for polygon in polygons:
            ring = np.asarray(polygon[0], dtype=np.float64)[:-1]  # DICOM closes a polygon itself
            if len(ring) >= 3:
                found.append((ring, float(mean)))
    return found


def require_dicom_packages() -> None:
    """DICOM results need highdicom and wsidicomizer (the ``dicom`` extra): said before any slide is run."""
    from wsi_dala.core.extras import require

    require("highdicom", "DICOM results")
    require("wsidicomizer", "DICOM results")


def ensure_dicom(run_dir: str | Path) -> DicomResults:
    """The run's DICOM results: those already written when they are newer than its record and whole (its
    regions, if any, among them), else written now (``export.dicom``, ``run --dicom``, ``batch --dicom``)."""
    import pydicom

    layout = RunLayout(Path(run_dir))
    segmentation, annotations = layout.dicom_segmentation, layout.dicom_annotations
    try:
        record = json.loads(layout.run_json.read_text(encoding="utf-8"))
        fresh = segmentation.stat().st_mtime_ns >= layout.run_json.stat().st_mtime_ns
    except (OSError, ValueError):  # not written yet, or a record export_dicom will name
        return export_dicom(run_dir)
    if not fresh or record.get("status") != "complete":
        return export_dicom(run_dir)
    regions = region_outlines(layout.root / Path(record["outputs"]["tumour_geojson"]).name)
    if regions and not annotations.is_file():  # killed between the two files
        return export_dicom(run_dir)
    source, converted = source_image(record, layout.dicom_dir)
    study = str(pydicom.dcmread(segmentation, stop_before_pixels=True).StudyInstanceUID)
    return DicomResults(source, converted, segmentation, annotations if regions else None, study)


def export_dicom(run_dir: str | Path) -> DicomResults:
    """Write the run's DICOM results (see the module's docstring); refused in one line before writing when
    the run is not finished, its slide is gone, or its slide cannot be referenced."""
    import pydicom
    import zarr

    layout = RunLayout(Path(run_dir))
    try:
        record = json.loads(layout.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = "no run.json" if isinstance(exc, FileNotFoundError) else str(exc)
        raise ConfigError(f"{layout.root}: not a finished wsi-dala run ({reason})") from exc
    if record.get("status") != "complete":
        raise ConfigError(f"{layout.run_json}: not a finished wsi-dala run")
    logging.getLogger("pydicom").addFilter(_NO_DEPRECATIONS)
    require_dicom_packages()
    out = layout.dicom_dir
    ensure_writable_dir(out)
    source_path, converted = source_image(record, out)
    source = with_slice_thickness(pydicom.dcmread(source_path, stop_before_pixels=True), source_path)
    tumour = np.asarray(zarr.open_array(layout.heatmap_store / "tumour" / "0", mode="r")[:], dtype=np.float32)
    cell = zarr.open_group(layout.heatmap_store, mode="r").attrs.get("cell_l0")
    if not isinstance(cell, (int, float)):
        raise OutputError(f"{layout.heatmap_store}: no cell size in its attributes")
    cell_l0 = float(cell)
    write_segmentation(source, tumour, cell_l0, layout.dicom_segmentation, series_number=9001)
    regions_file = layout.root / Path(record["outputs"]["tumour_geojson"]).name
    regions = region_outlines(regions_file)
    annotations = None
    if regions:
        write_annotations(source, regions, layout.dicom_annotations, series_number=9002)
        annotations = layout.dicom_annotations
    else:
        layout.dicom_annotations.unlink(missing_ok=True)  # an earlier export's: no regions now
    return DicomResults(source_path, converted, layout.dicom_segmentation, annotations, str(source.StudyInstanceUID))
