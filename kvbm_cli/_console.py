"""Where command output goes: results on stdout, diagnostics and progress bars on stderr.

Operations:
  out() / err()          rich consoles for stdout and stderr (120 columns when not a terminal)
  progress(disable)      a byte-counting progress bar on stderr, shown only on a terminal
  JsonOpt                the shared --json option
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for tools instead of tables.")]


def out() -> Console:
    """A console on the current stdout (looked up now, so test runners that swap it see the output)."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120, highlight=False)


def err() -> Console:
    """A console on the current stderr for notes and warnings."""
    return Console(file=sys.stderr, width=None if sys.stderr.isatty() else 120, highlight=False)


def progress(disable: bool = False) -> Progress:
    """A progress bar on stderr; disabled when asked (e.g. --json) or when stderr is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err(), transient=True, disable=disable or not sys.stderr.isatty())
