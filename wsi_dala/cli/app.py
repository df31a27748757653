"""Builds the ``wsi-dala`` parser from an explicit list of verbs, and runs one.

Errors that are the input's fault print one line, ``wsi-dala: error: <file>: <problem>``, and exit 2.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from wsi_dala import __version__
from wsi_dala.cli import batch, pipeline, slides, training
from wsi_dala.cli.common import Formatter, Verb, run_handler

VERBS: tuple[Verb, ...] = (*pipeline.VERBS, *batch.VERBS, *training.VERBS, *slides.VERBS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "wsi-dala: %(levelname)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("wsi_dala").setLevel(logging.WARNING)
    else:
        for noisy in ("PIL", "matplotlib", "distributed", "fsspec", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return run_handler(args.handler, args)
