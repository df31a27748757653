"""One small interface over openslide-python and tiffslide.

Coordinates are level-0 pixels in the frame QuPath shows: where OpenSlide reports a bounding box
(``openslide.bounds-*``, e.g. MIRAX), QuPath crops to it, so x/y here are OpenSlide's minus the bounds
offset and the size is the bounds' size. Regions outside the image come back as white background.

µm/px is resolved in a fixed order and reported with its source, because a wrong µm/px silently
changes what the model sees: user override > vendor property > TIFF resolution tags > objective power.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from PIL import Image

from wsi_dala.core.errors import ResolutionError, SlideOpenError, SlideReadError
from wsi_dala.core.formats import TIFF_SUFFIXES, TIFFSLIDE_FIRST_SUFFIXES
from wsi_dala.slides.tiff_regions import level_readers

READERS = ("auto", "openslide", "tiffslide")
BACKGROUND_RGB = 255  # what padding outside the image looks like: white glass
MPP_PLAUSIBLE_RANGE = (0.01, 100.0)  # µm/px; anything outside is metadata garbage
MAX_DICOM_FILES_CHECKED = 64  # a DICOM WSI holds one file per level (plus label, overview); more is another case

log = logging.getLogger(__name__)


def magnification_to_mpp(magnification: float) -> float:
    """Convert an objective magnification to µm/px by the usual convention (40x ≈ 0.25 µm/px)."""
    if not magnification > 0:
        raise ResolutionError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification


@dataclass(frozen=True)
class Resolution:
    """µm/px of level 0, and where that number came from."""

    mpp_x: float
    mpp_y: float
    source: str  # "user" | "vendor" | "tiff-resolution" | "objective-power"

    @property
    def mpp(self) -> float:
        """The mean of x and y; slides with non-square pixels are rare and warned about by callers."""
        return (self.mpp_x + self.mpp_y) / 2.0


@dataclass(frozen=True)
class SlideInfo:
    """What the reader knows about a slide, in QuPath's level-0 frame."""

    path: str
    reader: str
    vendor: str | None
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None
    objective_power: float | None
    bounds_offset: tuple[int, int]
    associated_images: tuple[str, ...]

    def level_mpp(self, level: int) -> float:
        """µm/px at a pyramid level (mean of x and y)."""
        if self.mpp_x is None or self.mpp_y is None:
            raise ResolutionError(f"{self.path}: µm/px is unknown")
        return (self.mpp_x + self.mpp_y) / 2.0 * self.level_downsamples[level]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _plausible_mpp(value: float | None) -> TypeGuard[float]:
    return value is not None and MPP_PLAUSIBLE_RANGE[0] <= value <= MPP_PLAUSIBLE_RANGE[1]


def mpp_from_tiff_resolution(properties: dict[str, Any]) -> tuple[float, float] | None:
    """µm/px from TIFF XResolution/YResolution (pixels per unit); None when the unit is not physical."""
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    x_res = _float_or_none(properties.get("tiff.XResolution"))
    y_res = _float_or_none(properties.get("tiff.YResolution"))
    if microns_per_unit is None or x_res is None or y_res is None:
        return None
    mpp = (microns_per_unit / x_res, microns_per_unit / y_res)
    return mpp if all(_plausible_mpp(v) for v in mpp) else None


def resolve_resolution(properties: dict[str, Any], reader: str, user_mpp: float | None = None) -> Resolution | None:
    """Pick level-0 µm/px from (in order) the user, the vendor's metadata, TIFF tags, objective power."""
    if user_mpp is not None:
        if not _plausible_mpp(user_mpp):
            raise ResolutionError(f"--slide-mpp {user_mpp} is outside {MPP_PLAUSIBLE_RANGE} µm/px")
        return Resolution(user_mpp, user_mpp, "user")
    vendor = properties.get(f"{reader}.vendor")
    mpp_x = _float_or_none(properties.get(f"{reader}.mpp-x"))
    mpp_y = _float_or_none(properties.get(f"{reader}.mpp-y"))
    tiff_mpp = mpp_from_tiff_resolution(properties)
    if _plausible_mpp(mpp_x) and _plausible_mpp(mpp_y):
        # Both readers fill mpp-x from TIFF tags for generic TIFFs; name that source honestly.
        from_tags = tiff_mpp is not None and vendor in (None, "generic-tiff") and not properties.get("aperio.MPP")
        return Resolution(mpp_x, mpp_y, "tiff-resolution" if from_tags else "vendor")
    if tiff_mpp is not None:
        return Resolution(tiff_mpp[0], tiff_mpp[1], "tiff-resolution")
    power = objective_power(properties, reader)
    if power is not None:
        mpp = magnification_to_mpp(power)
        return Resolution(mpp, mpp, "objective-power")
    return None


def objective_power(properties: dict[str, Any], reader: str) -> float | None:
    for key in (f"{reader}.objective-power", "openslide.objective-power", "aperio.AppMag"):
        power = _float_or_none(properties.get(key))
        if power is not None and power <= 200:
            return power
    return None


def bounds_offset(properties: dict[str, Any]) -> tuple[int, int, int | None, int | None]:
    """OpenSlide's bounds box (x, y, width, height); QuPath crops to it by default."""

    def as_int(key: str) -> int | None:
        try:
            value = int(float(properties[key]))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        return value if value >= 0 else None

    x = as_int("openslide.bounds-x") or 0
    y = as_int("openslide.bounds-y") or 0
    return x, y, as_int("openslide.bounds-width"), as_int("openslide.bounds-height")


def check_tiff_integrity(path: Path) -> None:
    """Refuse a truncated TIFF up front: every tile/strip must lie inside the file.

    Readers open a truncated file happily and fail later, mid-run, on the first missing tile.
    """
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    raise SlideOpenError(f"{path}: truncated file (image data runs past the end of the file)")
    except SlideOpenError:
        raise
    except Exception as exc:
        raise SlideOpenError(f"{path}: not a readable TIFF ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _reader_order(path: Path, reader: str) -> tuple[str, ...]:
    """``auto``: tiffslide first for TIFF-family files (its tiled levels decode in parallel, see
    tiff_regions), OpenSlide first for everything else (MRXS, VMS, DICOM, ...)."""
    if reader != "auto":
        return (reader,)
    if path.suffix.lower() in TIFFSLIDE_FIRST_SUFFIXES:
        return ("tiffslide", "openslide")
    return ("openslide", "tiffslide")


def dicom_entry(path: Path) -> Path:
    """A DICOM WSI folder opens through one of its ``.dcm`` files: OpenSlide takes a file and finds the rest
    of the series beside it, and refuses the folder. Anything else is returned as it is."""
    if not path.is_dir():
        return path
    instances = sorted(p for p in path.glob("*.dcm") if p.is_file())
    return instances[0] if instances else path


def largest_dicom_instance(source: Path) -> Path:
    """A DICOM file as it is; in a DICOM folder, the instance with the largest pixel matrix (the finest level)."""
    if not source.is_dir():
        return source
    import pydicom

    sizes = {}
    for path in sorted(p for p in source.glob("*.dcm") if p.is_file())[:MAX_DICOM_FILES_CHECKED]:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            sizes[path] = int(header.TotalPixelMatrixColumns) * int(header.TotalPixelMatrixRows)
        except Exception:  # not an image instance (or not DICOM): not a level
            continue
    if not sizes:
        raise SlideOpenError(f"{source}: no DICOM whole-slide image instance in this folder")
    return max(sizes, key=lambda path: sizes[path])


_WARNED_UNREAD: set[Path] = set()


def warn_unread_dicom_files(folder: Path, entry: Path) -> list[Path]:
    """The ``.dcm`` files of a DICOM folder that OpenSlide cannot open: OpenSlide leaves such a file out of
    the series without a word, so a damaged coarse level silently changes the pyramid (and the tissue mask,
    which is found on a coarse level). Each is named once per process; the list is returned."""
    import openslide

    unread = []
    for path in sorted(p for p in folder.glob("*.dcm") if p.is_file() and p != entry)[:MAX_DICOM_FILES_CHECKED]:
        try:
            openslide.OpenSlide(str(path)).close()
        except Exception as exc:  # OpenSlide raises its own and libdicom's errors
            unread.append(path)
            if path not in _WARNED_UNREAD:
                _WARNED_UNREAD.add(path)
                log.warning(
                    "%s: OpenSlide cannot read this file (%s); the slide opens without it, so a level it held is "
                    "missing (replace the file if it belongs to the slide)",
                    path,
                    _short(exc),
                )
    return unread


def _open_backend(source: Path, reader: str) -> tuple[Any, str]:
    """The first reader that opens ``source`` (a file, or a DICOM folder through one of its files)."""
    errors = []
    path = dicom_entry(source)
    order = _reader_order(path, reader)
    if reader == "auto" and path.suffix.lower() == ".dcm":
        order = ("openslide", "pydicom")  # pydicom's frames: DICOM that OpenSlide refuses (dicom_frames.py)
    for name in order:
        try:
            if name == "openslide":
                import openslide

                return openslide.OpenSlide(str(path)), name
            if name == "pydicom":
                from wsi_dala.slides.dicom_frames import DicomFramesSlide

                return DicomFramesSlide(largest_dicom_instance(source)), name
            import tiffslide

            return tiffslide.TiffSlide(str(path)), name
        except Exception as exc:  # each library raises its own family of errors
            errors.append(f"{name}: {_short(exc)}")
    raise SlideOpenError(f"{path}: not a slide that {' or '.join(order)} can read ({'; '.join(errors)})")


class Slide:
    """An open slide. Thread-safe reads: each thread gets its own handle."""

    def __init__(self, path: str | os.PathLike, reader: str = "auto", slide_mpp: float | None = None):
        path = Path(path)
        if reader not in READERS:
            raise SlideOpenError(f"{path}: unknown reader {reader!r} (choose from {', '.join(READERS)})")
        if not path.exists():
            raise SlideOpenError(f"{path}: file not found")
        if path.is_dir() and not any(path.iterdir()):
            raise SlideOpenError(f"{path}: is an empty directory, not a slide")
        if path.is_file():
            check_tiff_integrity(path)
        self.path = path  # a DICOM folder stays the slide's name (its identity covers every file in it)
        handle, self.reader = _open_backend(path, reader)
        if path.is_dir() and self.reader == "openslide":
            warn_unread_dicom_files(path, dicom_entry(path))
        self._local = threading.local()
        self._local.handle = handle
        self._handles = [handle]
        self._lock = threading.Lock()
        self.info = self._describe(handle, slide_mpp)
        # tiffslide's levels that can be decoded directly (thread-parallel); empty for OpenSlide.
        self._fast_readers = level_readers(path, handle) if self.reader == "tiffslide" else {}

    def _describe(self, handle: Any, slide_mpp: float | None) -> SlideInfo:
        props = dict(handle.properties)
        resolution = resolve_resolution(props, self.reader, slide_mpp)
        off_x, off_y, bounds_w, bounds_h = bounds_offset(props) if self.reader == "openslide" else (0, 0, None, None)
        width, height = handle.dimensions
        width = bounds_w if bounds_w else width - off_x
        height = bounds_h if bounds_h else height - off_y
        if width <= 0 or height <= 0:
            raise SlideOpenError(f"{self.path}: slide reports an empty image ({width}x{height})")
        return SlideInfo(
            path=str(self.path),
            reader=self.reader,
            vendor=props.get(f"{self.reader}.vendor") or None,
            width=int(width),
            height=int(height),
            level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            mpp_x=resolution.mpp_x if resolution else None,
            mpp_y=resolution.mpp_y if resolution else None,
            mpp_source=resolution.source if resolution else None,
            objective_power=objective_power(props, self.reader),
            bounds_offset=(off_x, off_y),
            associated_images=tuple(sorted(handle.associated_images)),
        )

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._handle().properties)

    def require_mpp(self) -> Resolution:
        """Level-0 µm/px, or a clear error saying how to supply it."""
        if self.info.mpp_x is None or self.info.mpp_y is None or self.info.mpp_source is None:
            raise ResolutionError(
                f"{self.path}: no µm/px and no objective power in the slide's metadata; "
                "give the slide's resolution with --slide-mpp"
            )
        return Resolution(self.info.mpp_x, self.info.mpp_y, self.info.mpp_source)

    def _handle(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle, _ = _open_backend(self.path, self.reader)
            self._local.handle = handle
            with self._lock:
                self._handles.append(handle)
        return handle

    def read_region(self, x_l0: int, y_l0: int, level: int, width_level_px: int, height_level_px: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] read at ``level``; its top-left is (x_l0, y_l0) in level-0 pixels of
        QuPath's frame, its size is in pixels of ``level``.

        Only the part inside the image is read; the rest is white, whichever reader is used (tiffslide
        pads with black, OpenSlide with transparent pixels).
        """
        x, y, width, height = x_l0, y_l0, width_level_px, height_level_px
        out = np.full((height, width, 3), BACKGROUND_RGB, dtype=np.uint8)
        downsample = self.info.level_downsamples[level]
        # Visible part, in pixels of this level, relative to the region's top-left.
        left = max(0, math.ceil(-x / downsample))
        top = max(0, math.ceil(-y / downsample))
        right = min(width, math.floor((self.info.width - x) / downsample))
        bottom = min(height, math.floor((self.info.height - y) / downsample))
        if right <= left or bottom <= top:
            return out
        location = (
            round(x + left * downsample) + self.info.bounds_offset[0],
            round(y + top * downsample) + self.info.bounds_offset[1],
        )
        try:
            fast = self._fast_readers.get(level)
            if fast is not None:
                level_x, level_y = int(location[0] / downsample), int(location[1] / downsample)
                right = min(right, left + fast.width - level_x)
                bottom = min(bottom, top + fast.height - level_y)
                if right <= left or bottom <= top:
                    return out
                region = fast.read(level_x, level_y, right - left, bottom - top)
            else:
                region = self._handle().read_region(location, level, (right - left, bottom - top))
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot read region at ({x}, {y}) level {level} ({_short(exc)})"
            ) from exc
        out[top:bottom, left:right] = _to_rgb_on_white(region)
        return out

    def read_downsampled(self, target_mpp: float, strip_px: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide at about ``target_mpp``, read in strips so no level is held whole.

        Returns the image and its downsample relative to level 0.
        """
        mpp0 = self.require_mpp().mpp
        wanted = max(1.0, target_mpp / mpp0)
        level = max((i for i, d in enumerate(self.info.level_downsamples) if d <= wanted * 1.01), default=0)
        level_ds = self.info.level_downsamples[level]
        factor = max(1, math.floor(wanted / level_ds + 1e-6))
        downsample = level_ds * factor
        out_w = max(1, int(self.info.width / downsample))
        out_h = max(1, int(self.info.height / downsample))
        level_w = out_w * factor
        rows = []
        strip_px = max(factor, strip_px - strip_px % factor)
        for top in range(0, out_h * factor, strip_px):
            h = min(strip_px, out_h * factor - top)
            strip = self.read_region(0, round(top * level_ds), level, level_w, h)
            rows.append(np.asarray(Image.fromarray(strip).reduce(factor)) if factor > 1 else strip)
        image = np.concatenate(rows, axis=0)[:out_h, :out_w]
        # Finish the non-integer part of the reduction on the small image (area average).
        final_w = max(1, round(self.info.width / wanted))
        final_h = max(1, round(self.info.height / wanted))
        if final_w < out_w and final_h < out_h:
            image = np.asarray(Image.fromarray(image).resize((final_w, final_h), Image.Resampling.BOX))
            return image, self.info.width / final_w
        return image, downsample

    def close(self) -> None:
        with self._lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()
            for reader in self._fast_readers.values():
                reader.close()
            self._fast_readers = {}

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_rgb_on_white(region: Any) -> np.ndarray:
    """PIL RGBA (OpenSlide, not premultiplied) or RGB (tiffslide) → RGB uint8 composited on white."""
    array = np.asarray(region)
    if array.ndim == 3 and array.shape[2] == 4:
        rgb = array[..., :3]
        alpha = array[..., 3:4]
        if alpha.min() == 255:
            return rgb
        blended = rgb.astype(np.uint16) * alpha + BACKGROUND_RGB * (255 - alpha.astype(np.uint16))
        return (blended // 255).astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return array[..., :3]
