"""Atomic file writes: a crash never leaves a half-written file that looks complete."""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from wsi_dala.core.errors import OutputError
from wsi_dala.core.layout import PARTIAL_SUFFIX, partial_prefix, remove_stale_partials

log = logging.getLogger(__name__)


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new hidden file beside ``path``, created with mode 0o666 so the process umask applies (outputs
    are for sharing; ``mkstemp`` would make them 0600, and reading the umask means changing it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f"{partial_prefix(path)}{os.getpid()}-{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename:
            raise
        # Disk full, quota, I/O error: the OS names no file, so we do.
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``; empty when the file is missing, unreadable, not JSON or not an object
    (state and cache files: a damaged one is started afresh, never trusted)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON (strict: NaN is refused) atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, allow_nan=False, default=str)
        handle.write("\n")


def save_png_atomic(path: str | os.PathLike[str], image: Any) -> None:
    """Save a PIL image as PNG atomically."""
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove we can write into it, before any work starts; remove the partial
    files a killed writer left there (a kill -9 cannot clean up after itself: the next run does)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{path}: output directory cannot be written ({reason})") from exc
    removed = remove_stale_partials(path)
    if removed:
        log.info("%s: removed %d unfinished file(s) a killed writer left", path, removed)
    return path


@contextmanager
def naming_failures(path: str | os.PathLike[str]) -> Iterator[None]:
    """Disk full, quota or I/O errors while writing ``path`` (a store, a folder of files) name ``path``: the
    OS names no file, and a bare "No space left on device" does not say where."""
    try:
        yield
    except OSError as exc:
        if exc.filename:
            raise
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from exc


def require_free_space(folder: str | os.PathLike[str], needed_bytes: int, what: str) -> None:
    """Refuse, in one line naming ``folder``, to start writing ``what`` where it cannot fit: some writers
    (TorchScript's) abort the whole process on a full disk instead of raising."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OutputError(
            f"{folder}: not enough free space for {what} (about {needed_bytes / 1e6:.0f} MB needed, "
            f"{free / 1e6:.0f} MB free)"
        )


STORE_WRITES_SETTLE_S = 10.0  # at most this long for zarr's writes in flight to finish after an interrupt


def settle_store_writes(timeout_s: float = STORE_WRITES_SETTLE_S) -> None:
    """Wait for the Zarr writes still in flight. zarr runs its I/O on an event loop in a thread of its own;
    when an interrupt (SIGTERM's handler in a batch, Ctrl-C) lands in the thread waiting on a write, the write
    goes on there, and would recreate a half-built store just after it was removed."""
    import asyncio

    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def the_others_finished() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    try:
        asyncio.run_coroutine_threadsafe(the_others_finished(), loop).result(timeout_s + 1.0)
    except Exception as exc:  # cleaning up after an interrupt: never raise over it
        log.debug("zarr writes did not settle: %s", exc)
