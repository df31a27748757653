"""Wall and CPU seconds spent in each named step of a run, summed over threads: what
``benchmarks/profile_run.py`` prints.

Ours, not cProfile's: cProfile sees one thread, while the tiler's reads and the scorer run in several, and a
step here is what a person asks about ("region reads", "engine"), not a function. Off by default: a step then
costs one global read. CPU seconds are the thread's own (``time.thread_time``), so a step that waits (on a
queue, on a lock, on another thread's work) shows wall time without CPU time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_enabled = False
_lock = threading.Lock()
_totals: dict[str, StepTotal] = {}


@dataclass
class StepTotal:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    calls: int = 0
    items: int = 0  # tiles (or other units) the step handled, when the caller says
    first_started: float = float("inf")  # time.perf_counter() when the step first began


@contextmanager
def step(name: str, items: int = 0) -> Iterator[None]:
    """Count the block's wall and CPU seconds under ``name`` (when recording)."""
    if not _enabled:
        yield
        return
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        spent_wall, spent_cpu = time.perf_counter() - wall, time.thread_time() - cpu
        with _lock:
            total = _totals.setdefault(name, StepTotal())
            total.wall_s += spent_wall
            total.cpu_s += spent_cpu
            total.calls += 1
            total.items += items
            total.first_started = min(total.first_started, wall)


@contextmanager
def recording() -> Iterator[dict[str, StepTotal]]:
    """Record every step of the block; the dict yielded holds the totals once the block ends."""
    global _enabled
    result: dict[str, StepTotal] = {}
    with _lock:
        _totals.clear()
        _enabled = True
    try:
        yield result
    finally:
        with _lock:
            _enabled = False
            result.update(_totals)
            _totals.clear()
