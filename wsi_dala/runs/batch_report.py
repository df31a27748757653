"""The reports of a batch: ``batch.json`` (everything), ``report.md`` whose first table is the review list, and
``review.csv``, the same list for a spreadsheet.

The review list puts first the slides a pathologist should read first: called tumour, then indeterminate
(the thresholds could not decide, or QC or stain warnings kept a low slide from "no tumour"), then no
tumour; within each, the largest tumour burden first. Failed slides are listed apart, with their error.
Slide names come from the archive, not from us: in Markdown they are escaped, and in the CSV a cell that a
spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``) is quoted as text.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_dala.core.fileio import atomic_open, write_json_atomic
from wsi_dala.core.layout import BatchLayout
from wsi_dala.model.slide_thresholds import CALL_INDETERMINATE, CALL_NONE, CALL_TUMOUR

if TYPE_CHECKING:
    from wsi_dala.runs.archive import BatchResult, SlideOutcome

CALL_ORDER = {CALL_TUMOUR: 0, CALL_INDETERMINATE: 1, CALL_NONE: 2}
REVIEW_COLUMNS = (
    "rank",
    "slide",
    "call",
    "tumour_mm2",
    "tumour_percent_of_tissue",
    "regions",
    "largest_region_mm2",
    "largest_region_diameter_mm",
    "top_k_mean_probability",
    "slide_probability",
    "warnings",
    "call_reason",
    "status",
    "output",
)


def review_order(outcomes: list[SlideOutcome]) -> list[SlideOutcome]:
    """The slides with a slide answer, those to read first at the top."""
    answered = [o for o in outcomes if o.answer]
    return sorted(
        answered,
        key=lambda o: (CALL_ORDER.get(o.answer.get("call", ""), 1), -_number(o.answer.get("tumour_area_mm2")), o.path),
    )


def review_rows(outcomes: list[SlideOutcome]) -> list[dict[str, Any]]:
    rows = []
    for rank, outcome in enumerate(review_order(outcomes), start=1):
        answer = outcome.answer
        share = answer.get("tumour_share_of_tissue")
        rows.append(
            {
                "rank": rank,
                "slide": Path(outcome.path).name,
                "call": answer.get("call", ""),
                "tumour_mm2": answer.get("tumour_area_mm2"),
                "tumour_percent_of_tissue": round(100 * share, 2) if isinstance(share, (int, float)) else None,
                "regions": answer.get("regions"),
                "largest_region_mm2": answer.get("largest_region_mm2"),
                "largest_region_diameter_mm": answer.get("largest_region_diameter_mm"),
                "top_k_mean_probability": answer.get("top_k_mean_probability"),
                "slide_probability": answer.get("slide_probability"),
                "warnings": "; ".join(outcome.quality),
                "call_reason": answer.get("call_reason", ""),
                "status": outcome.status,
                "output": outcome.output,
            }
        )
    return rows


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _cell(text: Any) -> str:
    """Text for one cell of a Markdown table: a newline, a pipe or a backtick in a slide's name must not break
    the row."""
    flat = " ".join(str(text).split())
    return flat.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def _spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate (``=HYPERLINK(...)`` in a slide's name) is kept as text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def _shown(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def write_review_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _spreadsheet_safe(value) for key, value in row.items()})


def review_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["No slide has a slide-level answer yet.", ""]
    lines = [
        "| # | slide | call | tumour mm² | % of tissue | largest mm² | top-k p | warnings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['rank']} | {_cell(row['slide'])} | {row['call']} | {_shown(row['tumour_mm2'], 3)} | "
        f"{_shown(row['tumour_percent_of_tissue'], 1)} | {_shown(row['largest_region_mm2'], 3)} | "
        f"{_shown(row['top_k_mean_probability'], 2)} | {_cell(row['warnings'])} |"
        for row in rows
    ]
    return [*lines, ""]


def write_reports(layout: BatchLayout, archive: Path, result: BatchResult) -> None:
    counts = result.counts()
    summary = {
        "archive": str(archive.resolve()),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 3),
        "counts": counts,
        "slides": [o.to_dict() for o in result.outcomes],
    }
    rows = review_rows(result.outcomes)
    write_review_csv(layout.review_csv, rows)
    write_json_atomic(layout.batch_json, summary)
    calls = {call: sum(row["call"] == call for row in rows) for call in CALL_ORDER}
    lines = [
        "# wsi-dala batch report",
        "",
        f"Archive `{_cell(archive)}` — finished {summary['finished']} in {result.seconds:.1f} s: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f". Calls: {calls[CALL_TUMOUR]} tumour, {calls[CALL_INDETERMINATE]} indeterminate, "
        f"{calls[CALL_NONE]} no tumour.",
        "",
        f"## Review list (also `{layout.review_csv.name}`)",
        "",
        *review_table(rows),
    ]
    if result.failed:
        lines += ["## Failures", "", "| slide | attempts | error |", "|---|---|---|"]
        lines += [f"| {_cell(o.path)} | {o.attempts} | {_cell(o.error or '')} |" for o in result.failed]
        lines.append("")
    flagged = [o for o in result.outcomes if o.quality]
    if flagged:
        lines += ["## Quality", ""]
        lines += [f"- {_cell(o.slide_id)}: {_cell('; '.join(o.quality))}" for o in flagged]
        lines.append("")
    lines += [
        "## Slides",
        "",
        "| status | slides |",
        "|---|---|",
        *[f"| {status} | {n} |" for status, n in sorted(counts.items())],
        "",
        "| slide | id | status | tiles | seconds | output | also reached as |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(Path(o.path).name)} | {o.slide_id} | {o.status} | {o.tiles} | {o.seconds:.1f} | "
        f"{_cell(o.output)} | {_cell(', '.join(Path(a).name for a in o.aliases))} |"
        for o in result.outcomes
    ]
    with atomic_open(layout.report_md, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
