"""Which file names are slides: one list, used by the reader, the archive search and output naming."""

from __future__ import annotations

# Everything openslide or tiffslide opens as a single file (DICOM slides are folders, found separately).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".qptiff"}
)
# TIFF containers: their tile offsets can be checked against the file size before any read.
TIFF_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff"})
# Tiled TIFFs whose JPEG tiles tiffslide decodes in parallel: read with tiffslide first under ``auto``.
TIFFSLIDE_FIRST_SUFFIXES = frozenset({".svs", ".tif", ".tiff"})
# Compression suffixes that may follow a slide suffix (``case.tiff.gz`` is still named ``case``).
WRAPPER_SUFFIXES = frozenset({".gz"})
