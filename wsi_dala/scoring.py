"""Score a tile store through Dask: tile probabilities and raw DT Grad-CAM maps, chunk by chunk.

The store's tiles are a ``dask.array.from_zarr`` array; each chunk (one Zarr chunk of tiles) is one
task that scores it in batches and writes its rows of ``scores`` [N, C] and ``cams`` [N, g, g] back
into the same store. The driver marks a chunk done only after its task finished, so an interrupted
run resumes at the first chunk not done.

Where it runs: Dask's local threaded scheduler by default (one model task at a time; torch uses
the cores), or an existing ``dask.distributed`` cluster (``scheduler="tcp://host:8786"``, or a
``distributed.Client``). The model is loaded once per worker process and cached, never per batch.
CUDA when present (fp16 autocast, pinned memory), else the CPU (bf16 autocast where the CPU has native
bf16, fp32 otherwise); channels_last on both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from tqdm import tqdm

from wsi_dala.cam import logits_and_raw_cams
from wsi_dala.devices import cpu_supports_bf16, normalise
from wsi_dala.errors import ConfigError
from wsi_dala.model import load_checkpoint, read_card
from wsi_dala.store import chunks_done, mark_chunk_done, n_chunks_of, open_store

log = logging.getLogger(__name__)
SCORES, CAMS, SCORE_CHUNKS_DONE = "scores", "cams", "score_chunks_done"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ScoringConfig:
    batch_size: int = 32
    precision: str = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32
    device: str = "auto"
    scheduler: str | None = None  # None: local threads; else the address of a dask.distributed scheduler
    wave: int = 4  # chunks per local compute call (the resume granularity on the local scheduler)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoringResult:
    n_tiles: int
    seconds: float
    chunks_resumed: int
    skipped: bool
    precision: str
    device: str


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def _autocast(precision: str, device: str) -> Any:
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_MODELS: dict[tuple[str, str], tuple[torch.nn.Module, Any]] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(checkpoint: str, device: str) -> tuple[torch.nn.Module, Any]:
    """The model of ``checkpoint`` on ``device``, loaded once per process (per Dask worker)."""
    key = (str(Path(checkpoint).resolve()), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            model, card = load_checkpoint(checkpoint, device)
            model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU alike
            _MODELS[key] = (model, card)
            log.info("loaded %s on %s (pid %d)", checkpoint, device, os.getpid())
        return _MODELS[key]


def score_tiles(tiles: np.ndarray, checkpoint: str, device: str, precision: str, batch_size: int) -> np.ndarray:
    """Packed rows [n, C + g*g]: class probabilities, then the raw Grad-CAM map of the positive class."""
    model, card = cached_model(checkpoint, device)
    mean, std = card.normalisation["mean"], card.normalisation["std"]
    rows = []
    for start in range(0, len(tiles), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size])).permute(0, 3, 1, 2)
        if device.startswith("cuda"):
            batch = batch.pin_memory().to(device, non_blocking=True)
        images = normalise(batch, mean, std).contiguous(memory_format=torch.channels_last)
        logits, raw = logits_and_raw_cams(model, images, card.positive_index, _autocast(precision, device))
        probabilities = torch.softmax(logits.float(), dim=1)
        rows.append(torch.cat([probabilities, raw.flatten(1)], dim=1).cpu().numpy())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)


def _score_block(block: np.ndarray, checkpoint: str, device: str, precision: str, batch_size: int) -> np.ndarray:
    return score_tiles(block, checkpoint, device, precision, batch_size)


def _write_chunk(packed: np.ndarray, store_path: str, index: int, n_classes: int) -> int:
    """Write one chunk's rows (runs where the task ran, e.g. on a Dask worker); returns the index."""
    group = open_store(store_path, mode="r+")
    chunk = int(group.attrs["chunk_tiles"])
    start = index * chunk
    g = group[CAMS].shape[1]
    group[CAMS][start : start + len(packed)] = packed[:, n_classes:].reshape(len(packed), g, g)
    group[SCORES][start : start + len(packed)] = packed[:, :n_classes]
    return index


def feature_grid(checkpoint: str, tile_size_px: int) -> int:
    """Side of the model's feature map for one tile (7 for ResNet50 at 224 px)."""
    model, _card = cached_model(checkpoint, "cpu")
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, 3, tile_size_px, tile_size_px))
    return int(features.shape[-1])


def _prepare(group: Any, checkpoint: str, n_classes: int, grid: int, key: str) -> np.ndarray:
    """Create (or reset, when the model or precision changed) the score arrays; returns the done flags."""
    n = group["coords"].shape[0]
    chunk = int(group.attrs["chunk_tiles"])
    if group.attrs.get("scoring_key") == key and all(name in group for name in (SCORES, CAMS, SCORE_CHUNKS_DONE)):
        return chunks_done(group, SCORE_CHUNKS_DONE)
    # Forget the old key first: a crash below must not leave new arrays under an old key, or the reverse.
    group.attrs.update({"scoring_key": None, "scores_complete": False})
    for name in (SCORES, CAMS, SCORE_CHUNKS_DONE):
        if name in group:
            del group[name]
    group.create_array(SCORES, shape=(n, n_classes), chunks=(chunk, n_classes), dtype="float32", fill_value=np.nan)
    group.create_array(CAMS, shape=(n, grid, grid), chunks=(chunk, grid, grid), dtype="float32", fill_value=np.nan)
    done = np.zeros(n_chunks_of(n, chunk), dtype=bool)
    group.create_array(SCORE_CHUNKS_DONE, data=done, chunks=(max(1, len(done)),))
    group.attrs.update({"scoring_key": key, "scores_complete": False})
    return done


def score_store(
    store_path: str | Path,
    checkpoint: str | Path,
    config: ScoringConfig | None = None,
    progress: bool = True,
    client: Any = None,
) -> ScoringResult:
    """Score every tile of a complete tile store, resuming where an earlier run stopped."""
    config = config or ScoringConfig()
    started = time.perf_counter()
    store_path, checkpoint = str(store_path), str(checkpoint)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    card = read_card(checkpoint)
    group = open_store(store_path, mode="r+")
    if not group.attrs.get("complete"):
        raise ConfigError(f"{store_path}: tile store is incomplete; tile the slide first")
    if int(group.attrs["tile_size_px"]) != card.tile_size_px:
        raise ConfigError(
            f"{store_path}: tiles are {group.attrs['tile_size_px']} px, the model wants {card.tile_size_px} px"
        )
    n_classes = len(card.class_names)
    grid = feature_grid(checkpoint, card.tile_size_px)
    key = f"{file_sha256(checkpoint)[:16]}:{precision}"
    done = _prepare(group, checkpoint, n_classes, grid, key)
    resumed = int(done.sum())
    todo = [i for i in range(len(done)) if not done[i]]
    if todo:
        tiles = da.from_zarr(store_path, component="tiles")
        packed = tiles.map_blocks(
            _score_block,
            checkpoint,
            device,
            precision,
            config.batch_size,
            dtype=np.float32,
            drop_axis=[2, 3],
            chunks=(tiles.chunks[0], (n_classes + grid * grid,)),
        )
        tasks = {i: dask.delayed(_write_chunk)(packed.blocks[i], store_path, i, n_classes) for i in todo}
        chunk = int(group.attrs["chunk_tiles"])
        bar = tqdm(
            total=len(done),
            initial=resumed,
            unit="chunk",
            desc=f"scoring ({chunk} tiles/chunk)",
            disable=not progress,
            leave=False,
        )
        try:
            for index in _run(tasks, config, client):
                mark_chunk_done(group, index, done, SCORE_CHUNKS_DONE)
                bar.update(1)
        finally:
            bar.close()
    group.attrs.update(
        {
            "scores_complete": True,
            "class_names": card.class_names,
            "positive_class": card.positive_class,
            "cam_grid": grid,
            "precision": precision,
        }
    )
    return ScoringResult(
        int(group["coords"].shape[0]), time.perf_counter() - started, resumed, not todo, precision, device
    )


def _run(tasks: dict[int, Any], config: ScoringConfig, client: Any):
    """Yield chunk indices as their tasks finish."""
    if client is None and config.scheduler:
        from distributed import Client

        with Client(config.scheduler) as own_client:
            yield from _run(tasks, config, own_client)
        return
    if client is not None:
        from distributed import as_completed

        futures = client.compute(list(tasks.values()))
        for future in as_completed(futures):
            yield future.result()
        return
    items = list(tasks.items())
    wave = max(1, config.wave)
    for start in range(0, len(items), wave):
        # One model task at a time locally: torch already spreads each batch over the cores.
        results = dask.compute(*[task for _, task in items[start : start + wave]], scheduler="threads", num_workers=1)
        yield from results
