#!/usr/bin/env python
"""One grid of the whole test matrix: cells x tests, from the JUnit files the sessions wrote.

    python tools/matrix_report.py reports            # or: nox -s report

Reads `<folder>/junit-<session>.xml` (one per cell run) and the
`versions-<session>.json` written beside it, and writes
`<folder>/matrix.md` (for a CI summary) and `<folder>/matrix.html` (a
self-contained page). Each entry is pass / fail / xfail / xpass / skip with
its duration. Standard library only, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("pass", "fail", "xfail", "xpass", "skip")
SYMBOLS = {"pass": "✅", "fail": "❌", "xfail": "⚠️ xfail", "xpass": "❌ xpass", "skip": "⏭️ skip"}
COLOURS = {"pass": "#d8f5d8", "fail": "#f8d0d0", "xfail": "#fff1c2", "xpass": "#f8d0d0", "skip": "#e6e6e6"}


@dataclass
class Outcome:
    status: str
    seconds: float
    message: str = ""


@dataclass
class Cell:
    """One session's run: its name, resolved versions and the outcome of every test."""

    name: str
    versions: dict
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes.values())


def test_id(case: ElementTree.Element) -> str:
    """tests.test_data::test_x (pytest's classname is the module path, dotted)."""
    classname = case.get("classname", "")
    return f"{classname}::{case.get('name')}" if classname else case.get("name", "?")


def outcome_of(case: ElementTree.Element) -> Outcome:
    seconds = float(case.get("time") or 0.0)
    for tag in ("failure", "error"):
        element = case.find(tag)
        if element is not None:
            message = element.get("message") or ""
            status = "xpass" if "XPASS(strict)" in message else "fail"
            return Outcome(status, seconds, message)
    skipped = case.find("skipped")
    if skipped is not None:
        status = "xfail" if skipped.get("type") == "pytest.xfail" else "skip"
        return Outcome(status, seconds, skipped.get("message") or "")
    return Outcome("pass", seconds)


def read_cell(junit: Path) -> Cell:
    stem = junit.stem.removeprefix("junit-")
    versions_file = junit.with_name(f"versions-{stem}.json")
    versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}
    cell = Cell(stem, versions)
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        cell.outcomes[test_id(case)] = outcome_of(case)
    return cell


def read_cells(folder: Path) -> list[Cell]:
    return [read_cell(path) for path in sorted(folder.glob("junit-*.xml"))]


def all_tests(cells: list[Cell]) -> list[str]:
    return sorted({test for cell in cells for test in cell.outcomes})


def version_rows(cells: list[Cell]) -> list[tuple[str, list[str]]]:
    names = []
    for cell in cells:
        names += [name for name in cell.versions if name not in names]
    return [(name, [str(cell.versions.get(name, "")) for cell in cells]) for name in names]


def entry(outcome: Outcome | None) -> str:
    if outcome is None:
        return "–"
    return f"{SYMBOLS[outcome.status]} {outcome.seconds:.1f}s"


def markdown(cells: list[Cell]) -> str:
    """The grid as Markdown: a summary line per cell, versions, then one row per test."""
    lines = ["# Test matrix", ""]
    header = "| | " + " | ".join(f"`{cell.name}`" for cell in cells) + " |"
    rule = "| --- |" + " --- |" * len(cells)
    lines += [header, rule]
    for status in STATUSES:
        lines.append(f"| {status} | " + " | ".join(str(cell.count(status)) for cell in cells) + " |")
    for name, values in version_rows(cells):
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    lines += ["", header, rule]
    for test in all_tests(cells):
        lines.append(f"| `{test}` | " + " | ".join(entry(cell.outcomes.get(test)) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def html_page(cells: list[Cell]) -> str:
    """The grid as one self-contained HTML page (inline style, failure messages as tooltips)."""
    def cell_html(outcome: Outcome | None) -> str:
        if outcome is None:
            return "<td>–</td>"
        title = html.escape(outcome.message[:500], quote=True)
        return (f'<td style="background:{COLOURS[outcome.status]}" title="{title}">'
                f"{outcome.status} {outcome.seconds:.1f}s</td>")

    head = "".join(f"<th>{html.escape(cell.name)}</th>" for cell in cells)
    summary = "".join(
        f"<tr><th>{status}</th>" + "".join(f"<td>{cell.count(status)}</td>" for cell in cells) + "</tr>"
        for status in STATUSES
    )
    versions = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>"
        for name, values in version_rows(cells)
    )
    rows = "".join(
        f"<tr><th>{html.escape(test)}</th>" + "".join(cell_html(cell.outcomes.get(test)) for cell in cells) + "</tr>"
        for test in all_tests(cells)
    )
    style = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px;text-align:left}th{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Test matrix</title><style>{style}</style>"
            f"</head><body><h1>Test matrix</h1><table><tr><th></th>{head}</tr>{summary}{versions}</table>"
            f"<table><tr><th>test</th>{head}</tr>{rows}</table></body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder holding junit-*.xml and versions-*.json")
    args = parser.parse_args(argv)
    cells = read_cells(args.folder)
    if not cells:
        print(f"no junit-*.xml in {args.folder}: run some test sessions first", file=sys.stderr)
        return 1
    (args.folder / "matrix.md").write_text(markdown(cells), encoding="utf-8")
    (args.folder / "matrix.html").write_text(html_page(cells), encoding="utf-8")
    for cell in cells:
        counts = ", ".join(f"{cell.count(status)} {status}" for status in STATUSES if cell.count(status))
        print(f"{cell.name}: {counts}")
    print(f"wrote {args.folder / 'matrix.md'} and {args.folder / 'matrix.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
