"""The tile geometry a WSInfer ``config.json`` implies (the network's input size and µm/px), without torch:
``wsi-dala models`` reads it from cached configs, the import builds the model card from it."""

from __future__ import annotations

from pathlib import Path

from wsi_dala.core.errors import CheckpointError


def network_mpp(config: dict, source: Path) -> float:
    """The µm/px of what the network sees: the patch's spacing scaled by patch size / input size."""
    return float(config["spacing_um_px"]) * int(config["patch_size_pixels"]) / input_size(config, source)


def input_size(config: dict, source: Path) -> int:
    """The network's input side: the ``Resize`` step's size, else the patch size."""
    size = int(config["patch_size_pixels"])
    for step in config["transform"]:
        if step.get("name") == "Resize":
            value = (step.get("arguments") or {}).get("size")
            value = value[0] if isinstance(value, list) and value else value
            if not (isinstance(value, int) and value > 0):
                raise CheckpointError(f"{source}: Resize needs a positive whole-number size, not {value!r}")
            size = value
    return size
