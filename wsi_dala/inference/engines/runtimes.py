"""The three engines behind one call: normalised images [N, 3, H, W] in, fp32 features [N, C, h, w] out.

torch runs the checkpoint's own module (autocast for bf16/fp16, channels_last); ONNX Runtime and
OpenVINO run the cached ONNX export (``exports.py``), int8 included (a QDQ model from ONNX Runtime's
quantiser, which both engines execute with integer kernels). One engine object per process and plan:
sessions and compiled models are expensive to build and safe to reuse.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from wsi_dala.core.errors import EngineError, EngineFileError
from wsi_dala.core.extras import EXTRAS
from wsi_dala.model.devices import autocast
from wsi_dala.model.interface import as_split

if TYPE_CHECKING:
    from wsi_dala.inference.engines.plan import BackbonePlan

log = logging.getLogger(__name__)

Backbone = Callable[[torch.Tensor], torch.Tensor]
MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def installed(engine: str) -> bool:
    """True when ``engine``'s Python package imports (torch always does)."""
    if engine == "torch":
        return True
    try:
        __import__(MODULES[engine])
    except ImportError:
        return False
    return True


def require_installed(engine: str) -> None:
    if not installed(engine):
        module = MODULES[engine]
        install = f"pip install 'wsi-dala[{EXTRAS[module]}]'" if module in EXTRAS else f"pip install {module}"
        raise EngineError(f"--backend {engine}: the {MODULES[engine]} package is not installed ({install})")


def scoring_threads() -> int:
    """Threads for an engine: torch's own setting (``OMP_NUM_THREADS``/``torch.set_num_threads`` respected)."""
    return max(1, torch.get_num_threads())


class TorchBackbone:
    def __init__(self, model: nn.Module, precision: str, device: str) -> None:
        self.model, self.precision, self.device = model, precision, device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.precision, self.device):
            return as_split(self.model).forward_features(images).float()


class OnnxRuntimeBackbone:
    def __init__(self, path: Path, threads: int) -> None:
        require_installed("onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(["features"], {"images": array})[0])


class OpenVinoBackbone:
    def __init__(self, path: Path, precision: str, threads: int, compile_cache: Path) -> None:
        require_installed("openvino")
        import openvino as ov

        config: dict[str, Any] = {
            # f32 unless bf16 is asked: OpenVINO would otherwise pick bf16 by itself on CPUs that have it.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "CACHE_DIR": str(compile_cache),
        }
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        result = self.request.infer({0: array})
        return torch.from_numpy(np.array(result[self.compiled.output(0)], copy=True))  # the request reuses it


def build_backbone(plan: BackbonePlan, model: nn.Module, device: str) -> Backbone:
    """A new engine object for ``plan`` (``model`` serves the torch engine)."""
    if plan.engine == "torch":
        return TorchBackbone(model, plan.precision, device)
    if plan.model_file is None or not Path(plan.model_file).exists():
        raise EngineError(
            f"{plan.model_file}: the {plan.engine} model file is not on this machine; on a cluster, point "
            f"$WSI_DALA_ENGINE_CACHE at a shared folder"
        )
    try:
        if plan.engine == "onnxruntime":
            return OnnxRuntimeBackbone(Path(plan.model_file), plan.threads)
        if plan.engine == "openvino":
            from wsi_dala.core.layout import EngineLayout

            compile_cache = EngineLayout(Path(plan.model_file).parent, "").openvino_cache
            return OpenVinoBackbone(Path(plan.model_file), plan.precision, plan.threads, compile_cache)
    except EngineError:
        raise
    except Exception as exc:  # the runtimes raise their own types for a file they cannot read
        message = " ".join(str(exc).split())[:300]
        raise EngineFileError(f"{plan.model_file}: {plan.engine} cannot load it ({message})") from exc
    raise EngineError(f"unknown engine {plan.engine!r}")


_LOADED: dict[tuple[BackbonePlan, int, str], Backbone] = {}
_LOADED_LOCK = threading.Lock()


def load_backbone(plan: BackbonePlan, model: nn.Module, device: str) -> Backbone:
    """The engine object of ``plan`` in this process, built once (per Dask worker)."""
    key = (plan, id(model), device)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = build_backbone(plan, model, device)
            log.info("backbone on %s %s (pid %d)", plan.engine, plan.precision, os.getpid())
        return _LOADED[key]


def remember_backbone(plan: BackbonePlan, model: nn.Module, device: str, backbone: Backbone) -> None:
    """Keep the engine object built while planning, so scoring in this process does not build a second."""
    with _LOADED_LOCK:
        _LOADED.setdefault((plan, id(model), device), backbone)
