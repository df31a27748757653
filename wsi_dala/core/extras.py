"""Optional packages: imported when a command needs them, and named in one line when they are missing.

``pip install wsi-dala`` installs what ``run`` needs; the rest comes in extras (``[timm]``, ``[gan]``,
``[onnxruntime]``, ``[benchmarks]``, ``[all]``). A command that reaches a missing one fails with
``ExtraMissing`` (a ConfigError: one line, exit 2) that says which extra to install, instead of a
``ModuleNotFoundError`` traceback from deep inside.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from wsi_dala.core.errors import ConfigError

# module -> the extra that installs it
EXTRAS = {
    "timm": "timm",
    "torch_fidelity": "gan",
    "onnxruntime": "onnxruntime",
    "psutil": "benchmarks",
    "flask": "viewer",
    "highdicom": "dicom",
    "wsidicomizer": "dicom",
}


class ExtraMissing(ConfigError):
    """An optional package a command needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or ExtraMissing naming the extra: '<purpose> needs timm: pip install "wsi-dala[timm]"'."""
    try:
        return import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, "all")
        raise ExtraMissing(
            f"{purpose} needs the {top} package, which is not installed: pip install 'wsi-dala[{extra}]' ({exc})"
        ) from None
