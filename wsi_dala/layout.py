"""Every path a run writes, in one typed object, so no two modules disagree on a file name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def safe_stem(name: str) -> str:
    """A file-name-safe stem from a slide's name (never trust names from inputs)."""
    stem = Path(name).name
    for suffix in (".gz", ".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".qptiff"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or "slide"


@dataclass(frozen=True)
class RunLayout:
    """The output folder of one slide's run."""

    root: Path
    slide_stem: str = "slide"

    @classmethod
    def for_slide(cls, root: str | Path, slide_path: str | Path) -> RunLayout:
        return cls(Path(root), safe_stem(str(slide_path)))

    @property
    def tiles_store(self) -> Path:
        return self.root / "tiles.zarr"

    @property
    def tissue_mask_png(self) -> Path:
        return self.root / "tissue_mask.png"

    @property
    def thumbnail_png(self) -> Path:
        return self.root / "thumbnail.png"

    @property
    def heatmap_store(self) -> Path:
        return self.root / "heatmap.zarr"

    @property
    def overview_png(self) -> Path:
        return self.root / "overview.png"

    @property
    def overlay_png(self) -> Path:
        return self.root / "overlay.png"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def tiles_geojson(self, gzip: bool = False) -> Path:
        return self.root / f"{self.slide_stem}.tiles.geojson{'.gz' if gzip else ''}"

    def tumour_geojson(self, gzip: bool = False) -> Path:
        return self.root / f"{self.slide_stem}.tumour.geojson{'.gz' if gzip else ''}"
