#!/usr/bin/env python
"""One grid of the whole test matrix: every session's result, then cells x tests.

    python tools/matrix_report.py reports            # or: nox -s report

Reads `<folder>/nox-*.json` (nox's own `--report` of every session it ran:
success, failed, skipped or aborted, with the reason, so a cell whose install
failed, whose interpreter is missing or whose hardware is absent is listed
too), `<folder>/junit-<session>[.partN].xml` (the tests of a cell; a session
that runs pytest more than once writes parts) and the `versions-<session>.json`
written beside them, and writes `<folder>/matrix.md` (for a CI summary) and
`<folder>/matrix.html` (a self-contained page). Each test entry is pass /
fail / xfail / xpass / skip with its duration. Standard library only, so it
runs anywhere.
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
RESULT_SYMBOLS = {"success": "✅", "failed": "❌", "aborted": "❌", "skipped": "⏭️"}
PIPE, ESCAPED_PIPE = "|", "\\|"  # a reason's "|" would end its Markdown table cell
NO_TESTS_RAN = "no test report: it stopped before pytest (install or set-up)"


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


@dataclass
class Session:
    """One nox session as nox reported it: `tests-cpu(tf457-py311)`, success / failed / skipped / aborted."""

    name: str
    result: str
    reason: str
    seconds: float

    @property
    def stem(self) -> str:
        """The name its JUnit and versions files carry: tests-cpu-tf457-py311."""
        return self.name.replace("(", "-").replace(")", "")


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


def read_cells(folder: Path) -> list[Cell]:
    """One cell per session with JUnit files: its parts (junit-<session>.partN.xml) merged."""
    cells: dict[str, Cell] = {}
    for junit in sorted(folder.glob("junit-*.xml")):
        stem = junit.name.removeprefix("junit-").split(".")[0]  # session stems hold no dots
        if stem not in cells:
            versions_file = folder / f"versions-{stem}.json"
            cells[stem] = Cell(stem, json.loads(versions_file.read_text()) if versions_file.exists() else {})
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            cells[stem].outcomes[test_id(case)] = outcome_of(case)
    return list(cells.values())


def read_sessions(folder: Path) -> list[Session]:
    """Every session of the nox reports in `folder` (a session in several reports: the last one read)."""
    sessions: dict[str, Session] = {}
    for report in sorted(folder.glob("nox-*.json")):
        for entry in json.loads(report.read_text())["sessions"]:
            name = (entry.get("signatures") or [entry["name"]])[0]
            sessions[name] = Session(name, entry["result"], entry.get("reason") or "", entry.get("duration") or 0.0)
    return list(sessions.values())


def session_note(session: Session, cells: dict[str, Cell]) -> str:
    """The test counts of a session that ran tests, else why it has none."""
    cell = cells.get(session.stem)
    if cell is not None:
        return ", ".join(f"{cell.count(status)} {status}" for status in STATUSES if cell.count(status))
    if session.reason:
        return session.reason
    return NO_TESTS_RAN if session.result == "failed" else ""


def session_rows(sessions: list[Session], cells: list[Cell]) -> list[tuple[str, str, str, str]]:
    """(session, result, minutes, note) for every session nox reported, and any other cell with JUnit files."""
    by_stem = {cell.name: cell for cell in cells}
    reported = {session.stem for session in sessions}
    rows = [(session.name, f"{RESULT_SYMBOLS.get(session.result, '')} {session.result}".strip(),
             f"{session.seconds / 60:.1f} min", session_note(session, by_stem)) for session in sessions]
    rows += [(cell.name, "no nox report", "", session_note(Session(cell.name, "", "", 0.0), by_stem))
             for cell in cells if cell.name not in reported]
    return rows


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


def markdown(cells: list[Cell], sessions: list[Session]) -> str:
    """Markdown: every session's result, then the grid (a summary line per cell, versions, one row per test)."""
    lines = ["# Test matrix", "", "| session | result | time | tests or reason |", "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {result} | {minutes} | {note.replace(PIPE, ESCAPED_PIPE)} |"
              for name, result, minutes, note in session_rows(sessions, cells)]
    if not cells:
        return "\n".join(lines) + "\n"
    lines.append("")
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


def html_page(cells: list[Cell], sessions: list[Session]) -> str:
    """One self-contained HTML page (inline style, failure messages as tooltips): sessions, then the grid."""
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
    session_table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(value)}</td>" for value in row) + "</tr>"
        for row in session_rows(sessions, cells)
    )
    style = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px;text-align:left}th{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Test matrix</title><style>{style}</style>"
            f"</head><body><h1>Test matrix</h1><table><tr><th>session</th><th>result</th><th>time</th>"
            f"<th>tests or reason</th></tr>{session_table}</table>"
            f"<table><tr><th></th>{head}</tr>{summary}{versions}</table>"
            f"<table><tr><th>test</th>{head}</tr>{rows}</table></body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder holding nox-*.json, junit-*.xml and versions-*.json")
    args = parser.parse_args(argv)
    cells, sessions = read_cells(args.folder), read_sessions(args.folder)
    if not cells and not sessions:
        print(f"no nox-*.json or junit-*.xml in {args.folder}: run some sessions first "
              "(`nox --report reports/nox-<name>.json -s ...` writes the former)", file=sys.stderr)
        return 1
    (args.folder / "matrix.md").write_text(markdown(cells, sessions), encoding="utf-8")
    (args.folder / "matrix.html").write_text(html_page(cells, sessions), encoding="utf-8")
    for name, result, _, note in session_rows(sessions, cells):
        print(f"{name}: {result}; {note}")
    print(f"wrote {args.folder / 'matrix.md'} and {args.folder / 'matrix.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
