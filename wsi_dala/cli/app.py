"""Builds the ``wsi-dala`` parser from an explicit list of verbs, and runs one.

Errors that are the input's fault print one line, ``wsi-dala: error: <file>: <problem>``, and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from wsi_dala import __version__
from wsi_dala.cli import batch, features, generative, mil, models, pipeline, pretraining, slides, training, view
from wsi_dala.cli.common import EXIT_INTERRUPTED, Formatter, Parser, Verb, run_handler

VERBS: tuple[Verb, ...] = (
    *pipeline.VERBS,
    *batch.VERBS,
    *models.VERBS,
    *features.VERBS,
    *training.VERBS,
    *pretraining.VERBS,
    *generative.VERBS,
    *mil.VERBS,
    *view.VERBS,
    *slides.VERBS,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="wsi-dala",
        description="Whole-slide tumour-probability heatmaps with DALAResNet50 and DT Grad-CAM, for QuPath.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"wsi-dala {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb in VERBS:
        verb_parser = sub.add_parser(verb.name, help=verb.help, description=verb.help, formatter_class=Formatter)
        verb_parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
        verb_parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        verb.configure(verb_parser)
        verb_parser.set_defaults(handler=verb.handler)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.captureWarnings(True)  # library warnings (shapely, zarr, torch) go through logging, not raw stderr
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "wsi-dala: %(levelname)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("wsi_dala").setLevel(logging.WARNING)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)  # shown with --verbose
    else:
        for noisy in ("PIL", "matplotlib", "distributed", "fsspec", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _Interrupts:
    """The first Ctrl-C unwinds normally (outputs stay consistent); any further one exits at once, instead of
    interrupting the clean-up (which in torch's threads aborts with a C++ error, rc 134)."""

    seen = False

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        if cls.seen:
            print("wsi-dala: interrupted twice; exiting now. Rerun the same command to resume", file=sys.stderr)
            os._exit(EXIT_INTERRUPTED)
        cls.seen = True
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.unrecognized(unknown)
    _configure_logging(args.verbose)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        _Interrupts.seen = False
        signal.signal(signal.SIGINT, _Interrupts.handle)
    try:
        code = run_handler(args.handler, args)
    except KeyboardInterrupt:  # raised while the handler was reporting an earlier one
        code = EXIT_INTERRUPTED
    if in_main_thread and code == EXIT_INTERRUPTED:
        # Interrupted and cleaned up: a further Ctrl-C while the interpreter shuts down changes nothing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code
