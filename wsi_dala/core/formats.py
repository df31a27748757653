"""Which file names are slides: one list, used by the reader, the archive search and output naming."""

from __future__ import annotations

from pathlib import Path

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


def slide_argument(text: str) -> str:
    """A slide as the command line names it. Any ``.dcm`` file of a DICOM WSI stands for its folder: the
    series is the slide (one name, one run folder, one fingerprint over every instance, whichever file
    was given). Everything else is returned as it is."""
    path = Path(text)
    return str(path.parent) if path.suffix.lower() == ".dcm" and path.is_file() else text
