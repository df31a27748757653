"""The slide as Deep Zoom tiles, through OpenSlide's ``DeepZoomGenerator`` on the reader the run used
(openslide-python, or tiffslide, which offers the same interface).

Only the slide's pyramid is served: never its associated images (label, macro), which carry patient data.
``limit_bounds`` keeps the frame the run's coordinates use (OpenSlide's bounds, QuPath's frame). A handle
per thread: the web server answers tiles from several threads at once.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from wsi_dala.core.errors import SlideOpenError
from wsi_dala.slides.reader import dicom_entry, largest_dicom_instance

TILE_PX, OVERLAP_PX, JPEG_QUALITY = 254, 1, 80


class _WithAlpha:
    """tiffslide's slide with OpenSlide's ``read_region`` contract (RGBA), which ``DeepZoomGenerator`` needs."""

    def __init__(self, slide: Any):
        self._slide = slide

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slide, name)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        return self._slide.read_region(location, level, size).convert("RGBA")


class DeepZoomSlide:
    def __init__(self, path: Path, reader: str):
        self.path, self.reader = path, reader
        self._local = threading.local()
        self.dzi = self.generator().get_dzi("jpeg")

    def generator(self) -> Any:
        """This thread's ``DeepZoomGenerator`` (each thread opens the slide once)."""
        generator = getattr(self._local, "generator", None)
        if generator is None:
            from openslide.deepzoom import DeepZoomGenerator

            handle: Any
            try:
                if self.reader == "openslide":
                    import openslide

                    handle = openslide.OpenSlide(str(dicom_entry(self.path)))
                elif self.reader == "pydicom":
                    from wsi_dala.slides.dicom_frames import DicomFramesSlide

                    handle = DicomFramesSlide(largest_dicom_instance(self.path))
                else:
                    import tiffslide

                    handle = _WithAlpha(tiffslide.TiffSlide(str(self.path)))
            except Exception as exc:  # each library raises its own errors
                raise SlideOpenError(f"{self.path}: cannot open the slide ({exc})") from exc
            generator = DeepZoomGenerator(handle, TILE_PX, OVERLAP_PX, limit_bounds=True)
            self._local.generator = generator
        return generator

    @property
    def level_count(self) -> int:
        return int(self.generator().level_count)

    def tile_jpeg(self, level: int, column: int, row: int) -> bytes | None:
        """One tile as JPEG; None when the address is outside the pyramid."""
        generator = self.generator()
        if not 0 <= level < generator.level_count:
            return None
        columns, rows = generator.level_tiles[level]
        if not (0 <= column < columns and 0 <= row < rows):
            return None
        image = generator.get_tile(level, (column, row)).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()
