"""End-to-end throughput: wsi-dala vs WSInfer 0.6.1 on the same slide, same model size, same machine.

    python benchmarks/compare_wsinfer.py                                # 12,000 x 9,000 px synthetic SVS, 2 rounds
    python benchmarks/compare_wsinfer.py --width 4000 --height 3000 --rounds 1    # a quick check
    python benchmarks/compare_wsinfer.py --slide my.svs --rounds 3 --wsinfer-workers 2
    python benchmarks/compare_wsinfer.py --dala-args "--precision fp32 --reader-threads 1"
    python benchmarks/compare_wsinfer.py --dala-args "" --dala-args "--precision fp32"   # both against one WSInfer

Run it with the project's Python (the one that has wsi-dala installed). Everything it makes lies under
``benchmarks/.data`` (git-ignored):

- ``wsinfer-venv/``: WSInfer 0.6.1 in its own virtual environment, built on first use and reused while
  ``wsinfer --version`` answers 0.6.1 (``--rebuild-venv`` builds it again). It is installed as
  ``python -m pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1``, then
  ``wsinfer==0.6.1 'zarr<3' 'tiffslide<3'``: tiffslide 3 and zarr 3 changed the APIs WSInfer 0.6.1 uses.
  No further pins were needed (checked with Python 3.11: pip resolved wsinfer-zoo 0.6.3, huggingface-hub
  2.4, zarr 2.18, tiffslide 2.5, numpy 2.4, pandas 3.1 and WSInfer ran with them). The build log is
  ``compare-wsinfer/venv-build.log``.
- ``compare-wsinfer/home/``: the HOME that WSInfer runs with. wsinfer-zoo has no setting for its registry
  file, it reads ``Path.home() / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"`` (and creates that folder on
  import), so the script gives WSInfer a HOME of its own holding ``{"models": {}}`` and sets
  ``HF_HUB_OFFLINE=1``: WSInfer then never touches your home folder or the network.
- ``compare-wsinfer/models/``: a random-weight torchvision ResNet50 (2 classes), TorchScript-scripted by
  the WSInfer venv's torch, with the ``config.json`` of WSInfer's model-config schema (224 px at
  0.5 µm/px; Resize, ToTensor, Normalize), and an untrained DALAResNet50 checkpoint for wsi-dala (from
  ``write_untrained_checkpoint``: also 224 px at 0.5 µm/px).
- ``synthetic_<W>x<H>_0.25.svs``: the slide, from the same generator as ``benchmarks/tiling.py``.

Each round runs both tools as subprocesses, one after the other, and swaps which goes first every round:
``wsi-dala run SLIDE --model CKPT --out DIR -q --batch-size B [--dala-args ...]`` and
``wsinfer run --wsi-dir DIR --results-dir DIR --model-path model.pt --config config.json -n N -b B``,
each into a fresh output folder (both skip a slide whose outputs exist). A tool's time is the wall-clock
of its whole process: start-up, model load, tissue detection, tiling, reading, inference and writing its
outputs (wsi-dala also computes DT Grad-CAM, the heatmap and the QuPath GeoJSON; WSInfer writes a CSV of
probabilities). Patches are counted from the outputs, wsi-dala's from ``run.json`` (``counts.tiles``),
WSInfer's from the rows of ``model-outputs-csv/*.csv``; the two tissue detectors differ, so the counts may
too, which is why the figure compared is patches/s. Peak RSS is the child's ``ru_maxrss`` from
``os.wait4``: the largest single process of the tool, its reaped worker processes included (WSInfer's
``-n`` DataLoader workers are not added to it).

It prints the CPU model and the flags that decide the fast paths (avx2, avx512f, avx512_bf16, amx_bf16,
avx512_vnni, avx_vnni), torch's thread count, for each round and tool the seconds, patches, patches/s and
peak RSS, then the median patches/s of each tool, the ratio wsi-dala / WSInfer, and each tool's peak RSS.
Both tools use the GPU when torch sees one; the logs of every run are kept next to its outputs. The
checkpoints are reused between rounds and invocations; where wsi-dala caches work beside its checkpoint
(``<checkpoint>.*``, e.g. exported engines) the round that made it says so ("first use"): that round
includes the one-off cost, later rounds do not, so run more rounds (or run twice) for steady-state numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
WORK = DATA / "compare-wsinfer"
VENV = DATA / "wsinfer-venv"
WSINFER_VERSION = "0.6.1"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
WSINFER_PINS = [f"wsinfer=={WSINFER_VERSION}", "zarr<3", "tiffslide<3"]
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
TILE_PX = 224
TILE_MPP = 0.5
DALA = "wsi-dala"
WSINFER = "WSInfer"

# Run by the WSInfer venv's Python: the TorchScript file must come from the torch that loads it.
SCRIPT_RESNET50 = """
import sys, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None, num_classes=2).eval()
try:
    scripted = torch.jit.script(model)
except Exception:  # a torch whose scripter fails on torchvision: trace instead
    scripted = torch.jit.trace(model, torch.rand(1, 3, 224, 224))
torch.jit.save(scripted, sys.argv[1])
"""


class BenchmarkError(Exception):
    """A step failed: the message is one line, and names the log to read."""


@dataclass
class Run:
    tool: str
    round: int
    seconds: float
    patches: int
    peak_rss_mb: float
    setting: str = ""  # wsi-dala's extra flags ("" for its defaults)

    @property
    def rate(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else 0.0


def cpu_description() -> tuple[str, list[str], list[str]]:
    """CPU model name, and which of CPU_FLAGS it has and lacks (from /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, [], list(CPU_FLAGS)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return name, [f for f in CPU_FLAGS if f in flags], [f for f in CPU_FLAGS if f not in flags]


def wsinfer_env(home: Path) -> dict[str, str]:
    """WSInfer's environment: its own HOME with an empty model registry, and no Hugging Face network."""
    registry = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    if not registry.exists():
        registry.parent.mkdir(parents=True, exist_ok=True)
        registry.write_text(json.dumps({"models": {}}) + "\n")
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_HOME=str(home / ".cache" / "huggingface"))
    env["PATH"] = os.pathsep.join([str(VENV / "bin"), env.get("PATH", "")])
    return env


def last_line(log: Path) -> str:
    """The log's first `ERROR` line (pip's reason), else its last line, cut to 200 characters."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[0 if errors else -1][:200]


def wsinfer_works(venv: Path, env: dict[str, str]) -> bool:
    exe = venv / "bin" / "wsinfer"
    if not exe.exists():
        return False
    proc = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode == 0 and WSINFER_VERSION in proc.stdout


def build_venv(venv: Path, env: dict[str, str], log: Path) -> float:
    """Create the WSInfer venv (torch first, from the pinned local wheels); return the seconds it took.

    pip runs with the real HOME (its per-user config, e.g. extra indexes, lives there); WSInfer with env.
    """
    started = time.perf_counter()
    pip_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if venv.exists():
        shutil.rmtree(venv)
    python = venv / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--no-cache-dir", *TORCH_PINS],
        [str(python), "-m", "pip", "install", "--no-cache-dir", *WSINFER_PINS],
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        for step in steps:
            print(f"  {shlex.join(step)}", file=sys.stderr, flush=True)
            handle.write(f"$ {shlex.join(step)}\n")
            handle.flush()
            proc = subprocess.run(step, stdout=handle, stderr=subprocess.STDOUT, env=pip_env)
            if proc.returncode != 0:
                raise BenchmarkError(
                    f"building the WSInfer venv failed at `{shlex.join(step[1:])}` (exit {proc.returncode}): "
                    f"{last_line(log)} (full log: {log})"
                )
    if not wsinfer_works(venv, env):
        raise BenchmarkError(f"WSInfer was installed in {venv} but `wsinfer --version` fails (log: {log})")
    return time.perf_counter() - started


def write_wsinfer_model(venv: Path, folder: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A random-weight TorchScript ResNet50 and its WSInfer config.json (reused when both exist)."""
    model, config = folder / "resnet50-random.pt", folder / "config.json"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "spec_version": "1.0",
        "architecture": "resnet50",
        "num_classes": 2,
        "class_names": ["Non-tumor", "Tumor"],
        "patch_size_pixels": TILE_PX,
        "spacing_um_px": TILE_MPP,
        "transform": [
            {"name": "Resize", "arguments": {"size": TILE_PX}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        ],
    }
    config.write_text(json.dumps(spec, indent=2) + "\n")
    if not model.exists():
        partial = model.with_suffix(".partial")
        proc = subprocess.run(
            [str(venv / "bin" / "python"), "-c", SCRIPT_RESNET50, str(partial)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchmarkError(f"scripting the ResNet50 in the WSInfer venv failed: {tail}")
        partial.replace(model)
    return model, config


def write_dala_checkpoint(folder: Path) -> Path:
    path = folder / "dala-untrained.safetensors"
    if not path.exists():
        from wsi_dala.model import write_untrained_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        write_untrained_checkpoint(path.with_suffix(".partial"))  # 224 px at 0.5 µm/px
        path.with_suffix(".partial").replace(path)
    return path


def dala_command() -> list[str]:
    """`python -m wsi_dala` with this Python, or the `wsi-dala` script beside it."""
    proc = subprocess.run([sys.executable, "-m", "wsi_dala", "--version"], capture_output=True, text=True)
    if proc.returncode == 0:
        return [sys.executable, "-m", "wsi_dala"]
    script = Path(sys.executable).parent / "wsi-dala"
    if script.exists():
        return [str(script)]
    raise BenchmarkError(f"wsi-dala is not installed for {sys.executable} (pip install -e . in the repo)")


def timed(cmd: list[str], env: dict[str, str] | None, log: Path) -> tuple[float, float]:
    """Run cmd with its output to log; return its wall-clock seconds and peak RSS in MB."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(cmd)}\n")
        handle.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if proc.returncode != 0:
        raise BenchmarkError(
            f"`{shlex.join(cmd[:3])} ...` failed (exit {proc.returncode}): {last_line(log)} (log: {log})"
        )
    return seconds, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def beside(checkpoint: Path) -> set[str]:
    """What lies next to the checkpoint under its name (wsi-dala may cache exported engines there)."""
    return {p.name for p in checkpoint.parent.glob(f"{checkpoint.name}.*")}


def run_dala(
    base: list[str], slide: Path, checkpoint: Path, out: Path, batch: int, extra: list[str]
) -> tuple[Run, str]:
    """Run wsi-dala; also return a note naming any cache it made beside the checkpoint (a cold first run)."""
    log = out.with_suffix(".log")
    cmd = [*base, "run", str(slide), "--model", str(checkpoint), "--out", str(out), "-q", "--batch-size", str(batch)]
    before = beside(checkpoint)
    seconds, rss = timed([*cmd, *extra], None, log)
    made = sorted(beside(checkpoint) - before)
    note = f"; first use, made {', '.join(made)}" if made else ""
    records = sorted(out.rglob("run.json"))
    if not records:
        raise BenchmarkError(f"wsi-dala finished without a run.json under {out} (log: {log})")
    record = json.loads(records[0].read_text())
    return Run(DALA, 0, seconds, int(record["counts"]["tiles"]), rss), note


def wsinfer_command(slides: Path, out: Path, model: Path, config: Path, workers: int, batch: int) -> list[str]:
    """``wsinfer run`` on every slide in ``slides`` with a local TorchScript model and its config."""
    return [
        str(VENV / "bin" / "wsinfer"),
        "run",
        "--wsi-dir",
        str(slides),
        "--results-dir",
        str(out),
        "--model-path",
        str(model),
        "--config",
        str(config),
        "-n",
        str(workers),
        "--batch-size",
        str(batch),
    ]


def run_wsinfer(
    slides: Path, out: Path, model: Path, config: Path, workers: int, batch: int, env: dict[str, str]
) -> Run:
    log = out.with_suffix(".log")
    cmd = wsinfer_command(slides, out, model, config, workers, batch)
    seconds, rss = timed(cmd, env, log)
    tables = sorted((out / "model-outputs-csv").glob("*.csv"))
    if not tables:
        raise BenchmarkError(f"WSInfer finished without model-outputs-csv/*.csv under {out} (log: {log})")
    patches = 0
    for table in tables:
        with table.open(newline="") as handle:
            patches += max(sum(1 for _ in csv.reader(handle)) - 1, 0)  # less the header
    return Run(WSINFER, 0, seconds, patches, rss)


def dala_settings(out: Path) -> str:
    """Precision and device wsi-dala chose, from its run.json."""
    records = sorted(out.rglob("run.json"))
    if not records:
        return ""
    scoring = json.loads(records[0].read_text()).get("scoring", {})
    return f"precision {scoring.get('precision', '?')}, device {scoring.get('device', '?')}"


def slide_folder(slide: Path, folder: Path) -> Path:
    """A folder holding only the slide (WSInfer takes a folder, and every file in it must be a slide)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        entry.unlink()
    link = folder / slide.name
    try:
        link.symlink_to(slide.resolve())
    except OSError:
        shutil.copy2(slide, link)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="a slide of your own (default: a synthetic SVS)")
    parser.add_argument("--width", type=int, default=12_000, help="synthetic slide width, px at 0.25 µm/px")
    parser.add_argument("--height", type=int, default=9_000, help="synthetic slide height, px at 0.25 µm/px")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both tools, alternating which goes first")
    parser.add_argument("--wsinfer-workers", type=int, default=1, help="WSInfer's -n (DataLoader workers, >= 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="model batch size, for both tools")
    parser.add_argument(
        "--dala-args",
        action="append",
        default=None,
        help='extra wsi-dala run flags, e.g. "--precision fp32"; repeat it to run each setting in every round '
        "against the same WSInfer runs (default: one setting, wsi-dala's defaults)",
    )
    parser.add_argument("--rebuild-venv", action="store_true", help="build the WSInfer venv again")
    args = parser.parse_args()
    if args.rounds < 1 or args.wsinfer_workers < 1 or args.batch_size < 1:
        parser.error("--rounds, --wsinfer-workers and --batch-size must be at least 1")
    try:
        report(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def report(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from tiling import phase_generate

    env = wsinfer_env(WORK / "home")
    models = WORK / "models"
    if args.rebuild_venv or not wsinfer_works(VENV, env):
        print(f"building WSInfer {WSINFER_VERSION} in {VENV} ...", file=sys.stderr, flush=True)
        seconds = build_venv(VENV, env, WORK / "venv-build.log")
        print(f"built the WSInfer venv in {seconds:.0f} s", file=sys.stderr, flush=True)
        (models / "resnet50-random.pt").unlink(missing_ok=True)  # script it again with the new torch
    base = dala_command()

    slide = args.slide
    if slide is None:
        slide = DATA / f"synthetic_{args.width}x{args.height}_0.25.svs"
        if not slide.exists():
            DATA.mkdir(parents=True, exist_ok=True)
            phase_generate(slide, args.width, args.height)
    elif not slide.is_file():
        raise BenchmarkError(f"slide not found: {slide}")
    slides = slide_folder(slide, WORK / "slides")
    model, config = write_wsinfer_model(VENV, models, env)
    checkpoint = write_dala_checkpoint(models)
    settings_asked = args.dala_args or [""]

    name, have, lack = cpu_description()
    print(f"CPU: {name}, {os.cpu_count()} logical CPUs")
    print(f"CPU flags: has {' '.join(have) or '-'}; lacks {' '.join(lack) or '-'}")
    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads; CUDA available: {torch.cuda.is_available()}")
    print(f"slide: {slide}; patches of {TILE_PX} px at {TILE_MPP} µm/px, batch size {args.batch_size}")
    for setting in settings_asked:
        print(f"wsi-dala: {shlex.join([*base, 'run', '-q', *shlex.split(setting)])}")
    print(f"WSInfer {WSINFER_VERSION}: -n {args.wsinfer_workers}, random-weight TorchScript ResNet50")

    runs: list[Run] = []
    tools = [*(f"{DALA}:{index}" for index in range(len(settings_asked))), WSINFER]
    for index in range(args.rounds):
        order = tools if index % 2 == 0 else tools[::-1]
        for tool in order:
            out = WORK / "runs" / f"round{index + 1}-{tool.lower().replace(':', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            out.with_suffix(".log").unlink(missing_ok=True)
            if tool.startswith(DALA):
                setting = settings_asked[int(tool.split(":")[1])]
                run, note = run_dala(base, slide, checkpoint, out, args.batch_size, shlex.split(setting))
                run.setting = setting
                settings = f"  ({dala_settings(out)}{note})"
            else:
                run = run_wsinfer(slides, out, model, config, args.wsinfer_workers, args.batch_size, env)
                settings = ""
            run.round = index + 1
            runs.append(run)
            label = f"{DALA} {run.setting}".strip() if run.tool == DALA else run.tool
            print(
                f"round {run.round}  {label:<28} {run.seconds:8.1f} s  {run.patches:7d} patches  "
                f"{run.rate:7.1f} patches/s  peak RSS {run.peak_rss_mb:6.0f} MB{settings}",
                flush=True,
            )

    wsinfer = [r for r in runs if r.tool == WSINFER]
    wsinfer_rate = statistics.median(r.rate for r in wsinfer)
    wsinfer_peak = max(r.peak_rss_mb for r in wsinfer)
    print(f"median end-to-end: WSInfer {wsinfer_rate:.1f} patches/s, peak RSS {wsinfer_peak:.0f} MB")
    for setting in settings_asked:
        ours = [r for r in runs if r.tool == DALA and r.setting == setting]
        rate = statistics.median(r.rate for r in ours)
        ratio = rate / wsinfer_rate if wsinfer_rate > 0 else float("inf")
        print(
            f"wsi-dala {setting or '(defaults)'}: {rate:.1f} patches/s, ratio wsi-dala / WSInfer {ratio:.2f}x, "
            f"peak RSS {max(r.peak_rss_mb for r in ours):.0f} MB"
        )


if __name__ == "__main__":
    main()
