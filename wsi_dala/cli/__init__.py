"""The ``wsi-dala`` command line: thin verbs over the stages (``app`` wires them; one module per group).

May import: any package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (imported lazily so ``import wsi_dala.cli`` stays light)."""
    from wsi_dala.core.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread allocates (see wsi_dala.core.memory)
    from wsi_dala.cli.app import main as app_main

    return app_main(argv)


def console_main() -> None:
    """The ``wsi-dala`` script and ``python -m wsi_dala``.

    After a Ctrl-C has been handled (outputs consistent, locks released) the process ends at once: during a
    normal interpreter shutdown Python restores the default SIGINT action, so a second Ctrl-C arriving then
    would kill it by signal instead of exiting with 130.
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
