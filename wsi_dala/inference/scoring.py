"""Score a tile store through Dask: tile probabilities and raw DT Grad-CAM maps, chunk by chunk.

The store's tiles are a ``dask.array.from_zarr`` array; each chunk (one Zarr chunk of tiles) is one
task that scores it in batches and writes its rows of ``scores`` [N, C] and ``cams`` [N, g, g] back
into the same store. The driver marks a chunk done only after its task finished, so an interrupted
run resumes at the first chunk not done.

Where it runs: Dask's local threaded scheduler by default (one model task at a time; torch uses
the cores), or an existing ``dask.distributed`` cluster (``scheduler="tcp://host:8786"``, or a
``distributed.Client``). The model is loaded once per worker process and cached, never per batch.
CUDA when present (fp16 autocast, pinned memory), else the CPU (bf16 autocast where the CPU has native
bf16, fp32 otherwise); channels_last on both. On the CPU the backbone may run on another engine (ONNX
Runtime, OpenVINO; int8 too): ``wsi_dala.inference.engines`` chooses it once, on the driver, and the plan travels
with the tasks. The head and the Grad-CAM gradient always run in torch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import torch
from tqdm import tqdm

from wsi_dala.core.config import ScoringConfig
from wsi_dala.core.errors import ConfigError, QualityError
from wsi_dala.core.step_times import step
from wsi_dala.explain.cam import features_and_logits_without_cams, features_logits_and_raw_cams
from wsi_dala.inference.cluster import scoring_client
from wsi_dala.inference.engines import Backbone, BackbonePlan, load_backbone, plan_backbone
from wsi_dala.inference.engines.plan import BackboneChoice, BackboneRequest
from wsi_dala.inference.tta import (
    MODEL_LOCK,
    apply_view,
    describe,
    dropout_on,
    require_dropout,
    require_square,
    undo_view,
    views,
)
from wsi_dala.model import ModelCard, load_checkpoint
from wsi_dala.model.checkpoint import KnownCheckpoint
from wsi_dala.model.devices import normalise, resolve_device
from wsi_dala.model.interface import as_split, has_feature_map
from wsi_dala.model.stain_normalise import StainNormaliser
from wsi_dala.tiling.store import TileStore
from wsi_dala.tiling.store_records import ScoringRecord

if TYPE_CHECKING:
    from dask.delayed import Delayed
    from distributed import Client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringResult:
    n_tiles: int
    seconds: float
    chunks_resumed: int
    skipped: bool
    precision: str
    device: str
    backend: dict[str, Any]  # the engine, how it was chosen, its check against torch fp32 (BackboneChoice.summary)


_MODELS: dict[tuple[str, str], tuple[torch.nn.Module, ModelCard]] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(checkpoint: str, device: str) -> tuple[torch.nn.Module, ModelCard]:
    """The model of ``checkpoint`` on ``device``, loaded once per process (per Dask worker)."""
    key = (str(Path(checkpoint).resolve()), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            model, card = load_checkpoint(checkpoint, device)
            model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU alike
            _MODELS[key] = (model, card)
            log.info("loaded %s on %s (pid %d)", checkpoint, device, os.getpid())
        return _MODELS[key]


@dataclass(frozen=True)
class StainPlan:
    """How tiles are mapped to the model's stain before scoring: plain data, so it travels to Dask workers."""

    method: str  # macenko | reinhard
    source: dict[str, Any]  # the slide's StainProfile, measured when it was tiled
    target: dict[str, Any]  # the model card's reference StainProfile

    def normaliser(self) -> StainNormaliser:
        from wsi_dala.tissue.stain import StainProfile

        return StainNormaliser(
            self.method,
            StainProfile.from_dict(self.source, "tile store stain"),
            StainProfile.from_dict(self.target, "model card stain reference"),
        )


@dataclass(frozen=True)
class Uncertainty:
    """How each tile is looked at more than once: plain data, so it travels to Dask workers."""

    tta: str = "none"  # none | flips | d4 (wsi_dala.inference.tta.VIEWS)
    mc_dropout: int = 0  # head passes with dropout on, per view (0: none)

    @property
    def measured(self) -> bool:
        return self.tta != "none" or self.mc_dropout > 0


def score_tiles(
    tiles: np.ndarray,
    checkpoint: str,
    device: str,
    plan: BackbonePlan | str,
    batch_size: int,
    stain: StainPlan | None = None,
    uncertainty: Uncertainty | None = None,
) -> np.ndarray:
    """Packed rows [n, C + 1 + g*g]: class probabilities (softmax of logits / the card's temperature,
    averaged over the views), the SD of the positive probability over views and dropout passes (NaN
    when neither is asked for), then the raw Grad-CAM map of the positive class (averaged over the views,
    each mapped back into the tile's frame). ``plan``: where the backbone runs (a precision alone: torch)."""
    model, card = cached_model(checkpoint, device)
    if isinstance(plan, str):
        plan = BackbonePlan("torch", plan, None, torch.get_num_threads())
    engine = load_backbone(plan, model, device)

    def backbone(images: torch.Tensor) -> torch.Tensor:
        with step("scoring: engine (backbone forward)", len(images)):
            return engine(images)

    temperature = card.temperature or 1.0
    normaliser = stain.normaliser() if stain is not None else None
    uncertainty = uncertainty or Uncertainty()
    rows = []
    for batch in device_batches(tiles, batch_size, device):
        with step("scoring: batch preparation (stain, normalisation)", len(batch)):
            images = prepared_images(batch, card, device, normaliser)
        # MC dropout switches the shared model's dropout on: no other thread may run it then. With another
        # engine, torch runs only the head: a small one on one thread, so its idle OpenMP workers do not
        # spin on the cores the engine's own threads need; a heavy one (ResViT-GANNet's TAMA: 14 % of the
        # tile's time on one thread) on all of them, which scores 12 % faster.
        one_thread = plan.engine != "torch" and not getattr(model, "heavy_head", False)
        with MODEL_LOCK, torch_threads(1 if one_thread else None), step("scoring: model (engine, head, Grad-CAM)"):
            probabilities, spread, raw = _score_views(model, card, images, backbone, temperature, uncertainty)
        rows.append(torch.cat([probabilities, spread[:, None], raw.flatten(1)], dim=1).cpu().numpy())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block (None: unchanged)."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_batches(tiles: np.ndarray, batch_size: int, device: str) -> Iterator[torch.Tensor]:
    """uint8 batches [n, H, W, 3] on ``device``. On CUDA the next batch is copied from pinned memory on a
    side stream while the current one computes, so host-to-device copies hide behind the model."""
    starts = range(0, len(tiles), batch_size)
    if not device.startswith("cuda"):
        for start in starts:
            yield torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size]))
        return
    copy_stream = torch.cuda.Stream(device)

    def copied(start: int) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size])).pin_memory()
        with torch.cuda.stream(copy_stream):
            return host.to(device, non_blocking=True)

    upcoming = copied(starts[0]) if len(starts) else None
    for number in range(len(starts)):
        current = upcoming
        assert current is not None
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)  # the copy must land before the model reads it
        current.record_stream(compute)  # and its memory must outlive the copy stream's use
        upcoming = copied(starts[number + 1]) if number + 1 < len(starts) else None
        yield current


def prepared_images(
    tiles: np.ndarray | torch.Tensor, card: ModelCard, device: str, normaliser: StainNormaliser | None = None
) -> torch.Tensor:
    """uint8 tiles [n, H, W, 3] → the model's normalised float input [n, 3, H, W] on ``device``."""
    batch = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
    batch = batch.permute(0, 3, 1, 2)
    if str(batch.device) == "cpu" and device.startswith("cuda"):
        batch = batch.pin_memory().to(device, non_blocking=True)
    if normaliser is not None:
        batch = normaliser(batch)  # on the batch, on the device: one vectorised pass
    return normalise(batch, card.normalisation["mean"], card.normalisation["std"])


def _score_views(
    model: torch.nn.Module,
    card: ModelCard,
    images: torch.Tensor,
    backbone: Backbone,
    temperature: float,
    uncertainty: Uncertainty,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean probabilities [n, C], SD of the positive probability [n] and mean raw CAM [n, g, g] over the views."""
    probabilities, cams, samples = [], [], []
    for view in views(uncertainty.tta):
        if has_feature_map(model):
            features, logits, raw = features_logits_and_raw_cams(
                model, apply_view(images, view), card.positive_index, backbone=backbone
            )
        else:
            features, logits, raw = features_and_logits_without_cams(model, apply_view(images, view), backbone=backbone)
        scaled = torch.softmax(logits.float() / temperature, dim=1)
        probabilities.append(scaled)
        cams.append(undo_view(raw, view))
        if uncertainty.mc_dropout:
            head = as_split(model).forward_head
            with torch.no_grad(), dropout_on(model, features.device):
                for _ in range(uncertainty.mc_dropout):
                    samples.append(torch.softmax(head(features).float() / temperature, dim=1)[:, card.positive_index])
        else:
            samples.append(scaled[:, card.positive_index])
    stacked = torch.stack(samples)
    spread = stacked.std(dim=0, unbiased=False) if uncertainty.measured else torch.full_like(stacked[0], np.nan)
    return torch.stack(probabilities).mean(dim=0), spread, torch.stack(cams).mean(dim=0)


def _write_chunk(packed: np.ndarray, store_path: str, index: int, n_classes: int, measured: bool) -> int:
    """Write one chunk's rows (runs where the task ran, e.g. on a Dask worker); returns the index."""
    with step("scoring: store writes", len(packed)):
        _write_rows(packed, store_path, index, n_classes, measured)
    return index


def _write_rows(packed: np.ndarray, store_path: str, index: int, n_classes: int, measured: bool) -> None:
    store = TileStore(store_path, mode="r+")
    grid = round((packed.shape[1] - n_classes - 1) ** 0.5)  # rows pack C probabilities, the SD, a g x g map
    cams = packed[:, n_classes + 1 :].reshape(len(packed), grid, grid)
    store.write_scores(index, packed[:, :n_classes], cams, packed[:, n_classes] if measured else None)


def feature_grid(checkpoint: str, tile_size_px: int) -> int:
    """Side of the model's feature map for one tile (7 for ResNet50 at 224 px); found once per model and tile
    size in a process, as the model is loaded once (0.18 s a slide of a batch of biopsies otherwise)."""
    key = (str(Path(checkpoint).resolve()), tile_size_px)
    if key not in _GRIDS:
        _GRIDS[key] = _feature_grid(checkpoint, tile_size_px)
    return _GRIDS[key]


_GRIDS: dict[tuple[str, int], int] = {}


def _feature_grid(checkpoint: str, tile_size_px: int) -> int:
    model, _card = cached_model(checkpoint, "cpu")
    if not has_feature_map(model):
        return 1  # no CAM: one NaN cell per tile (see features_and_logits_without_cams)
    try:  # shapes only, on the meta device: no arithmetic (a real ResNet50 pass is ~1 s of a run's start-up)
        meta = copy.deepcopy(model).to("meta")
        with torch.no_grad():
            features = as_split(meta).forward_features(torch.zeros(1, 3, tile_size_px, tile_size_px, device="meta"))
    except (NotImplementedError, RuntimeError):  # an operator without a meta kernel: compute it for real
        with torch.no_grad():
            features = as_split(model).forward_features(torch.zeros(1, 3, tile_size_px, tile_size_px))
    return int(features.shape[-1])


def _check_store(store: TileStore, card: ModelCard, complete: bool = True) -> None:
    if complete and not store.info.complete:
        raise ConfigError(f"{store.path}: tile store is incomplete; tile the slide first")
    if store.info.tile_size_px != card.tile_size_px:
        raise ConfigError(
            f"{store.path}: tiles are {store.info.tile_size_px} px, the model wants {card.tile_size_px} px"
        )


@dataclass(frozen=True)
class ScoringSetup:
    """Everything decided once per store before any chunk is scored: plain data, reused by a streaming
    scorer (``inference/streaming.py``) and by the final pass, so both write under the same scoring key."""

    checkpoint: str
    device: str
    card: ModelCard
    n_classes: int
    grid: int
    uncertainty: Uncertainty
    stain: StainPlan | None
    choice: BackboneChoice
    key: str


def setup_scoring(
    store: TileStore,
    checkpoint: str,
    config: ScoringConfig,
    sample_rows: np.ndarray | None = None,
    complete: bool = True,
    known: KnownCheckpoint | None = None,
) -> ScoringSetup:
    """Check the store and the model, choose the backbone's engine, and derive the scoring key.

    ``sample_rows``: rows the engine is chosen on (default: spread over the slide); ``complete=False``
    for a store still being tiled (scoring overlapped with tiling: no slide-wide stain yet). ``known``: the
    run's checkpoint card and hash, so neither is read again."""
    device = resolve_device(config.device)
    known = known or KnownCheckpoint.read(checkpoint)
    card = known.card
    _check_store(store, card, complete)
    n_classes, grid = len(card.class_names), feature_grid(checkpoint, card.tile_size_px)
    uncertainty = check_uncertainty(store, checkpoint, config)
    stain = stain_plan(store, card, config.stain_normalise)
    sha256 = known.sha256
    choice = choose_backbone(store, checkpoint, sha256, device, config, stain, sample_rows)
    plan = choice.plan
    uncertain = describe(config.tta, config.mc_dropout)
    # Dropout masks are drawn per batch: with MC dropout the batch size changes the SDs, so it is in the key.
    batching = f":batch {config.batch_size}" if config.mc_dropout else ""
    engine = "" if plan.engine == "torch" else f":{plan.engine}"  # torch keeps the keys of stores scored before
    key = f"{sha256[:16]}:{plan.precision}{engine}:{config.stain_normalise}:{uncertain}{batching}"
    return ScoringSetup(checkpoint, device, card, n_classes, grid, uncertainty, stain, choice, key)


def chunk_tasks(store: TileStore, todo: list[int], setup: ScoringSetup, batch_size: int) -> dict[int, Delayed]:
    """One Dask task per chunk in ``todo``: score its tiles, write its rows back into the store."""
    tiles = store.tiles_dask()
    packed = da.map_blocks(
        score_tiles,
        tiles,
        setup.checkpoint,
        setup.device,
        setup.choice.plan,
        batch_size,
        setup.stain,
        setup.uncertainty,
        dtype=np.float32,
        drop_axis=[2, 3],
        chunks=(tiles.chunks[0], (setup.n_classes + 1 + setup.grid * setup.grid,)),
    )
    measured, n_classes, path = setup.uncertainty.measured, setup.n_classes, str(store.path)
    return {i: dask.delayed(_write_chunk)(packed.blocks[i], path, i, n_classes, measured) for i in todo}


def score_store(
    store_path: str | Path,
    checkpoint: str | Path,
    config: ScoringConfig | None = None,
    progress: bool = True,
    client: Client | None = None,
    setup: ScoringSetup | None = None,
    known: KnownCheckpoint | None = None,
) -> ScoringResult:
    """Score every tile of a complete tile store, resuming where an earlier run (or a scorer overlapped
    with tiling, which passes its ``setup``) stopped. ``client``: the run's (see ``scoring_client``); without
    one, scoring gets its own the same way."""
    config = config or ScoringConfig()
    started = time.perf_counter()
    store = TileStore(store_path, mode="r+")
    if setup is None:
        with step("scoring: setup (engine export, check and choice)"):
            setup = setup_scoring(store, str(checkpoint), config, known=known)
    else:
        _check_store(store, setup.card, complete=True)
    done = store.prepare_scores(setup.n_classes, setup.grid, scoring_key=setup.key)
    resumed = int(done.sum())
    todo = [i for i in range(len(done)) if not done[i]]
    if todo:
        tasks = chunk_tasks(store, todo, setup, config.batch_size)
        desc = f"scoring ({store.info.chunk_tiles} tiles/chunk)"
        with (
            scoring_client(config, client) as run_client,
            tqdm(total=len(done), initial=resumed, unit="chunk", desc=desc, disable=not progress, leave=False) as bar,
        ):
            for index in _run(tasks, config, run_client):
                store.mark_score_chunk_done(index, done)
                bar.update(1)
    card, precision = setup.card, setup.choice.plan.precision
    record = ScoringRecord(
        card.class_names,
        card.positive_class,
        setup.grid,
        precision,
        uncertainty=describe(config.tta, config.mc_dropout),
        temperature=card.temperature,
        has_cams=has_feature_map(cached_model(setup.checkpoint, "cpu")[0]),
    )
    store.mark_scores_complete(record)
    seconds = time.perf_counter() - started
    summary = setup.choice.summary()
    return ScoringResult(store.info.n_tiles, seconds, resumed, not todo, precision, setup.device, summary)


def choose_backbone(
    store: TileStore,
    checkpoint: str,
    sha256: str,
    device: str,
    config: ScoringConfig,
    stain: StainPlan | None,
    sample_rows: np.ndarray | None = None,
) -> BackboneChoice:
    """The backbone's engine for this store, from a batch of its own tiles (``wsi_dala.inference.engines.plan``)."""
    model, card = cached_model(checkpoint, device)
    normaliser = stain.normaliser() if stain is not None else None
    n_tiles = store.info.n_tiles
    if n_tiles:  # one scoring batch of the slide's own tiles (repeated when the slide has fewer)
        rows = spread_rows(n_tiles, config.batch_size) if sample_rows is None else sample_rows
        tiles = store.tiles_at(rows)
        tiles = tiles[np.resize(np.arange(len(tiles)), min(config.batch_size, 64))]
        sample = prepared_images(tiles, card, device, normaliser)
    else:
        sample = torch.zeros(1, 3, card.tile_size_px, card.tile_size_px, device=device)

    def calibration() -> torch.Tensor:
        source = TileStore(config.int8_calibration) if config.int8_calibration else store
        rows = spread_rows(source.info.n_tiles, config.int8_calibration_tiles)
        if not len(rows):
            raise ConfigError(f"{source.path}: no tiles to calibrate int8 on")
        return prepared_images(source.tiles_at(rows), card, "cpu", normaliser)

    def probabilities(features: torch.Tensor) -> torch.Tensor:
        logits = as_split(model).forward_head(features)
        return torch.softmax(logits.float() / (card.temperature or 1.0), dim=1)[:, card.positive_index]

    request = BackboneRequest(
        checkpoint,
        sha256,
        model,
        card.tile_size_px,
        device,
        config.backend,
        config.precision,
        sample,
        calibration if config.precision == "int8" else None,
        probabilities,
    )
    return plan_backbone(request)


def spread_rows(n_tiles: int, count: int) -> np.ndarray:
    """``count`` rows spread evenly over ``n_tiles`` (all of them when there are fewer), sorted, unique."""
    if n_tiles <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_tiles - 1, min(count, n_tiles)).round().astype(np.int64))


def check_devices(config: ScoringConfig) -> None:
    """``--devices all`` needs GPUs and dask-cuda: said before any work, in one line."""
    if config.devices != "all":
        return
    if not torch.cuda.is_available():
        raise ConfigError("--devices all: no CUDA GPU is visible; use --devices one to score on the CPU")
    if config.scheduler:
        raise ConfigError("--devices all starts its own local GPU cluster; it cannot be combined with --scheduler")
    try:
        import dask_cuda  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--devices all needs dask-cuda: pip install 'wsi-dala[gpu]'") from exc


def check_uncertainty(store: TileStore, checkpoint: str, config: ScoringConfig) -> Uncertainty:
    """``--tta`` and ``--mc-dropout`` checked against the tiles and the model, before any work."""
    if config.tta != "none":
        _n, height, width, _c = store.tiles_dask().shape
        require_square(height, width, str(store.path))
    if config.mc_dropout:
        model, _card = cached_model(checkpoint, "cpu")
        require_dropout(model, checkpoint)
    return Uncertainty(config.tta, config.mc_dropout)


def stain_plan(store: TileStore, card: ModelCard, method: str) -> StainPlan | None:
    """The stain mapping for ``method`` (None for "none"); the model's reference is its card's, or the
    published Macenko reference for a checkpoint that records none."""
    trained_with = card.training_data.get("stain_normalise", "none")
    if method == "none":
        if trained_with != "none":
            log.warning(
                "the model was trained on %s-normalised tiles; scoring raw tiles (set scoring.stain_normalise)",
                trained_with,
            )
        return None
    from wsi_dala.tissue.stain import REFERENCE_PROFILE, StainProfile

    source = store.info.stain
    if source is None:
        raise QualityError(
            f"{store.info.tiling.slide.path}: its stain could not be measured (too little unflagged stained "
            "tissue); score it with scoring.stain_normalise: none"
        )
    source = StainProfile.from_dict(source, f"{store.path}: stain").to_dict()  # untrusted: checked once, here
    target = card.stain_reference
    if target is None:
        log.warning("%s records no reference stain; normalising to the published Macenko reference", card.architecture)
        target = REFERENCE_PROFILE.to_dict()
    return StainPlan(method, source, target)


def _run(tasks: dict[int, Delayed], config: ScoringConfig, client: Client | None) -> Iterator[int]:
    """Yield chunk indices as their tasks finish: on ``client`` (given by the run, which owns it:
    :func:`wsi_dala.inference.cluster.scoring_client`), else on Dask's local threaded scheduler."""
    if client is not None:
        from distributed import as_completed

        futures = client.compute(list(tasks.values()))
        for future in as_completed(futures):
            yield future.result()
        return
    items = list(tasks.items())
    for start in range(0, len(items), config.wave):
        # One model task at a time locally: torch already spreads each batch over the cores.
        wave = [task for _, task in items[start : start + config.wave]]
        with step("scoring: chunk tasks after tiling (reads, Dask, model, writes)"):
            finished = dask.compute(*wave, scheduler="threads", num_workers=1)
        yield from finished
