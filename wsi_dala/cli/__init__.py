"""The ``wsi-dala`` command line: thin verbs over the stages (``app`` wires them; one module per group)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsi-dala`` script (imported lazily so ``import wsi_dala.cli`` stays light)."""
    from wsi_dala.cli.app import main as app_main

    return app_main(argv)
