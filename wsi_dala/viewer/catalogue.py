"""Which runs the viewer serves: the complete runs in a run folder or below a batch output, each under an id
made from its folder's name, with its slide checked against the fingerprint the run recorded.

Nothing a request names is joined to a path: a request names a run id, looked up in this catalogue, and the
files of that run are the names its ``run.json`` lists, inside its folder. A slide is served only when it is
the file the run read (same fingerprint); a folder that holds no finished run is refused by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_dala.core.errors import OutputError
from wsi_dala.core.identity import slide_fingerprint
from wsi_dala.core.layout import RUN_FORMAT, RunLayout

SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RunEntry:
    run_id: str
    folder: Path
    record: dict[str, Any]

    @property
    def tiles_store(self) -> Path:
        return RunLayout(self.folder).tiles_store

    @property
    def slide_path(self) -> Path:
        return Path(str(self.record.get("slide", {}).get("path", "")))

    def output(self, name: str) -> Path | None:
        """A file the run lists in its outputs, by its key (``tumour_geojson``), inside the run folder only."""
        listed = self.record.get("outputs", {}).get(name)
        if not isinstance(listed, str):
            return None
        path = self.folder / Path(listed).name  # the name only: never a path read from a file
        return path if path.exists() else None

    def slide_problem(self) -> str | None:
        """Why the slide cannot be served (None: it can): missing, or not the file the run read."""
        path = self.slide_path
        if not path.exists():
            return f"{path}: the slide of run {self.run_id} is not there any more"
        recorded = {k: v for k, v in self.record.get("slide", {}).items() if k != "path"}
        if slide_fingerprint(path) != recorded:
            return f"{path}: not the file run {self.run_id} read (it changed since)"
        return None


def _complete(run_json: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("status") == "complete" and record.get("format") == RUN_FORMAT:
        return record
    return None


def find_runs(root: str | Path) -> dict[str, RunEntry]:
    """The finished runs in ``root`` (a run folder) or one level below it (a batch output), by id."""
    root = Path(root)
    if not root.is_dir():
        raise OutputError(f"{root}: no such folder (give a run folder or a batch output)")
    name = RunLayout(root).run_json.name
    candidates = [root / name] if (root / name).is_file() else sorted(root.glob(f"*/{name}"))
    runs: dict[str, RunEntry] = {}
    for run_json in candidates:
        record = _complete(run_json)
        if record is None:
            continue
        run_id = SAFE_ID.sub("-", run_json.parent.name).strip("-.") or "run"
        while run_id in runs:
            run_id += "-"
        runs[run_id] = RunEntry(run_id, run_json.parent, record)
    if not runs:
        unfinished = " (its run.json is not of a finished run)" if (root / name).is_file() else ""
        raise OutputError(f"{root}: holds no finished wsi-dala run{unfinished}; give a run folder or a batch output")
    return runs
