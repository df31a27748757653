"""``python -m wsi_dala``: the same as the ``wsi-dala`` command."""

from wsi_dala.cli import console_main

console_main()
