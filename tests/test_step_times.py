"""Step timing for benchmarks/profile_run.py: wall and CPU seconds per named step, over threads."""

from __future__ import annotations

import threading
import time

from wsi_dala.core import step_times
from wsi_dala.core.step_times import recording, step


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_steps_sum_wall_and_own_cpu_over_threads_and_count_items():
    with recording() as steps:
        workers = [threading.Thread(target=lambda: _step_in_thread("busy", 0.05)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        with step("waits", items=7):
            time.sleep(0.05)
    busy, waits = steps["busy"], steps["waits"]
    assert busy.calls == 2 and busy.cpu_s >= 0.09 and busy.wall_s >= busy.cpu_s * 0.9
    assert waits.calls == 1 and waits.items == 7 and waits.wall_s >= 0.045 and waits.cpu_s < 0.02
    assert waits.first_started > busy.first_started


def _step_in_thread(name: str, seconds: float) -> None:
    with step(name, items=1):
        _busy(seconds)


def test_nothing_is_recorded_outside_a_recording():
    with step("unrecorded"):
        pass
    assert not step_times._enabled and "unrecorded" not in step_times._totals
    with recording() as steps:
        pass
    assert steps == {}
