"""``heatmap.ome.zarr``: the heatmap as an OME-NGFF 0.5 multiscale image, for napari and other NGFF viewers.

One image with axes ``c, y, x``: a channel per layer (tumour, probability, QC-flagged share, and the
probability's SD when measured; their names are in ``wsi_dala.channels``), space in micrometres. Each
level halves the one above (NaN-aware 2 x 2 means, the same pyramid as ``heatmap.zarr``); its scale
is the cell size in µm and its translation puts each pixel's centre where the cell's centre lies in the
slide, measured from the slide's top-left corner. NaN stays NaN (no tissue, no value) and is also the
arrays' fill value.

The multiscales metadata and the array metadata are made by ``ome-zarr-models`` (``Image.new`` and
``to_zarr``), not written by hand; the data is written into the arrays it created, a layer and a
level at a time (no stacked copy of the map), under a temporary name and then renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from wsi_dala.core.layout import building_path
from wsi_dala.outputs.heatmap import Heatmap, _halve

CHUNK_PX = 512


def pyramid_shapes(shape: tuple[int, int], min_level_px: int) -> list[tuple[int, int]]:
    """Level shapes, as ``write_heatmap`` makes them: halve (rounding up) while the longest side is at
    least twice ``min_level_px``."""
    shapes = [shape]
    while max(shapes[-1]) >= 2 * min_level_px:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_heatmap_ngff(heatmap: Heatmap, path: str | Path, min_level_px: int) -> None:
    """Write ``heatmap`` as an OME-NGFF 0.5 image at ``path`` (replacing what is there)."""
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image
    from pydantic_zarr.v3 import ArraySpec

    path = Path(path)
    layers = heatmap.layers
    names = list(layers)
    shapes = pyramid_shapes(heatmap.probability.shape, min_level_px)
    specs = []
    for h, w in shapes:
        template = np.empty((len(names), h, w), dtype=np.float32)  # shape and type only: never touched
        specs.append(
            ArraySpec.from_array(
                template,
                chunk_grid={
                    "name": "regular",
                    "configuration": {"chunk_shape": [1, min(CHUNK_PX, max(1, h)), min(CHUNK_PX, max(1, w))]},
                },
                fill_value="NaN",
                dimension_names=["c", "y", "x"],
                attributes={},
            )
        )
    cell_um = [heatmap.cell_mpp * 2**level for level in range(len(shapes))]
    image = Image.new(
        array_specs=specs,
        paths=[str(level) for level in range(len(shapes))],
        axes=[
            Axis(name="c", type="channel"),
            Axis(name="y", type="space", unit="micrometer"),
            Axis(name="x", type="space", unit="micrometer"),
        ],
        scales=[[1.0, size, size] for size in cell_um],
        translations=[[0.0, size / 2, size / 2] for size in cell_um],
        name="wsi-dala heatmap",
    )
    tmp = building_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    store = zarr.storage.LocalStore(str(tmp))
    group = image.to_zarr(store, path="")
    for channel, name in enumerate(names):
        layer = layers[name]
        for level in range(len(shapes)):
            array = group[str(level)]
            assert isinstance(array, zarr.Array)
            array[channel] = layer
            if level + 1 < len(shapes):
                layer = _halve(layer)
    group.update_attributes({"wsi_dala": {"channels": names, "no_value": "NaN where no tile was scored"}})
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
