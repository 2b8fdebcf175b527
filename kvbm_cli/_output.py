"""Where command output goes: results on stdout, diagnostics on stderr, progress bars only on a terminal.

Operations:
  out() / err() / note(text)  rich consoles for stdout and stderr (120 columns in a pipe) / one line on stderr
  emit_json(obj)              one JSON object on stdout: what every --json prints
  progress(kind, disable)     a progress bar on stderr ("bytes", "requests" or "spinner"), off unless a terminal
  table(title, columns, rows) / markdown(columns, rows)   a rich Table / a Markdown table ("name>": right-aligned)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table


def out() -> Console:
    """A console on the current stdout (looked up now, so test runners that swap it see the output)."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120, highlight=False)


def err() -> Console:
    return Console(file=sys.stderr, width=None if sys.stderr.isatty() else 120, highlight=False)


def note(text: str) -> None:
    err().print(text, markup=False, soft_wrap=True)


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]] = ()) -> Table:
    """A table titled `title` holding `rows`; a column written "name>" is right-aligned."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col.rstrip(">"), justify="right" if col.endswith(">") else "left", overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def markdown(columns: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table; a column written "name>" is right-aligned, a '|' inside a cell is escaped."""
    lines = ["| " + " | ".join(c.rstrip(">") for c in columns) + " |",
             "|" + "|".join("---:" if c.endswith(">") else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(kind: str = "bytes", disable: bool = False):
    """A transient progress bar on stderr; disabled when asked (e.g. --json) or when stderr is not a terminal."""
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TransferSpeedColumn)

    columns = {"bytes": (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()),
               "requests": (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[note]}")),
               "spinner": (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())}[kind]
    return Progress(*columns, console=err(), transient=True, disable=disable or not sys.stderr.isatty())
