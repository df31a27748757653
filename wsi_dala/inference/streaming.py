"""Scoring overlapped with tiling: chunks are scored as the tiler writes them.

The tiler calls :meth:`StreamingScorer.chunk_written` after each chunk is durably written; the first
call (in the tiler's thread, so no store attribute is written by two threads at once) chooses the
engine on that chunk's tiles and prepares the score arrays, then each chunk index goes through a
bounded queue to one scoring thread, which runs it as a Dask task on the local threaded scheduler.
When the queue is full the tiler waits: it never runs more than ``QUEUE_CHUNKS`` chunks ahead. After
tiling, ``score_store`` with the same setup scores whatever is left (chunks tiled by an earlier run,
chunks the scorer had not reached) and marks the scores complete — so a kill -9 at any point resumes
exactly as the sequential path does: a chunk counts as scored only after its rows are written.

Not used (the sequential path runs instead) where scoring needs the finished store: stain
normalisation (the slide's stain is measured over all its tiles), int8 calibrated on the slide's own
tiles (spread over the whole slide), and a ``dask.distributed`` cluster (which gets every chunk at once).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from types import TracebackType
from typing import TYPE_CHECKING

import dask
import numpy as np
from tqdm import tqdm

from wsi_dala.core.config import ScoringConfig
from wsi_dala.core.step_times import step
from wsi_dala.model.card import KnownCheckpoint
from wsi_dala.tiling.store import TileStore

if TYPE_CHECKING:
    from wsi_dala.inference.scoring import ScoringSetup

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 4
_DONE = -1


def can_overlap(config: ScoringConfig, client: object | None) -> bool:
    """Whether scoring may start before tiling ends (see the module docstring for why not)."""
    slide_int8 = config.precision == "int8" and config.int8_calibration is None
    return (
        config.overlap_tiling
        and config.stain_normalise == "none"
        and not slide_int8
        and not (client is not None or config.scheduler)
    )


class StreamingScorer:
    """Scores chunks in a background thread while the tiler writes the next ones."""

    def __init__(
        self,
        store_path: str,
        checkpoint: str,
        config: ScoringConfig,
        progress: bool = True,
        known: KnownCheckpoint | None = None,
    ) -> None:
        self.store_path, self.checkpoint, self.config, self.progress = store_path, checkpoint, config, progress
        self.known = known
        self.setup: ScoringSetup | None = None
        self._queue: queue.Queue[int] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.scored_chunks = 0

    def chunk_written(self, index: int) -> None:
        """The tiler's callback (its thread): start on the first chunk, then hand each chunk over."""
        if self._error is not None:
            raise self._error  # stop tiling: scoring failed (the same error would end the run anyway)
        if self._thread is None:
            self._start(index)
        while not self._stop.is_set():
            try:
                self._queue.put(index, timeout=0.5)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error from None

    def _start(self, first_chunk: int) -> None:
        from wsi_dala.inference.scoring import setup_scoring  # torch: imported late, a run reads tiles first

        store = TileStore(self.store_path, mode="r+")
        rows = store.info.chunk_rows()[first_chunk]
        sample = np.arange(rows.start, rows.stop)
        with step("scoring: setup (engine export, check and choice)"):
            self.setup = setup_scoring(store, self.checkpoint, self.config, sample, complete=False, known=self.known)
        self._done = store.prepare_scores(self.setup.n_classes, self.setup.grid, scoring_key=self.setup.key)
        # Chunks tiled by an earlier run are never announced: queue them too (the thread skips scored ones).
        self._earlier = [i for i, tiled in enumerate(store.tile_chunks_done()) if tiled and i != first_chunk]
        self._thread = threading.Thread(target=self._work, name="wsi-dala-scoring", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        from wsi_dala.inference.scoring import chunk_tasks

        assert self.setup is not None
        store = TileStore(self.store_path, mode="r+")
        tasks = None
        bar = tqdm(unit="chunk", desc="scoring (overlapped)", disable=not self.progress, leave=False, position=1)
        try:
            pending = list(self._earlier)
            while not self._stop.is_set():
                index = pending.pop() if pending else self._queue.get()
                if index == _DONE:
                    return
                if self._done[index]:
                    continue
                if tasks is None:  # one graph over every chunk, built once; each task computed as it comes
                    tasks = chunk_tasks(store, list(range(len(self._done))), self.setup, self.config.batch_size)
                with step("scoring: chunk tasks overlapped with tiling (reads, Dask, model, writes)"):
                    (finished,) = dask.compute(tasks[index], scheduler="threads", num_workers=1)
                store.mark_score_chunk_done(finished, self._done)
                self.scored_chunks += 1
                bar.update(1)
        except BaseException as exc:  # handed to the tiler's thread, which raises it
            self._error = exc
            log.debug("overlapped scoring stopped: %s", exc)
        finally:
            bar.close()

    def finish(self) -> ScoringSetup | None:
        """Wait for the queued chunks; re-raise a scoring error; the setup for the final pass (None if
        no chunk was ever written in this run)."""
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.setup

    def abort(self) -> None:
        """Tiling failed: stop after the chunk in hand (its rows are written before it counts as done)."""
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # full: the thread sees the stop flag after its chunk
                self._queue.put_nowait(_DONE)
            self._thread.join()

    def __enter__(self) -> StreamingScorer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            self.abort()
