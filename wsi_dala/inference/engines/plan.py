"""Choosing the backbone's engine: what was asked, what the engine offers, what this CPU runs fastest.

``--backend auto`` measures every installed engine that offers the precision on a batch of the slide's
own tiles, once per CPU, checkpoint, tile size, batch size and thread count (cached in ``speed.json``
beside the exports), and takes the fastest. Every engine other than torch is first checked against
torch fp32 on real tiles (the first slide's, once per engine file and the same key as the speeds: a later run
reuses the result): an fp32 engine whose features differ by more than 1e-3 of their range is not used (a
logged fallback, recorded in ``run.json``), so ``auto`` never trades correctness for speed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_dala.core.errors import EngineError, EngineExportError, EngineFileError
from wsi_dala.core.fileio import read_json_object, write_json_atomic
from wsi_dala.core.step_times import step
from wsi_dala.inference.engines.exports import engine_layout, ensure_onnx
from wsi_dala.inference.engines.runtimes import (
    Backbone,
    build_backbone,
    installed,
    remember_backbone,
    require_installed,
    scoring_threads,
)
from wsi_dala.model.devices import resolve_precision
from wsi_dala.model.interface import as_split

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")
ENGINES: tuple[str, ...] = BACKENDS[1:]
OFFERS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
FP32_FEATURE_TOLERANCE = 1e-3  # max |Δ feature| / max |feature| for an engine to count as fp32-equal
CHECK_TILES = 4
MIN_TIMED_S = 0.5  # each timed round lasts at least this long (and a batch)
MEASURE_ROUNDS = 2
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class BackbonePlan:
    """Where the backbone runs: plain, hashable data that travels to Dask workers."""

    engine: str  # torch | onnxruntime | openvino
    precision: str  # fp32 | bf16 | fp16 | int8
    model_file: str | None = None  # the ONNX file (engines other than torch)
    threads: int = 1

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}"


@dataclass
class BackboneChoice:
    """The plan and how it was reached, for ``run.json``."""

    plan: BackbonePlan
    asked: str  # the --backend setting
    reason: str  # measured fastest | asked | only candidate | fallback: ...
    rates_tiles_per_s: dict[str, float] = field(default_factory=dict)  # per candidate label, when measured
    check: dict[str, dict[str, float]] = field(default_factory=dict)  # per label: feature and probability Δ
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.plan.engine,
            "precision": self.plan.precision,
            "asked": self.asked,
            "reason": self.reason,
            "rates_tiles_per_s": self.rates_tiles_per_s,
            "check_against_torch_fp32": self.check,
            "threads": self.plan.threads,
            "model_file": self.plan.model_file,
            "choice_s": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class BackboneRequest:
    """What the driver knows when it plans: the model, its files and a batch of the slide's own tiles."""

    checkpoint: str
    sha256: str
    model: nn.Module
    tile_px: int
    device: str
    backend: str
    precision: str  # the --precision setting (auto, fp32, bf16, fp16, int8)
    sample: torch.Tensor  # normalised images, one scoring batch
    calibration: Callable[[], torch.Tensor] | None = None  # normalised calibration images (int8 only)
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # features -> probabilities, for the check


def engine_precision(setting: str, engine: str, device: str) -> str:
    """The precision ``engine`` runs for the ``--precision`` setting; ``auto`` falls back to fp32."""
    if setting == "int8":
        if "int8" not in OFFERS[engine]:
            raise EngineError(f"--precision int8: the {engine} backend has none; use --backend onnxruntime or openvino")
        return "int8"
    resolved = resolve_precision(setting, device)
    if resolved in OFFERS[engine]:
        return resolved
    if setting == "auto":
        return "fp32"
    raise EngineError(f"--precision {resolved}: the {engine} backend runs {', '.join(OFFERS[engine])} only")


def plan_backbone(request: BackboneRequest) -> BackboneChoice:
    """The engine and precision the backbone runs at, exported, checked and (for ``auto``) measured."""
    started = time.perf_counter()
    if request.backend not in BACKENDS:
        raise EngineError(f"--backend must be one of {', '.join(BACKENDS)}, got {request.backend!r}")
    if not getattr(request.model, "exportable", True):  # a TorchScript-only import (wsi_dala.model.scripted)
        reason = "TorchScript-only model: runs as traced, on torch in fp32"
        if request.backend not in ("auto", "torch") or request.precision not in ("auto", "fp32"):
            reason += f" (asked: --backend {request.backend} --precision {request.precision})"
        return _timed(BackboneChoice(_torch_plan(request, "fp32"), request.backend, reason), started)
    if request.device != "cpu":
        if request.backend not in ("auto", "torch"):
            raise EngineError(f"--backend {request.backend} runs on the CPU only; on {request.device} use torch")
        choice = BackboneChoice(
            _torch_plan(request, engine_precision(request.precision, "torch", request.device)),
            request.backend,
            "the only engine on " + request.device,
        )
        return _timed(choice, started)
    settings = (request.backend, request.precision, len(request.sample))
    memo = (request.checkpoint, request.sha256, request.tile_px, *settings)
    earlier = _CHOSEN.get(memo) if request.precision != "int8" else None  # int8: calibrated per slide
    if earlier is not None:  # a batch worker's next slide: same model, settings and machine
        return replace(earlier, reason=earlier.reason + "; chosen for an earlier slide in this process", seconds=0.0)
    choice = _plan_on_cpu(request, started)
    _CHOSEN[memo] = choice
    return choice


_CHOSEN: dict[tuple[object, ...], BackboneChoice] = {}


def _plan_on_cpu(request: BackboneRequest, started: float) -> BackboneChoice:
    if request.backend == "auto":
        candidates = [e for e in ENGINES if installed(e) and _offers(e, request)]
        if not candidates:
            raise EngineError(f"--precision {request.precision}: no installed engine offers it (pip install openvino)")
    else:
        require_installed(request.backend)
        candidates = [request.backend]
    best, rates, fallbacks, check = _best_plan(request, candidates)
    if best is None:  # only possible when the asked engine failed its export or its check
        plan = _torch_plan(
            request, engine_precision(request.precision if request.precision != "int8" else "auto", "torch", "cpu")
        )
        log.warning("backbone: falling back to %s (%s)", plan.label, "; ".join(fallbacks))
        return _timed(BackboneChoice(plan, request.backend, "fallback: " + "; ".join(fallbacks), check=check), started)
    plan, backbone = best
    remember_backbone(plan, request.model, "cpu", backbone)  # scoring reuses it: no second copy of the engine
    if not rates:
        reason = "asked" if request.backend != "auto" else "the only usable engine"
    else:
        reason = "measured fastest"
        log.info("backbone: %s (%s)", plan.label, ", ".join(f"{k} {v:.1f} tiles/s" for k, v in rates.items()))
    if fallbacks:
        reason += " (" + "; ".join(fallbacks) + ")"
    return _timed(BackboneChoice(plan, request.backend, reason, rates, check), started)


def _timed(choice: BackboneChoice, started: float) -> BackboneChoice:
    choice.seconds = time.perf_counter() - started
    return choice


def _offers(engine: str, request: BackboneRequest) -> bool:
    if request.precision == "int8":
        return "int8" in OFFERS[engine]
    return resolve_precision(request.precision, "cpu") in OFFERS[engine]


def _torch_plan(request: BackboneRequest, precision: str) -> BackbonePlan:
    return BackbonePlan("torch", precision, None, scoring_threads())


def _best_plan(
    request: BackboneRequest, candidates: list[str]
) -> tuple[tuple[BackbonePlan, Backbone] | None, dict[str, float], list[str], dict[str, dict[str, float]]]:
    """Each candidate exported, built, checked against torch fp32 and (when there are several) timed, one
    at a time: only the fastest so far stays alive, so planning never holds every engine's copy of the
    model at once. When the speed cache knows every candidate's rate, only the fastest is built and
    checked (the next only if it fails): a losing engine's build and check cost a ResViT-GANNet run 1 s
    per slide for nothing. Returns the best, the rates (empty when nothing was compared), the failures as
    reasons, and the checks."""
    best: tuple[BackbonePlan, Backbone] | None = None
    rates: dict[str, float] = {}
    fallbacks: list[str] = []
    check: dict[str, dict[str, float]] = {}
    reference: torch.Tensor | None = None
    cache_file, key = _speed_cache(request)
    cached = _valid_rates(cache_file, key)
    known_checks, new_checks = _cached_checks(cache_file, key), {}
    labels = {engine: f"{engine} {engine_precision(request.precision, engine, 'cpu')}" for engine in candidates}
    all_cached = len(candidates) > 1 and all(label in cached for label in labels.values())
    if all_cached:  # every rate known: build and check the fastest alone, the next only if it fails its check
        candidates = sorted(candidates, key=lambda engine: -float(cached[labels[engine]]))
    for engine in candidates:
        if all_cached and best is not None:
            break
        precision = engine_precision(request.precision, engine, "cpu")
        try:
            with step(f"scoring setup: {engine} export and build"):
                plan, backbone = _built(request, engine, precision)
        except EngineExportError as exc:
            fallbacks.append(f"{engine}: {exc}")
            continue
        if engine != "torch" or precision != "fp32":
            earlier = known_checks.get(plan.label) if precision != "int8" else None  # int8: calibrated per slide
            if earlier is not None and earlier.get("model_file") == _file_name(plan):
                check[plan.label] = {k: v for k, v in earlier.items() if k != "model_file"}
            else:
                with step("scoring setup: check against torch fp32"):
                    if reference is None:
                        reference = _torch_fp32_features(request)
                    check[plan.label] = _compare(request, backbone, reference)
                new_checks[plan.label] = {**check[plan.label], "model_file": _file_name(plan)}
            if precision == "fp32" and check[plan.label]["max_feature_rel_diff"] > FP32_FEATURE_TOLERANCE:
                difference = check[plan.label]["max_feature_rel_diff"]
                fallbacks.append(f"{plan.label}: features differ from torch fp32 by {difference:.2g} of their range")
                continue
        if all_cached:
            rates = {label: float(cached[label]) for label in labels.values()}
        elif len(candidates) > 1:
            with step(f"scoring setup: {engine} speed measured"):
                rates[plan.label] = float(cached[plan.label]) if plan.label in cached else _best_rate(backbone, request)
        if best is None or rates.get(plan.label, 0.0) > rates.get(best[0].label, 0.0):
            best = (plan, backbone)  # the former best, if any, is released here
        del backbone
    if rates or new_checks:
        stored = read_json_object(cache_file)
        if rates:
            stored[key] = {**_valid_rates(cache_file, key, warn=False), **rates}
        if new_checks:
            stored[_checks_key(key)] = {**_cached_checks(cache_file, key), **new_checks}
        write_json_atomic(cache_file, stored)
    return best, rates, fallbacks, check


def _file_name(plan: BackbonePlan) -> str:
    """The engine file a check was made on (named by the checkpoint's hash): a new export is checked again."""
    return Path(plan.model_file).name if plan.model_file else ""


def _checks_key(key: str) -> str:
    return f"{key}|checks against torch fp32"


def _cached_checks(cache_file: Path, key: str) -> dict[str, dict[str, Any]]:
    """The engines' checks against torch fp32 made by an earlier run on this CPU, checkpoint, tile size, batch
    and threads: each engine is checked once, not on every slide. Anything malformed is ignored (checked again)."""
    entry = read_json_object(cache_file).get(_checks_key(key))
    if not isinstance(entry, dict):
        return {}
    checks = {}
    for label, values in entry.items():
        numbers = isinstance(values, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in values.items()
            if k != "model_file"
        )
        if numbers and isinstance(values.get("model_file"), str) and "max_feature_rel_diff" in values:
            checks[str(label)] = values
    return checks


def _built(request: BackboneRequest, engine: str, precision: str) -> tuple[BackbonePlan, Backbone]:
    """The engine's plan and its backbone. A cached model file the engine cannot load (cut short by a kill,
    corrupted) is removed and built again, once, with one warning: a cache is rebuilt, never trusted."""
    plan = _engine_plan(request, engine, precision)
    try:
        return plan, build_backbone(plan, request.model, "cpu")
    except EngineFileError as exc:
        log.warning("%s; removing it and building it again", exc)
        if plan.model_file is not None:
            Path(plan.model_file).unlink(missing_ok=True)
        plan = _engine_plan(request, engine, precision)
        try:
            return plan, build_backbone(plan, request.model, "cpu")
        except EngineFileError as again:
            raise EngineExportError(str(again)) from again


def _valid_rates(cache_file: Path, key: str, warn: bool = True) -> dict[str, float]:
    """This measurement's cached rates, each a finite positive number. A damaged cache (not JSON, not a
    mapping, a rate that is not a number) is logged once and measured again, never trusted."""
    try:
        stored = json.loads(cache_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if warn:
            log.warning("%s: damaged speed cache (%s); measuring again", cache_file, str(exc).splitlines()[0][:120])
        return {}
    entry = stored.get(key, {}) if isinstance(stored, dict) else None
    if not isinstance(entry, dict):
        if warn:
            log.warning("%s: damaged speed cache (not a mapping of rates); measuring again", cache_file)
        return {}
    rates: dict[str, float] = {}
    damaged: list[str] = []
    for label, value in entry.items():
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")
        if math.isfinite(number) and number > 0:
            rates[str(label)] = float(number)
        else:
            damaged.append(f"{label}: {value!r}"[:80])
    if damaged and warn:
        log.warning("%s: damaged speed cache (%s); measuring again", cache_file, "; ".join(damaged))
    return rates


def _best_rate(backbone: Backbone, request: BackboneRequest) -> float:
    """The best of ``MEASURE_ROUNDS`` timings after one warm-up batch: an engine's first batches after a
    warm-up can still be slow. A first run of a checkpoint pays this for every engine (about 1.5 s each)."""
    backbone(request.sample)
    return max(measure_rate(backbone, request.sample, warm_up=False) for _ in range(MEASURE_ROUNDS))


def _engine_plan(request: BackboneRequest, engine: str, precision: str) -> BackbonePlan:
    threads = scoring_threads()
    if engine == "torch":
        return BackbonePlan("torch", precision, None, threads)
    fp32_file = ensure_onnx(request.model, request.checkpoint, request.sha256, request.tile_px)
    if precision != "int8":
        return BackbonePlan(engine, precision, str(fp32_file), threads)
    from wsi_dala.inference.engines.int8 import calibration_hash, quantise

    if request.calibration is None:
        raise EngineError("--precision int8 needs calibration tiles")
    images = request.calibration().numpy()
    variant = f"-int8-{calibration_hash(images)}"
    target = engine_layout(request.checkpoint).onnx(request.sha256, request.tile_px, variant)
    if not target.exists():
        quantise(fp32_file, images, target)
    return BackbonePlan(engine, precision, str(target), threads)


def _torch_fp32_features(request: BackboneRequest) -> torch.Tensor:
    with torch.no_grad():
        return as_split(request.model).forward_features(request.sample[:CHECK_TILES].float()).float()


def _compare(request: BackboneRequest, backbone: Backbone, reference: torch.Tensor) -> dict[str, float]:
    features = backbone(request.sample[:CHECK_TILES]).float()
    scale = float(reference.abs().max()) or 1.0
    result = {"max_feature_rel_diff": float((features - reference).abs().max()) / scale}
    if request.head is not None:
        with torch.no_grad():
            result["max_probability_diff"] = float((request.head(features) - request.head(reference)).abs().max())
    return {k: round(v, 6) for k, v in result.items()}


def _speed_cache(request: BackboneRequest) -> tuple[Path, str]:
    """The speed cache file and this measurement's key in it."""
    key = "|".join(
        [
            cpu_signature(),
            request.sha256[:16],
            f"{request.tile_px}px",
            f"batch {len(request.sample)}",
            f"threads {scoring_threads()}",
        ]
    )
    return engine_layout(request.checkpoint).speed_json, key


def measure_rate(
    backbone: Backbone, images: torch.Tensor, min_seconds: float = MIN_TIMED_S, warm_up: bool = True
) -> float:
    """Tiles/s of ``backbone`` on ``images`` (after one warm-up batch unless ``warm_up`` is False): at least
    one timed batch and ``min_seconds``."""
    if warm_up:
        backbone(images)
    done, started = 0, time.perf_counter()
    while done < len(images) or time.perf_counter() - started < min_seconds:
        backbone(images)
        done += len(images)
    return done / (time.perf_counter() - started)


def cpu_signature() -> str:
    """The CPU model and the instruction sets engines dispatch on: speeds are cached per signature."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"{model} [{' '.join(present)}] x{os.cpu_count()}"
