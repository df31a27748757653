"""``python -m wsi_dala``: the same as the ``wsi-dala`` command."""

import sys

from wsi_dala.cli import main

sys.exit(main())
