"""A foundation model's weights from its own Hugging Face repository (``--weights hub``), into the hub's
cache through ``huggingface_hub`` (a gated repository uses the user's token, ``hf auth login``); offline, one
line names the file and the cache folder to fill. The commit is recorded in the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_dala.interop.model_hub import download_file
from wsi_dala.model.foundation_presets import FoundationPreset


def fetch_foundation_weights(preset: FoundationPreset, revision: str = "main") -> tuple[Path, dict[str, Any]]:
    """(the weights file in the Hugging Face cache, where it came from: repository, commit, file, licence)."""
    hint = f"`hf download {preset.hf_repo} {preset.weights_file}`"
    path = download_file(preset.hf_repo, preset.weights_file, revision, "model", f"--arch {preset.name}", hint)
    origin = {
        "hf_repo": preset.hf_repo,
        "hf_revision": path.parent.name,  # .../models--ORG--REPO/snapshots/<commit>/<file>
        "file": preset.weights_file,
        "licence": preset.licence,
        "gated": preset.gated,
    }
    return path, origin
