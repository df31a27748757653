"""MkDocs hook: the CLI and configuration reference pages are written from the code when the docs build
(wsi_dala.cli.reference), where the pages hold a marker."""

from __future__ import annotations

from typing import Any

MARKERS = {
    "<!-- generated: cli reference -->": "cli_reference_markdown",
    "<!-- generated: configuration reference -->": "config_reference_markdown",
    "<!-- generated: foundation presets -->": "foundation_presets_markdown",
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from wsi_dala.cli import reference

    for marker, function in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, getattr(reference, function)())
    return markdown
