"""``wsi-dala export-model``: our checkpoints in the formats other tools load.

- ``wsinfer``: ``torchscript_model.pt`` + ``config.json`` for ``wsinfer run`` and QuPath's WSInfer
  extension. Traced (not scripted: tracing records the tensor operations only, whatever Python the
  model's forward uses) in fp32 on CPU; the temperature is folded into the logits.
- ``onnx``: ``model.onnx`` (opset 18, free batch axis) taking RGB in [0, 1], NCHW, and giving class
  probabilities: normalisation and softmax are in the graph. The model card rides along in the file's
  metadata (``wsi_dala.model_card``).

Each export is checked before it is kept: the written file is loaded back and must give the eager
model's outputs on random tiles (max |Δp| ≤ 1e-4), and files appear only complete (written under a
hidden name, then renamed).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from wsi_dala.core.errors import CheckpointError, OutputError
from wsi_dala.core.extras import require
from wsi_dala.core.fileio import ensure_writable_dir, naming_failures, require_free_space, write_json_atomic
from wsi_dala.core.layout import ONNX_MODEL_NAME, WSInferModelLayout, writing_path
from wsi_dala.inference.engines.exports import OPSET, quiet
from wsi_dala.model import ModelCard, load_checkpoint, read_card
from wsi_dala.model.scripted import IMPORTED_TORCHSCRIPT
from wsi_dala.model.wsinfer_format import CARD_EXTRA_FILE, Probabilities, ScaledLogits, wsinfer_config

ExportFormat = Literal["wsinfer", "onnx"]
FORMATS: tuple[ExportFormat, ...] = ("wsinfer", "onnx")
MAX_PROBABILITY_DIFF = 1e-4
CHECK_TILES = 4


def export_model(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], fmt: str) -> list[Path]:
    """Write ``checkpoint`` in ``fmt`` into ``out_dir``; returns the files written."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if read_card(checkpoint).architecture == IMPORTED_TORCHSCRIPT:
        raise CheckpointError(f"{checkpoint}: imported from a WSInfer TorchScript already; use that model folder")
    model, card = load_checkpoint(checkpoint, "cpu")
    model = model.float().eval()
    out = ensure_writable_dir(out_dir)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # the file, and the traced copy read back for the check: twice the weights, and some room
    require_free_space(out, 2 * weights + 16 * 2**20, f"the {fmt} export of {Path(checkpoint).name}")
    if fmt == "wsinfer":
        return _export_wsinfer(model, card, Path(checkpoint), out)
    return [_export_onnx(model, card, Path(checkpoint), out)]


def _check_tiles(card: ModelCard, seed: int = 0) -> torch.Tensor:
    """Random RGB tiles in [0, 1] (NCHW) at the card's tile size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(CHECK_TILES, 3, card.tile_size_px, card.tile_size_px, generator=generator)


def _normalised(card: ModelCard, rgb01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(card.normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card.normalisation["std"]).view(1, 3, 1, 1)
    return (rgb01 - mean) / std


def _export_wsinfer(model: torch.nn.Module, card: ModelCard, checkpoint: Path, out: Path) -> list[Path]:
    config = wsinfer_config(card)
    logits = ScaledLogits(model, card.temperature).eval()
    example = _normalised(card, _check_tiles(card))
    layout = WSInferModelLayout(out)
    target = layout.torchscript
    partial = writing_path(target, os.getpid())
    try:
        with torch.no_grad(), quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch, and what QuPath loads
            traced = torch.jit.trace(logits, example[:2], check_trace=False)
            # Saved to memory and written by Python: TorchScript's own file writer aborts the whole process
            # (C++ terminate) on a full disk instead of raising.
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={CARD_EXTRA_FILE: card.to_json()})  # for a round trip
            buffer.seek(0)
            loaded = torch.jit.load(buffer, map_location="cpu").eval()
        with torch.no_grad():
            expected = torch.softmax(logits(example), dim=1)
            got = torch.softmax(loaded(example), dim=1)
        _require_equal(expected, got, checkpoint, "TorchScript")
        with naming_failures(target):
            partial.write_bytes(buffer.getvalue())
            os.replace(partial, target)
    except (CheckpointError, OutputError):
        raise
    except Exception as exc:
        why = _line(exc)
        raise CheckpointError(f"{checkpoint}: {card.architecture} cannot be traced to TorchScript ({why})") from exc
    finally:
        partial.unlink(missing_ok=True)
    config_path = layout.config_json
    write_json_atomic(config_path, config)
    return [target, config_path]


def _export_onnx(model: torch.nn.Module, card: ModelCard, checkpoint: Path, out: Path) -> Path:
    import onnx

    wrapped = Probabilities(model, card.temperature, card.normalisation["mean"], card.normalisation["std"]).eval()
    tiles = _check_tiles(card)
    target = out / ONNX_MODEL_NAME
    partial = writing_path(target, os.getpid())
    try:
        with quiet():
            torch.onnx.export(
                wrapped,
                (tiles[:2],),
                str(partial),
                input_names=["rgb01"],
                output_names=["probabilities"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                dynamo=True,
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(partial))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "wsi_dala.model_card", card.to_json()
        onnx.save(proto, str(partial))
        with torch.no_grad():
            expected = wrapped(tiles)
        _require_equal(expected, torch.from_numpy(_onnx_probabilities(partial, tiles.numpy())), checkpoint, "ONNX")
        os.replace(partial, target)
    except CheckpointError:
        raise
    except Exception as exc:
        written = _os_error(exc)
        if written is not None:  # a full disk, a quota (wrapped by the exporter or not): the file's name
            raise OutputError(f"{target}: cannot be written ({written.strerror or _line(written)})") from exc
        raise CheckpointError(f"{checkpoint}: {card.architecture} cannot be exported to ONNX ({_line(exc)})") from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def _onnx_probabilities(path: Path, rgb01: np.ndarray) -> np.ndarray:
    onnxruntime = require("onnxruntime", "export-model --format onnx (it checks the export against torch)")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"rgb01": rgb01.astype(np.float32)})[0])


def _require_equal(expected: torch.Tensor, got: torch.Tensor, checkpoint: Path, what: str) -> None:
    difference = float((expected.float() - got.float()).abs().max())
    if not difference <= MAX_PROBABILITY_DIFF:
        raise CheckpointError(
            f"{checkpoint}: the {what} export gives other probabilities than the model (max |Δp| {difference:.2g})"
        )


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, where an exporter wrapped one in its own error."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def describe(files: list[Path]) -> str:
    """One line per file written, with its size."""
    return "\n".join(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)" for path in files)
