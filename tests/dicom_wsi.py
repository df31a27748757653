"""Write a DICOM WSI (VL Whole Slide Microscopy, TILED_FULL, JPEG baseline frames in YCbCr 4:2:2) from RGB levels.

For the tests only: it turns a real slide into a DICOM folder big enough to tile, so `run` can be checked
on DICOM against the same slide as SVS. The attributes come from OpenSlide's own DICOM fixture
(``tests/data/dicom-boxes/boxes_0.dcm``, written by PixelMed's TIFFToDicom); this changes only what
describes the image (size, frames, spacing, UIDs) and the pixel data. One file per level, one series.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

TEMPLATE = Path(__file__).parent / "data" / "dicom-boxes" / "boxes_0.dcm"


def write_dicom_wsi(
    levels: list[np.ndarray], mpp: float, out_dir: Path, tile_px: int = 256, quality: int = 95
) -> list[Path]:
    """``levels[0]`` at ``mpp`` µm/px, each next one 2^k coarser; one ``level_<k>.dcm`` per level."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(TEMPLATE)
    series = {name: generate_uid() for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    written = []
    for k, image in enumerate(levels):
        downsample = levels[0].shape[1] / image.shape[1]
        ds = copy.deepcopy(template)
        for name, uid in series.items():
            setattr(ds, name, uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL" if k == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE" if k == 0 else "RESAMPLED"]
        ds.SharedFunctionalGroupsSequence[0].WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType = ds.ImageType
        if "ImageComments" in ds:
            del ds.ImageComments  # the source Aperio description: it would describe another image
        height, width = image.shape[:2]
        spacing_mm = mpp * downsample / 1000
        ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [spacing_mm, spacing_mm]
        ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = 0.004  # a 4 µm section
        ds.ImagedVolumeDepth = 4.0  # µm
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing_mm, height * spacing_mm
        ds.Rows = ds.Columns = tile_px
        frames = _jpeg_frames(image, tile_px, quality)
        ds.NumberOfFrames = len(frames)
        ds.PixelData = encapsulate(frames)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"  # Pillow writes YCbCr; 4:2:2 (subsampling=1), as OpenSlide reads
        ds.LossyImageCompressionRatio = f"{image.nbytes / sum(len(f) for f in frames):.2f}"
        path = out_dir / f"level_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _jpeg_frames(image: np.ndarray, tile_px: int, quality: int, column_major: bool = False) -> list[bytes]:
    """TILED_FULL order: row by row, left to right (or column by column); edge tiles padded with black, as
    the real single-file writer the tests imitate pads them."""
    height, width = image.shape[:2]
    cells = [(top, left) for top in range(0, height, tile_px) for left in range(0, width, tile_px)]
    if column_major:
        cells.sort(key=lambda cell: (cell[1], cell[0]))
    frames = []
    for top, left in cells:
        tile = (
            np.zeros((tile_px, tile_px, 3), np.uint8) if column_major else np.full((tile_px, tile_px, 3), 255, np.uint8)
        )
        part = image[top : top + tile_px, left : left + tile_px]
        tile[: part.shape[0], : part.shape[1]] = part
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, "JPEG", quality=quality, subsampling=1)
        frames.append(buffer.getvalue())
    return frames


def write_undescribed_dicom_wsi(
    image: np.ndarray, path: Path, tile_px: int = 256, quality: int = 95, long_uids: bool = False
) -> Path:
    """One file, one level, as another tool wrote the real TCGA crop in ../shared/real/wsi: a VL Whole Slide
    Microscopy Image without ImageType (which the IOD requires), without pixel spacing or any functional
    group, without DimensionOrganizationType, its frames stored column by column and padded with black.
    ``long_uids``: its series and instance UIDs 65 and 66 characters long, as that file's are (DICOM allows 64)."""
    template = pydicom.dcmread(TEMPLATE)
    ds = copy.deepcopy(template)
    for name in ("StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, name, generate_uid())
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if long_uids:
        root = "1.2.826.0.1.3680043.8.498."
        with pydicom.config.disable_value_validation():
            ds.SeriesInstanceUID = root + "8" * (65 - len(root))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = root + "6" * (64 - len(root)) + ".4"
    for keyword in (
        "ImageType",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionOrganizationType",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
        "FrameOfReferenceUID",
        "ImageComments",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    height, width = image.shape[:2]
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.Rows = ds.Columns = tile_px
    frames = _jpeg_frames(image, tile_px, quality, column_major=True)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    path.parent.mkdir(parents=True, exist_ok=True)
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path
