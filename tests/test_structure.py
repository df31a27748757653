"""The shape of the package: packages by role that import only what their docstrings allow, torch only where a
network runs, no import cycles, output paths in core/layout.py, array names and attribute keys in
tiling/store.py, verbs registered explicitly, one meaning per flag."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("wsi_dala", "qupath_export")
TORCH_FREE = (
    "wsi_dala.slides.reader",
    "wsi_dala.tissue.detect",
    "wsi_dala.tissue.qc",
    "wsi_dala.tissue.qc_figure",
    "wsi_dala.tissue.stain",
    "wsi_dala.tiling.grid",
    "wsi_dala.tiling.tiler",
    "wsi_dala.tiling.store",
    "wsi_dala.outputs.heatmap",
    "wsi_dala.outputs.geojson",
    "wsi_dala.core.layout",
    "wsi_dala.core.config",
    "wsi_dala.model.calibration",
    "wsi_dala.model.card",
    "wsi_dala.model.checked_weights",
    "wsi_dala.inference.streaming",
    "wsi_dala.runs.pipeline",  # torch loads in the background while the first tiles are read
    "wsi_dala.runs.archive",
    "wsi_dala.cli",
    "wsi_dala.cli.app",
    "qupath_export.geojson",
    "qupath_export.annotations",
    "qupath_export.polygons",
)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} imports torch{result.stderr}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _module_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours imported when ``path`` is imported (not inside functions or TYPE_CHECKING)."""
    found: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def test_no_import_cycles():
    modules = _sources()
    graph = {name: _module_level_imports(path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


PACKAGE_ROOT = ROOT / "wsi_dala"
MAX_ROOT_ENTRIES = 16  # packages by role, plus __init__ and __main__


def _wings() -> list[str]:
    return sorted(p.name for p in PACKAGE_ROOT.iterdir() if (p / "__init__.py").exists())


def _may_import(package: str) -> set[str] | None:
    """The packages (or ``package.module`` names) a package's docstring allows; None: any."""
    doc = ast.get_docstring(ast.parse((PACKAGE_ROOT / package / "__init__.py").read_text())) or ""
    match = re.search(r"^May import: (.+?)(?: \(.*)?\.$", doc, re.M)
    assert match, f"wsi_dala/{package}/__init__.py: its docstring says what it may import ('May import: ...')"
    if match.group(1) == "any package":
        return None
    return {name.strip() for name in match.group(1).split(",")}


def _imports_anywhere(path: Path) -> set[str]:
    """Every ``wsi_dala.*`` module a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsi_dala."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("wsi_dala.")}
    return found


def test_the_package_root_holds_packages_by_role():
    entries = [p.name for p in PACKAGE_ROOT.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= MAX_ROOT_ENTRIES, sorted(entries)
    assert {p.name for p in PACKAGE_ROOT.glob("*.py")} == {"__init__.py", "__main__.py"}


@pytest.mark.parametrize("package", _wings())
def test_each_package_imports_only_what_its_docstring_allows(package):
    allowed = _may_import(package)
    if allowed is None:
        return
    offenders = []
    for path in (PACKAGE_ROOT / package).rglob("*.py"):
        for module in _imports_anywhere(path):
            target = module.split(".")[1]
            dotted = ".".join(module.split(".")[1:3])
            if target != package and target not in allowed and dotted not in allowed:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, f"wsi_dala/{package} may import {sorted(allowed)} only:\n" + "\n".join(offenders)


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string literal (f-string parts joined), with its line."""
    literals = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            literals.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            literals.append((node.lineno, text))
    return literals


# A file name with a stem (bare suffixes such as ".pt" are input checks, not outputs).
OUTPUT_NAME = re.compile(r"^\.?[\w{}-][\w{}.-]*\.(json|png|zarr|csv|pt|safetensors|geojson|gz|md|lock|partial)$")


def test_output_file_names_live_in_layout_only():
    offenders = []
    for name, path in _sources().items():
        if name == "wsi_dala.core.layout" or not name.startswith("wsi_dala"):
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{line}: {text!r}"
            for line, text in _string_literals(path)
            if OUTPUT_NAME.match(text)
        ]
    assert not offenders, "output paths outside wsi_dala/core/layout.py:\n" + "\n".join(offenders)


STORE_ARRAYS = {"tiles", "coords", "tissue_fraction", "tissue_mask", "tile_chunks_done", "scores", "cams"}
# Keys only the tile store uses (generic words such as "class_names" also name run.json and metrics fields).
STORE_ONLY = {"tile_chunks_done", "score_chunks_done", "chunk_tiles", "tile_size_l0", "cam_grid", "scoring_key"}
STORE_ONLY |= {"scores_complete", "tiling_key", "mask_downsample", "read_size_level_px", "stride_l0"}
STORE_ONLY |= {"qc_ink", "qc_fold", "qc_edge_blur_um", "qc_blur", "qc_flags", "ink_mask", "fold_mask"}


def _store_spellings(path: Path) -> list[tuple[int, str]]:
    """Store-only keys anywhere, and any ``x["coords"]``-style subscript by an array name."""
    found = [(line, text) for line, text in _string_literals(path) if text in STORE_ONLY]
    for node in ast.walk(ast.parse(path.read_text())):
        key = node.slice if isinstance(node, ast.Subscript) else None
        if isinstance(key, ast.Constant) and key.value in STORE_ARRAYS:
            found.append((node.lineno, key.value))
    return found


def test_store_names_and_keys_live_in_store_only():
    offenders = []
    for name, path in _sources().items():
        if name == "wsi_dala.tiling.store" or not name.startswith("wsi_dala"):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line}: {text!r}" for line, text in _store_spellings(path)]
    assert not offenders, "tile-store names outside wsi_dala/tiling/store.py:\n" + "\n".join(offenders)


def test_every_verb_is_registered_explicitly():
    from wsi_dala.cli.app import VERBS, build_parser

    names = [verb.name for verb in VERBS]
    expected = ["run", "demo", "batch", "models", "train", "evaluate", "calibrate", "cam", "export-model", "info"]
    expected += ["tile", "synthesize", "pretrain", "gan", "features", "mil", "view", "export-dicom"]
    assert sorted(names) == sorted(expected)
    assert len(set(names)) == len(names)
    help_text = build_parser().format_help()
    assert all(name in help_text for name in names)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["tile", "s.svs", "--out", "o", "--workers", "3"], "reader_threads", 3),
        (["batch", "a", "--out", "o", "--workers", "2"], "dask_workers", 2),
        (["train", "--out", "o", "--workers", "4"], "loader_workers", 4),
        (["train", "--out", "o", "--no-amp"], "precision", "fp32"),
        (["train", "--out", "o", "--tile-mpp", "1.0"], "mpp", 1.0),
        (["train", "--out", "o", "--magnification", "40X"], "breakhis_magnification", "40X"),
        (["cam", "x.png", "--model", "m", "--out", "o", "--threshold", "otsu"], "threshold_method", "otsu"),
    ],
)
def test_old_flag_spellings_still_work_with_a_warning(capsys, argv, dest, value):
    from wsi_dala.cli.app import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert "is deprecated; use --" in capsys.readouterr().err


def test_new_flag_defaults_survive_when_the_old_spelling_is_absent():
    from wsi_dala.cli.app import build_parser

    parser = build_parser()
    assert parser.parse_args(["tile", "s.svs", "--out", "o"]).reader_threads == 2
    assert parser.parse_args(["train", "--out", "o"]).precision == "auto"
    assert parser.parse_args(["batch", "a", "--out", "o"]).dask_workers == 1


def test_the_readmes_links_lead_somewhere():
    """The README points into docs/ (built with mkdocs --strict in CI, which checks the links inside it)."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local and all((ROOT / t).is_file() for t in local), [t for t in local if not (ROOT / t).is_file()]
    assert len(readme.splitlines()) <= 200
