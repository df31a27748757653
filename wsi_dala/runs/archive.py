"""Batch runs over a slide archive: find slides, skip what is done, isolate failures, report.

- Slides are found recursively (files openslide/tiffslide read, and DICOM folders). Each gets a stable
  id from its path relative to the archive root: readable name + a short hash, so two folders holding
  ``slide.svs`` never collide.
- Skipping is the pipeline's own: a completed ``run.json`` with the same key (slide fingerprint,
  settings, model hash) means nothing to do; a changed slide, model or setting re-runs; a slide cut off
  mid-way resumes from its stored chunks.
- A per-slide lock (``O_CREAT | O_EXCL``, holding host, pid and time) keeps two batches off one slide;
  a lock whose process is dead (same host) is stale and cleared.
- Failures are recorded with their error and the batch goes on; errors that are the input's fault
  (corrupt, unreadable, no µm/px) are not retried, others are, up to ``retries`` times.
- Per-slide state (``state.json``) and a batch summary (``batch.json``, ``report.md``) are written
  atomically. The exit code is non-zero when any slide failed.
- With a Dask cluster (``scheduler`` address, or ``workers`` > 1 for a local one), slides are the unit
  of work, one task per slide.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wsi_dala.core.config import BatchConfig, PipelineConfig
from wsi_dala.core.errors import QualityError, ResolutionError, SlideOpenError, SlideReadError, WsiDalaError
from wsi_dala.core.fileio import ensure_writable_dir, read_json_object, write_json_atomic
from wsi_dala.core.formats import SLIDE_SUFFIXES
from wsi_dala.core.identity import slide_fingerprint
from wsi_dala.core.layout import BatchLayout, BatchSlideLayout, safe_stem
from wsi_dala.core.locks import exclusive_lock
from wsi_dala.outputs.slide_answer import quality_notes
from wsi_dala.runs.batch_report import write_reports

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    slide_id: str
    path: str
    status: str  # done | skipped | failed | locked | not run
    attempts: int = 0
    seconds: float = 0.0
    tiles: int = 0
    error: str | None = None
    output: str = ""
    started: str = ""
    runs: int = 0  # how many times this slide was actually processed, over all batches
    quality: list[str] = field(default_factory=list)  # QC and stain findings worth a look ("12 % ... out of focus")
    aliases: list[str] = field(default_factory=list)  # other names (links) of the same file, not run again
    answer: dict[str, Any] = field(default_factory=dict)  # the run's slide answer (tumour burden, call, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchResult:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False  # SIGTERM stopped it; slides not reached are "not run"

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        return counts


def find_slides(root: str | Path, pattern: str = "*") -> list[Path]:
    """Slide files (by suffix) and DICOM folders (a folder of .dcm files), sorted, below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise WsiDalaError(f"{root}: archive folder not found")
    found = []
    for path in sorted(root.rglob(pattern)):
        if path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith("."):
            found.append(path)
    for folder in sorted({p.parent for p in root.rglob("*.dcm")}):
        if folder.match(pattern) or pattern == "*":
            found.append(folder)
    return found


def slide_id(root: Path, path: Path) -> str:
    """Stable and unique within the archive: the name plus a hash of the path relative to the root. The path
    as found, not resolved: a symbolic link to a file outside the archive is named by its link."""
    relative = Path(os.path.relpath(path.absolute(), root.absolute())).as_posix()
    return f"{safe_stem(path.name)}-{hashlib.sha256(relative.encode()).hexdigest()[:8]}"


def unique_slides(slides: list[Path]) -> tuple[list[Path], dict[Path, list[Path]]]:
    """The slides with each file once (the first of its names in sorted order, where links or copies of a
    folder reach the same file twice), and the other names of each kept slide."""
    kept: list[Path] = []
    first: dict[Path, Path] = {}
    aliases: dict[Path, list[Path]] = {}
    for path in sorted(slides):
        try:
            target = path.resolve()
        except OSError:  # a link loop: keep it, and let the run say what is wrong with it
            target = path.absolute()
        if target in first:
            aliases.setdefault(first[target], []).append(path)
            continue
        first[target] = path
        kept.append(path)
    return kept, aliases


# ---------------------------------------------------------------- locks


@contextmanager
def slide_lock(folder: BatchSlideLayout, stale_after_s: float) -> Iterator[bool]:
    """Yields True when this process holds the slide's lock, False when someone else does."""
    with exclusive_lock(folder.lock, stale_after_s) as holder:
        yield holder is None


# ---------------------------------------------------------------- one slide


def _transient(exc: BaseException) -> bool:
    """Errors of the slide file itself (corrupt, unreadable, no µm/px, no usable tissue) fail again: don't
    retry them.

    Everything else (output problems, a crash artefact, an overloaded machine) may pass on a retry;
    settings and model errors are caught before the batch starts.
    """
    return not isinstance(exc, (SlideOpenError, SlideReadError, ResolutionError, QualityError))


def process_slide(
    path: str, sid: str, out_root: str, config: PipelineConfig, batch: BatchConfig, progress: bool = False
) -> dict[str, Any]:
    """Run one slide under its lock, with retries; record its state. Runs in a worker when distributed."""
    from wsi_dala.runs.pipeline import run_slide

    folder = BatchLayout(Path(out_root)).slide(sid)
    state_path = folder.state_json
    previous = read_json_object(state_path)
    outcome = SlideOutcome(
        sid,
        path,
        "failed",
        output=str(folder.root),
        runs=int(previous.get("runs", 0)),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with slide_lock(folder, batch.stale_lock_s) as held:
        if not held:
            outcome.status = "locked"
            return outcome.to_dict()
        fingerprint = slide_fingerprint(path) if Path(path).exists() else {}
        unchanged = previous.get("fingerprint") == fingerprint
        if previous.get("status") == "failed" and previous.get("permanent") and unchanged:
            # The same bad file fails the same way: report it again without doing the work again.
            outcome.error, outcome.attempts = previous.get("error"), 0
            return {**outcome.to_dict()}
        started = time.perf_counter()
        permanent = False
        for attempt in range(1, batch.retries + 2):
            outcome.attempts = attempt
            try:
                summary = run_slide(path, folder.root, config, progress=progress)
            except Exception as exc:  # isolate the slide: record and go on
                outcome.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                log.warning("%s: attempt %d failed: %s", path, attempt, outcome.error)
                log.debug("%s", traceback.format_exc())
                permanent = not _transient(exc)
                if permanent:
                    break
                continue
            outcome.status = "skipped" if summary.skipped else "done"
            outcome.tiles = summary.record.counts.tiles
            outcome.quality = quality_notes(summary.record.qc, summary.record.stain)
            outcome.answer = summary.record.slide_answer
            outcome.error = None
            if not summary.skipped:
                outcome.runs += 1
            break
        outcome.seconds = round(time.perf_counter() - started, 3)
        permanent = permanent and outcome.status == "failed"
        write_json_atomic(state_path, {**outcome.to_dict(), "fingerprint": fingerprint, "permanent": permanent})
    return outcome.to_dict()


# ---------------------------------------------------------------- the batch


class BatchInterrupted(BaseException):
    """SIGTERM (a scheduler's stop, a shutdown) reached the batch: stop, and report what finished. A
    BaseException, as KeyboardInterrupt is, so a slide's own error handling does not record it as a failure."""


LOCK_RETRY_ROUNDS = 3  # slides found locked by a holder that then died are run again this many times at most
LOCK_RETRY_WAIT_S = 2.0


def run_batch(
    archive: str | Path, out_dir: str | Path, config: PipelineConfig, batch: BatchConfig, progress: bool = True
) -> BatchResult:
    """Process every slide of the archive; write batch.json and report.md; never stop at a bad slide.

    A slide whose lock was held by a process that has since died (a Dask worker killed mid-slide, whose task
    Dask gave to another worker at once) is run again within the batch. SIGTERM stops the batch: the report
    of what finished is written, the rest are listed as not run, and ``result.interrupted`` is set."""
    from tqdm import tqdm

    started = time.perf_counter()
    # Absolute before anything reaches a worker: a worker of a cluster runs in a folder of its own.
    archive, out_dir = Path(archive).absolute(), Path(out_dir).absolute()
    ensure_writable_dir(out_dir)
    slides, aliases = unique_slides(find_slides(archive, batch.pattern))
    jobs = [(str(p), slide_id(archive, p)) for p in slides]
    # Slides run with the scheduler of the batch; each slide scores on its own worker, locally.
    per_slide = config.model_copy(update={"scoring": config.scoring.model_copy(update={"scheduler": None})})
    for key in ("model", "mil", "features"):  # a worker elsewhere, or in another folder, finds the same files
        value = getattr(per_slide, key)
        if value and Path(value).exists():
            per_slide = per_slide.model_copy(update={key: str(Path(value).absolute())})
    result = BatchResult()
    bar = tqdm(total=len(jobs), unit="slide", desc="batch", disable=not progress)
    done: dict[str, SlideOutcome] = {}
    try:
        with _stopped_by_sigterm():
            todo = jobs
            for round_ in range(LOCK_RETRY_ROUNDS + 1):
                for outcome in _execute(todo, str(out_dir), per_slide, batch):
                    found = SlideOutcome(**outcome)
                    found.aliases = [str(a) for a in aliases.get(Path(found.path), [])]
                    if found.slide_id not in done:
                        bar.update(1)
                    done[found.slide_id] = found
                    bar.set_postfix(failed=sum(o.status == "failed" for o in done.values()))
                todo = [job for job in jobs if _holder_gone(out_dir, done.get(job[1]), batch)]
                if not todo or round_ == LOCK_RETRY_ROUNDS:
                    break
                log.warning("%d slide(s) were locked by a process that has died; running them again", len(todo))
                time.sleep(LOCK_RETRY_WAIT_S)
    except BatchInterrupted:
        result.interrupted = True
        log.warning("SIGTERM: stopping the batch; the report lists what finished")
    finally:
        bar.close()
    result.outcomes = list(done.values())
    for path, sid in jobs:
        if sid not in done:
            result.outcomes.append(SlideOutcome(sid, path, "not run", error="the batch was stopped before it"))
    result.outcomes.sort(key=lambda o: o.path)
    result.seconds = time.perf_counter() - started
    write_reports(BatchLayout(out_dir), archive, result)  # wsi_dala.runs.batch_report
    return result


def _holder_gone(out_dir: Path, outcome: SlideOutcome | None, batch: BatchConfig) -> bool:
    """The slide was found locked, and its lock's holder is no longer there."""
    if outcome is None or outcome.status != "locked":
        return False
    from wsi_dala.core.locks import LockHolder

    holder = LockHolder.read(BatchLayout(out_dir).slide(outcome.slide_id).lock)
    return holder is None or holder.is_stale(batch.stale_lock_s)


@contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """Turn SIGTERM into BatchInterrupted while the batch runs (in the main thread only: elsewhere Python
    cannot take signals)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise BatchInterrupted()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(
    jobs: list[tuple[str, str]], out_dir: str, config: PipelineConfig, batch: BatchConfig
) -> Iterator[dict[str, Any]]:
    if batch.scheduler or batch.dask_workers > 1:
        from distributed import Client, LocalCluster, as_completed

        from wsi_dala.inference.cluster import connect, our_environ_kept, worker_threads_environ

        if batch.scheduler:
            # Bounded connect + handshake; a peer that is not a Dask scheduler is one ConfigError line.
            client, cluster = connect(batch.scheduler, config.scoring.connect_timeout_s), None
        else:
            with our_environ_kept():
                cluster = LocalCluster(
                    n_workers=batch.dask_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    # Share the cores: each worker's torch gets cores / workers threads.
                    env=worker_threads_environ((os.cpu_count() or 1) // batch.dask_workers),
                )
            client = Client(cluster)
        try:
            # A worker that dies mid-slide: Dask gives its task to another worker (its allowed-failures); the
            # slide's lock, held by the dead process, is then stale and cleared (see run_batch for the rest).
            futures = [
                client.submit(process_slide, path, sid, out_dir, config, batch, key=f"slide-{sid}-{time.time_ns()}",
                              pure=False)
                for path, sid in jobs
            ]  # fmt: skip
            slide_of = {future.key: job for future, job in zip(futures, jobs, strict=True)}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as exc:  # the task itself could not finish (its workers kept dying)
                    path, sid = slide_of[future.key]
                    error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                    yield SlideOutcome(sid, path, "failed", error=f"on the cluster: {error}").to_dict()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return
    for path, sid in jobs:
        yield process_slide(path, sid, out_dir, config, batch)
