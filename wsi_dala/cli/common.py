"""What every verb shares: the verb record, the help formatter, option groups, deprecated spellings, and
the mapping from errors to exit codes.

Each flag means one thing in every verb: ``--reader-threads`` (slide reader threads), ``--loader-workers``
(data-loading processes), ``--dask-workers`` (Dask worker processes), ``--precision`` (numeric precision),
``--threshold-method`` (how a threshold is chosen) vs ``--tile-threshold`` (a probability).
Old spellings still work for one release, with a warning.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, get_args

from wsi_dala.cli import EXIT_INTERRUPTED
from wsi_dala.core.config import (
    DEFAULT_TILE_MPP,
    DEFAULT_TILE_SIZE_PX,
    Backend,
    Precision,
    Reader,
    ScoringPrecision,
    TilingConfig,
    build,
)
from wsi_dala.core.errors import WsiDalaError
from wsi_dala.slides.reader import magnification_to_mpp

Handler = Callable[[argparse.Namespace], int]
EXIT_INPUT_ERROR = 2  # the input's fault: one line on stderr


@dataclass(frozen=True)
class Verb:
    """One ``wsi-dala`` command: ``configure(parser)`` adds its options, ``handler(args)`` runs it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Handler


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported like every other input error: one line, exit code 2, naming
    the command it was given to, the closest spelling when there is one, and that command's --help."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("wsi-dala").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_INPUT_ERROR, f"wsi-dala: error: {where}{message} (see {self.prog} --help)\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a choice (a command, --backend...), naming the closest one when there is one."""
        choices = action.choices
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
            if close:
                listed = ", ".join(map(repr, choices))
                message = f"invalid choice: {value!r} (choose from {listed}); did you mean {close[0]!r}?"
                raise argparse.ArgumentError(action, message)
        super()._check_value(action, value)

    def unrecognized(self, arguments: list[str]) -> NoReturn:
        """Options this command does not have, with the closest of its own options for each misspelt one."""
        options = [o for o in self._option_string_actions if o.startswith("--")]
        close = {a: difflib.get_close_matches(a.split("=")[0], options, n=1, cutoff=0.75) for a in arguments}
        hints = {a: m[0] for a, m in close.items() if a.startswith("--") and m}
        if len(hints) == 1:
            hint = f"; did you mean {next(iter(hints.values()))}?"
        else:
            hint = f"; did you mean {', '.join(f'{a} -> {m}' for a, m in hints.items())}?" if hints else ""
        self.error(f"unrecognized arguments: {' '.join(arguments)}{hint}")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Also records the innermost command's parser (set first, as the innermost finishes first), so an
        unknown option is reported by the command it was given to, with that command's --help."""
        parsed, extra = super().parse_known_args(args, namespace)
        if not hasattr(parsed, "command_parser"):
            parsed.command_parser = self
        return parsed, extra


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, except where the help text already says it, and names the kind of value
    an option takes (``N``, ``X``, ``PATH``, ``NAME``) where its metavar is not given, never its own name."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        kind = getattr(action.type, "__name__", "")
        if kind in ("int", "integer"):
            return "N"
        if kind in ("float", "number"):
            return "X"
        if kind in ("Path", "existing_path"):
            return "PATH"
        return "NAME"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class DeprecatedAlias(argparse.Action):
    """An old spelling of a renamed flag: works for one release, says what to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        kwargs.setdefault("default", argparse.SUPPRESS)  # never overwrite the new flag's default
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"wsi-dala: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def number_in(
    low: float, high: float, *, integer: bool = False, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (ends excluded where open); inf and NaN refused."""

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if integer else 'number'}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            ends = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {ends}")
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def deprecated_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, dest: str, **kwargs: Any
) -> None:
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, **kwargs)


def add_slide_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--reader`` and ``--slide-mpp``; ``defaults=False`` leaves them None so a config file can set them."""
    parser.add_argument(
        "--reader",
        choices=get_args(Reader),
        default="auto" if defaults else None,
        help="slide library; auto: tiffslide first for .svs/.tif/.tiff (fast parallel decoding), "
        "openslide first otherwise" + ("" if defaults else " (default: auto)"),
    )
    parser.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        metavar="UM",
        help="the slide's level-0 µm/px, overriding (or standing in for) its metadata",
    )


def add_mil_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mil",
        metavar="MODEL",
        help="an attention-MIL model (wsi-dala mil train): adds its slide probability, a slide call at its "
        "thresholds and an attention layer, from its encoder's features of each slide in --features or the "
        "output folder, computed by the run when its encoder is the --model (default: none)",
    )


def add_dicom_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dicom",
        action="store_true",
        default=None,
        help="also write the results as DICOM in the run folder's dicom/: the tumour map as a Segmentation and the "
        "regions as Bulk Simple Annotations, referencing the slide (written as DICOM first when it is not); a "
        "finished run gets them without being run again (default: off)",
    )


def add_precision_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None) -> None:
    parser.add_argument(
        "--precision",
        choices=get_args(Precision),
        default=default,
        help="numeric precision; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32"
        + ("" if default else " (default: auto)"),
    )


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (int8 included) and ``--backend``: how scoring runs the backbone."""
    parser.add_argument(
        "--precision",
        choices=get_args(ScoringPrecision),
        default=None,
        help="numeric precision of the backbone; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; "
        "int8: quantised on tiles of the slide (onnxruntime or openvino) (default: auto)",
    )
    parser.add_argument(
        "--backend",
        choices=get_args(Backend),
        default=None,
        help="engine that runs the backbone: auto measures the installed engines that offer the precision on this "
        "CPU once (cached beside the checkpoint) and takes the fastest; the head and Grad-CAM stay in torch "
        "(default: auto)",
    )
    parser.add_argument(
        "--devices",
        choices=("one", "all"),
        default=None,
        help="all: score on every visible GPU, one Dask worker each (needs dask-cuda: pip install 'wsi-dala[gpu]'); "
        "one: the --device alone (default: one)",
    )


def add_tiling_options(parser: argparse.ArgumentParser) -> None:
    """The options of `wsi-dala tile`."""
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="UM",
        help="target µm/px of the tiles when neither this nor --magnification is given (default: 0.5)",
    )
    target.add_argument(
        "--magnification",
        type=float,
        default=None,
        metavar="X",
        help="target magnification, converted as 10 µm / X (20 -> 0.5 µm/px)",
    )
    parser.add_argument("--tile-size", type=int, default=224, metavar="PX", help="tile side in pixels")
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="PX",
        help="step between tiles in tile pixels (default: the tile size, no overlap)",
    )
    add_min_tissue_option(parser, "keep tiles with at least this fraction of tissue")
    parser.add_argument(
        "--allow-upsample",
        action="store_true",
        help="upsample when the target is finer than the finest level (otherwise an error)",
    )
    parser.add_argument("--reader-threads", type=int, default=2, metavar="N", help="slide reader threads")
    deprecated_flag(parser, "--workers", "--reader-threads", dest="reader_threads", type=int)
    add_qc_option(parser, default="flag", tiling_only=True)
    add_slide_options(parser)


def add_min_tissue_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str) -> None:
    """``--min-tissue``, with the one default every command shares (the tiling settings')."""
    parser.add_argument("--min-tissue", type=float, default=TilingConfig().min_tissue, metavar="F", help=help_text)


def add_qc_option(parser: argparse.ArgumentParser, default: str | None, tiling_only: bool = False) -> None:
    """``--qc``: what quality control does with out-of-focus, folded and inked tiles (said for the command: `tile`
    stores tiles only, `run` and `batch` go on to score and export)."""
    shown = default or "flag, or `tiling.qc.mode` in --config"
    if tiling_only:
        text = (
            "flag: measure blur, folds and ink on every tile and store the measures and flags with the tiles "
            "(qc.png shows them), keeping every tile usable; exclude: the same, and the store marks flagged tiles "
            "as left out of later stages; off: measure nothing"
        )
    else:
        text = (
            "flag: mark out-of-focus, folded and inked tiles (hatched on the overlay, QC measurements on tiles and "
            "regions) and change no call; exclude: leave flagged tiles out of heatmap, regions and GeoJSON (the "
            "summary says how much tumour that removed); off: measure nothing"
        )
    parser.add_argument("--qc", choices=("flag", "exclude", "off"), default=default, help=f"{text} (default: {shown})")


def add_stain_option(parser: argparse.ArgumentParser) -> None:
    """``--stain-normalise``: map tiles to the model's reference stain before scoring."""
    parser.add_argument(
        "--stain-normalise",
        choices=("none", "macenko", "reinhard"),
        default=None,
        help="map each tile to the model card's reference stain before scoring, from the slide's stain measured "
        "once on a sample of its tiles (default: none, or `scoring.stain_normalise` in --config)",
    )


def add_uncertainty_options(parser: argparse.ArgumentParser) -> None:
    """``--tta`` and ``--mc-dropout``: a per-tile probability SD (uncertainty layer, QuPath measurement)."""
    parser.add_argument(
        "--tta",
        choices=("none", "flips", "d4"),
        default=None,
        help="test-time augmentation: average each tile's probability and Grad-CAM over its mirror images "
        "(flips: 4 views, 4x the model work) or all 8 turns and mirrors (d4: 8x); gives each tile a probability "
        "SD (default: none, or `scoring.tta` in --config)",
    )
    parser.add_argument(
        "--mc-dropout",
        type=int,
        metavar="N",
        default=None,
        help="run the model's head N more times with dropout on (the backbone's features are computed once, so "
        "this costs a few per cent); gives each tile a probability SD (default: 0 = off, or `scoring.mc_dropout`)",
    )


def tiling_from_flags(
    args: argparse.Namespace, default_mpp: float = DEFAULT_TILE_MPP, default_tile_px: int = DEFAULT_TILE_SIZE_PX
) -> TilingConfig:
    """The one mapping from tiling flags (`tile`, `train --slide`) to validated tiling settings."""
    mpp = getattr(args, "mpp", None)
    magnification = getattr(args, "magnification", None)
    if magnification is not None:
        mpp = magnification_to_mpp(magnification)
    tile_size = getattr(args, "tile_size", None)
    values = {  # `is None`, never `or`: a 0 given on the command line must be refused, not replaced
        "mpp": default_mpp if mpp is None else mpp,
        "tile_size_px": default_tile_px if tile_size is None else tile_size,
        "stride_px": getattr(args, "stride", None),
        "min_tissue": args.min_tissue,
        "allow_upsample": getattr(args, "allow_upsample", False),
        "reader": getattr(args, "reader", "auto"),
        "slide_mpp": getattr(args, "slide_mpp", None),
        "reader_threads": getattr(args, "reader_threads", 2),
        "qc": {"mode": getattr(args, "qc", "flag") or "flag"},
    }
    return build(TilingConfig, values, "command line: tiling")


def existing_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise WsiDalaError(f"{path}: {what} not found")
    return folder


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Run a verb; errors that are the input's fault become one line and exit code 2."""
    try:
        return int(handler(args) or 0)
    except WsiDalaError as exc:
        print(f"wsi-dala: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as exc:  # a file the user named is missing or cannot be read/written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"wsi-dala: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("wsi-dala: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
