"""The reports of a batch: ``batch.json`` (everything), ``report.md`` whose first table is the review list,
``review.csv``, the same list for a spreadsheet, and ``report.html``, the list as a page (sortable, a small
overlay per slide in its folder, links that open each slide in ``wsi-dala view``).

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


THUMBNAIL_PX = 240  # longest side of report.html's pictures
VIEWER_ADDRESS = "http://127.0.0.1:8765"  # where `wsi-dala view BATCH_OUT` serves by default


def write_thumbnails(layout: BatchLayout, outcomes: list[SlideOutcome]) -> dict[str, str]:
    """A small copy of each run's overlay.png in its slide's folder, beside the report (thousands of slides stay
    a light page); by slide id, the path relative to the report."""
    from PIL import Image

    from wsi_dala.core.fileio import save_png_atomic
    from wsi_dala.core.layout import RunLayout

    written = {}
    for outcome in outcomes:
        overlay = RunLayout(Path(outcome.output)).overlay_png if outcome.output else None
        if overlay is None or not overlay.is_file():
            continue
        target = layout.slide(outcome.slide_id).report_thumbnail
        if not target.exists() or target.stat().st_mtime < overlay.stat().st_mtime:
            with Image.open(overlay) as image:
                small = image.convert("RGB")
                small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                save_png_atomic(target, small)
        written[outcome.slide_id] = f"{outcome.slide_id}/{target.name}"
    return written


def write_report_html(layout: BatchLayout, archive: Path, result: BatchResult, rows: list[dict[str, Any]]) -> None:
    """The review list as one HTML page that opens from disk: a row per slide (failed ones too, at the end),
    sortable by a click on a column, with its thumbnail and a link into the viewer."""
    from html import escape

    by_output = {o.output: o for o in result.outcomes}
    pictures = write_thumbnails(layout, result.outcomes)
    body = []
    for row in rows:
        outcome = by_output.get(row["output"])
        sid = outcome.slide_id if outcome else ""
        picture = f'<img src="{escape(pictures[sid])}" alt="">' if sid in pictures else ""
        cells = [
            str(row["rank"]),
            picture,
            f'<a href="{VIEWER_ADDRESS}/run/{escape(sid)}/">{escape(str(row["slide"]))}</a>',
            escape(str(row["status"])),
            escape(str(row["call"])),
            _shown(row["tumour_mm2"], 3),
            _shown(row["tumour_percent_of_tissue"], 1),
            _shown(row["largest_region_mm2"], 3),
            _shown(row["top_k_mean_probability"], 2),
            _shown(row["slide_probability"], 2),
            escape(str(row["warnings"])),
        ]
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    for outcome in result.outcomes:
        if not outcome.answer:
            body.append(
                f'<tr class="failed"><td></td><td></td><td>{escape(Path(outcome.path).name)}</td>'
                f'<td>{escape(outcome.status)}</td><td colspan="7">{escape(outcome.error or "")}</td></tr>'
            )
    page = HTML_PAGE.format(
        archive=escape(str(archive)),
        finished=escape(datetime.now(timezone.utc).isoformat(timespec="seconds")),
        viewer=escape(VIEWER_ADDRESS),
        out=escape(str(layout.root)),
        rows="\n".join(body),
    )
    with atomic_open(layout.report_html, "w", encoding="utf-8") as handle:
        handle.write(page)


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsi-dala batch report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; }}
th {{ cursor: pointer; background: #f3f3f3; user-select: none; }}
td img {{ max-width: 240px; max-height: 180px; display: block; }}
tr.failed td {{ color: #a00; }}
</style></head>
<body>
<h1>wsi-dala batch report</h1>
<p>Archive <code>{archive}</code>, finished {finished}. Slides called tumour first, then indeterminate, then no
tumour; within each, the largest tumour burden first. Click a column to sort by it.</p>
<p>The slide links open the zoomable viewer while <code>wsi-dala view {out}</code> is running on this machine
({viewer}).</p>
<table id="review">
<thead><tr><th>#</th><th>overlay</th><th>slide</th><th>status</th><th>call</th><th>tumour mm²</th><th>% of tissue</th>
<th>largest mm²</th><th>top-10 p</th><th>MIL p</th><th>warnings</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<script>
document.querySelectorAll("#review th").forEach((header, column) => {{
  header.addEventListener("click", () => {{
    const body = document.querySelector("#review tbody");
    const rows = Array.from(body.rows);
    const down = header.dataset.order !== "down";
    const key = (row) => {{
      const text = row.cells[column] ? row.cells[column].textContent.trim() : "";
      const number = parseFloat(text);
      return Number.isNaN(number) ? text : number;
    }};
    rows.sort((a, b) => {{
      const x = key(a), y = key(b);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return down ? -order : order;
    }});
    header.dataset.order = down ? "down" : "up";
    rows.forEach((row) => body.appendChild(row));
  }});
}});
</script>
</body></html>
"""


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
    write_report_html(layout, archive, result, rows)
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
