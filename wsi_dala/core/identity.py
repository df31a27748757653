"""Stable identities: of a slide file (so a changed slide is re-run) and of a configuration."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

HEADER_BYTES = 1 << 20  # the TIFF header and first directories live here; hashing it is cheap


def slide_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size, modification time and a hash of the first MiB (and, for folders, of the file list)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    size, mtime = 0, 0
    for file in files:
        stat = file.stat()
        size += stat.st_size
        mtime = max(mtime, stat.st_mtime_ns)
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:{stat.st_size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(HEADER_BYTES))
    return {"size": size, "mtime_ns": mtime, "header_sha256": digest.hexdigest()}


def config_hash(config: Any) -> str:
    """A short hash of a JSON-able configuration (keys sorted, so order never matters)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a whole file (checkpoints: a changed model re-scores)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
