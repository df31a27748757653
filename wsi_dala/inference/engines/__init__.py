"""Where the backbone runs: torch, ONNX Runtime or OpenVINO, at fp32, bf16 or int8.

The backbone (everything up to the DT Grad-CAM target layer) is ~99 % of a tile's work; the head and
the Grad-CAM gradient stay in torch (they are tiny and need autograd). ``plan_backbone`` (the driver)
turns ``--backend``/``--precision`` into a :class:`BackbonePlan` — plain data, exported files included —
and ``load_backbone`` (each Dask worker) turns a plan into a callable, once per process.
"""

from wsi_dala.inference.engines.plan import BACKENDS, BackbonePlan, plan_backbone
from wsi_dala.inference.engines.runtimes import Backbone, load_backbone

__all__ = ["BACKENDS", "Backbone", "BackbonePlan", "load_backbone", "plan_backbone"]
