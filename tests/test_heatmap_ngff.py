"""heatmap.ome.zarr: a valid OME-NGFF 0.5 image (checked by ome-zarr-models) with the heatmap's values,
its physical scale in micrometres and NaN where there is no tissue."""

from __future__ import annotations

import numpy as np
import zarr

from wsi_dala.core.config import PipelineConfig, ScoringConfig, TilingConfig
from wsi_dala.outputs.ngff import pyramid_shapes
from wsi_dala.runs.pipeline import run_slide


def test_the_run_writes_a_valid_ngff_heatmap_with_its_scale_and_values(svs_025, colour_checkpoint, tmp_path):
    from ome_zarr_models.v05.image import Image

    config = PipelineConfig(
        model=str(colour_checkpoint),
        tiling=TilingConfig(chunk_tiles=16),
        scoring=ScoringConfig(backend="torch", precision="fp32"),
    )
    summary = run_slide(svs_025.path, tmp_path, config, progress=False)
    path = summary.layout.heatmap_ngff
    assert summary.record.outputs["heatmap_ngff"] == path.name  # run.json names outputs relative to the folder
    group = zarr.open_group(path, mode="r")
    image = Image.from_zarr(group)  # raises unless the metadata and the arrays agree with NGFF 0.5
    multiscale = image.ome_attributes.multiscales[0]
    assert [(a.name, a.type, a.unit) for a in multiscale.axes] == [
        ("c", "channel", None),
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    private = zarr.open_group(summary.layout.heatmap_store, mode="r")
    cell_um = float(private.attrs["cell_mpp"])
    names = group.attrs["wsi_dala"]["channels"]
    assert names[:3] == ["probability", "tumour", "qc_flagged"]
    levels = [d.path for d in multiscale.datasets]
    assert len(levels) == len(pyramid_shapes(private["tumour/0"].shape, config.heatmap.min_level_px)) >= 1
    for level, dataset in enumerate(multiscale.datasets):
        scale, translation = (t.model_dump() for t in dataset.coordinateTransformations)
        size = cell_um * 2**level
        np.testing.assert_allclose(scale["scale"], [1, size, size])
        np.testing.assert_allclose(translation["translation"], [0, size / 2, size / 2])  # cell centres
        stored = np.asarray(group[dataset.path][:])
        for channel, name in enumerate(names):
            np.testing.assert_array_equal(stored[channel], np.asarray(private[f"{name}/{level}"][:]))
    tumour = np.asarray(group["0"][names.index("tumour")])
    assert np.isnan(tumour).any() and np.isfinite(tumour).any()  # glass has no value, tissue has one
