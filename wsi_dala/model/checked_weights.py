"""Which checkpoints' weights have loaded strictly into their architecture before, by content hash.

A run checks a new checkpoint's weights before it touches its output folder, which needs torch (seconds
to import). A checkpoint whose bytes loaded before under this version of wsi-dala cannot fail that
check, so its run starts reading tiles at once and loads the model in the background
(``wsi_dala.runs.model_preparation``). Torch-free; a record is a small JSON file named by the hash.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from wsi_dala import __version__
from wsi_dala.core.fileio import write_json_atomic
from wsi_dala.core.layout import checked_weights_record
from wsi_dala.model.card import KnownCheckpoint


def record_path(known: KnownCheckpoint) -> Path:
    return checked_weights_record(known.sha256)


def _expected(known: KnownCheckpoint) -> dict[str, str]:
    return {"wsi_dala": __version__, "architecture": known.card.architecture}


def checked_before(known: KnownCheckpoint) -> bool:
    """Whether these exact bytes loaded strictly into their architecture under this wsi-dala version."""
    try:
        return json.loads(record_path(known).read_text()) == _expected(known)
    except (OSError, ValueError):
        return False


def record_checked(known: KnownCheckpoint, path: Path | None = None) -> None:
    """Remember a strict load (best effort: an unwritable cache only means the next run checks again).
    ``path``: the record's place as the run saw it when it started (a load finishing later writes there)."""
    path = path or record_path(known)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, _expected(known))
