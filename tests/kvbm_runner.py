"""Run the `kvbm` CLI in-process exactly as its console script does (run_app: error table, exit codes)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from typer.testing import CliRunner

from kvbm_cli._errors import run_app
from kvbm_cli.app import app


@dataclass
class Outcome:
    """Exit code and the two output streams of one `kvbm` run."""

    exit_code: int
    stdout: str
    stderr: str


def run_kvbm(*args: str, env: dict[str, str | None] | None = None) -> Outcome:
    """`kvbm ARGS...` with stdout and stderr captured apart; `env` entries set (None unsets) variables."""
    runner = CliRunner()
    saved = sys.argv
    with runner.isolation(env=env) as (stdout, stderr, _):
        sys.argv = ["kvbm", *args]
        try:
            run_app(app)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = saved
        sys.stdout.flush()
        sys.stderr.flush()
        captured = stdout.getvalue().decode(), stderr.getvalue().decode()
    return Outcome(code, *captured)
