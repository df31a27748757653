"""One lock for an output folder, shared by `run` and `batch`: who holds it, and when it is stale.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) and holds
host, pid and time. It is stale when its process is gone (same host) or older than ``stale_after_s``
(another host, whose processes we cannot see). A stale lock is renamed before it is removed, so of two
processes clearing it only one succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
UNFILLED_GRACE_S = 5.0  # a lock file created but still empty is being written by its owner this instant


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    since: float  # seconds since the epoch

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S") if self.since else "unknown"
        return f"pid {self.pid} on host {self.host} since {started}"

    @classmethod
    def read(cls, path: Path) -> LockHolder | None:
        """The holder written in ``path``; None if the file is gone. An empty file is a holder being born."""
        try:
            text = path.read_text()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info: dict[str, Any] = json.loads(text) if text else {}
            return cls(str(info["host"]), int(info["pid"]), float(info["time"]))
        except (ValueError, KeyError, TypeError):
            # Created but not filled: its owner is writing it now, or died right then.
            return cls("unknown", -1, time.time() - age if age < UNFILLED_GRACE_S else 0.0)

    def is_stale(self, stale_after_s: float) -> bool:
        if self.host == socket.gethostname():
            return not pid_alive(self.pid)
        return time.time() - self.since > stale_after_s


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but not been reaped by its parent still answers kill(0); it holds nothing.
    (Linux's /proc only; elsewhere a zombie counts as alive until reaped.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def _clear_stale(path: Path, holder: LockHolder) -> None:
    log.warning("%s: clearing stale lock of %s", path, holder.describe())
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
        os.unlink(aside)
    except FileNotFoundError:
        pass


@contextmanager
def exclusive_lock(path: Path, stale_after_s: float) -> Iterator[LockHolder | None]:
    """Yields None while this process holds the lock at ``path``; otherwise the holder, at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = LockHolder.read(path)
            if holder is None:
                continue  # released between our two calls: try again
            if holder.is_stale(stale_after_s):
                _clear_stale(path, holder)
                continue
            yield holder
            return
        with os.fdopen(fd, "w") as handle:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, handle)
            handle.flush()
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)
        return
    yield LockHolder.read(path) or LockHolder("unknown", -1, 0.0)
