"""ONNX exports of a checkpoint's backbone, cached beside the checkpoint and keyed by its hash.

Exporting ResNet50 takes seconds and quantising it about a minute, so each is done once per checkpoint:
``<checkpoint>.engines/<stem>-<sha16>-<tile>px.onnx`` (a folder beside the checkpoint; the user cache
``~/.cache/wsi-dala/engines`` where that folder cannot be written; ``$WSI_DALA_ENGINE_CACHE`` over
both, e.g. a shared filesystem for a Dask cluster). A changed checkpoint has another hash, so it is
exported again, and the stale files of the same checkpoint name are removed then. An export is written
into a hidden folder beside its final name and moved into place, its weights file (if any) first and the
model last, so a crash never leaves a half export that looks complete. A backbone whose fp32 weights pass
ONNX's 2 GB single-file limit (the ViT-H and ViT-g foundation models: 2.5-4.5 GB) keeps them in an
external-data file beside the model (``<export>.onnx.data``), which ONNX Runtime and OpenVINO read from there.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from wsi_dala.core.errors import EngineError, EngineExportError
from wsi_dala.core.layout import EngineLayout, engine_dir_beside, remove_stale_partials, user_cache_dir, writing_path
from wsi_dala.core.memory import available_memory_bytes
from wsi_dala.model.interface import as_split

log = logging.getLogger(__name__)

CACHE_ENV = "WSI_DALA_ENGINE_CACHE"
OPSET = 18
MAX_BATCH = 4096
SINGLE_FILE_LIMIT_BYTES = 1 << 30  # weights above this go to an external-data file (ONNX's protobuf limit is 2 GiB)
# Memory an export takes beyond the loaded model, per byte of fp32 weights: UNI2-h's (2.7 GB) export and engine
# choice raised a run's peak RSS to 13.4 GB. An export the machine cannot hold is not begun (the kernel would
# kill the process); the backbone then runs on torch, logged.
EXPORT_MEMORY_PER_WEIGHT_BYTE = 4
NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "root")


class FeaturesOnly(nn.Module):
    """The backbone alone (``forward_features``): what the engines run."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return as_split(self.model).forward_features(images)


def engine_layout(checkpoint: str | os.PathLike[str]) -> EngineLayout:
    """Where the engine files of ``checkpoint`` live (the folder is created if missing)."""
    checkpoint = Path(checkpoint)
    override = os.environ.get(CACHE_ENV)
    candidates = [Path(override)] if override else []
    candidates += [engine_dir_beside(checkpoint), user_cache_dir() / "engines"]
    for folder in candidates:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                remove_stale_partials(folder)  # an export killed half-way (a kill -9 leaves up to 100 MB)
                return EngineLayout(folder, checkpoint.stem)
    tried = ", ".join(map(str, candidates))
    raise EngineError(f"{checkpoint}: no writable folder for its engine files (tried {tried})")


def ensure_onnx(model: nn.Module, checkpoint: str, sha256: str, tile_px: int) -> Path:
    """The fp32 ONNX export of ``model``'s backbone, exported now unless a file for this hash exists."""
    layout = engine_layout(checkpoint)
    path = layout.onnx(sha256, tile_px)
    if path.exists():
        return path
    log.info("exporting the backbone of %s to %s", checkpoint, path)
    export_backbone(model, tile_px, path, checkpoint)
    for stale in layout.exports():
        if not layout.is_of(stale, sha256):
            log.info("removing %s: its checkpoint changed", stale)
            stale.unlink(missing_ok=True)
            layout.external_data(stale).unlink(missing_ok=True)
    return path


def export_backbone(model: nn.Module, tile_px: int, path: Path, source: str) -> None:
    """Export ``forward_features`` with a free batch axis; staged in a hidden folder beside ``path``, then moved
    into place (an external weights file before the model). Not begun without the free memory it needs."""
    weights_bytes = sum(t.numel() * 4 for t in model.state_dict().values())  # as the fp32 copy holds them
    needed, available = weights_bytes * EXPORT_MEMORY_PER_WEIGHT_BYTE, available_memory_bytes()
    if available is not None and needed > available:
        raise EngineExportError(
            f"{source}: its ONNX export needs about {needed / 1e9:.1f} GB of free memory and "
            f"{available / 1e9:.1f} GB is available"
        )
    # A copy, in eval mode and the default memory layout: tracing must not touch the scoring model's state.
    features = FeaturesOnly(copy.deepcopy(model).float().to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, 3, tile_px, tile_px)
    staging = writing_path(path, os.getpid())  # a hidden folder: the model, and its weights file when external
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    exported = staging / path.name
    try:
        with quiet():
            torch.onnx.export(
                features,
                (example,),
                str(exported),
                input_names=["images"],
                output_names=["features"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
                dynamo=True,
                opset_version=OPSET,
                external_data=weights_bytes > SINGLE_FILE_LIMIT_BYTES,
                verbose=False,
            )
        for part in sorted(staging.iterdir()):  # the external weights (named after the model) first
            if part != exported:
                os.replace(part, path.parent / part.name)
        os.replace(exported, path)  # last: the model's presence says the export is whole
    except Exception as exc:
        raise EngineExportError(f"{source}: the backbone cannot be exported to ONNX ({_one_line(exc)})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter's and quantiser's progress lines, warnings and INFO logs kept out of our output."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
