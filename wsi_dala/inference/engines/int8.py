"""int8 backbone: ONNX Runtime's post-training static quantiser, calibrated on real tiles.

Why ONNX Runtime's quantiser and a QDQ model: it ships with the engine (no NNCF, ~100 MB more), and
both ONNX Runtime and OpenVINO execute QDQ models with integer kernels, so one quantised file serves
both. Weights are per-channel symmetric int8, activations uint8 from the calibration tiles' ranges
(percentile, so one saturated pixel does not stretch a layer's range). The calibration tiles
(``scoring.int8_calibration_tiles``, spread over the slide or over another tile store) go into the
file name by hash: other tiles, another file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_dala.core.errors import EngineError, EngineExportError
from wsi_dala.core.layout import writing_path
from wsi_dala.inference.engines.exports import quiet
from wsi_dala.inference.engines.runtimes import require_installed

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
PERCENTILE = 99.999


def calibration_hash(images: np.ndarray) -> str:
    """16 hex digits identifying a calibration set (the normalised images themselves)."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()[:16]


def quantise(fp32_file: Path, images: np.ndarray, out_file: Path) -> Path:
    """Write the int8 QDQ model of ``fp32_file`` calibrated on ``images`` (float32 [N, 3, H, W], normalised)."""
    require_installed("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            if start is None:
                return None
            return {"images": np.ascontiguousarray(images[start : start + CALIBRATION_BATCH], dtype=np.float32)}

    if len(images) == 0:
        raise EngineError(f"{fp32_file}: no calibration tiles for int8 quantisation")
    prepared = writing_path(out_file, os.getpid(), ".prepared")
    partial = writing_path(out_file, os.getpid())
    options: dict[str, Any] = {"CalibMaxIntermediateOutputs": CALIBRATION_BATCH, "CalibPercentile": PERCENTILE}
    try:
        with quiet():
            quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(partial),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options=options,
            )
        os.replace(partial, out_file)
    except EngineError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise EngineExportError(f"{fp32_file}: int8 quantisation failed ({text})") from exc
    finally:
        prepared.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    log.info("int8 backbone written to %s (%d calibration tiles)", out_file, len(images))
    return out_file
