"""One table that turns typed errors into one actionable line on stderr and an exit code.

Exit codes: 0 ok, 1 failed check or regression, 2 usage or configuration, 130 interrupted.
Set KVBM_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError

from kvbm.errors import ConfigError, KvbmError, StorageError, TransferError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error raised by a command: `message` is shown as one line, `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class CheckFailed(CliError):
    """A check or gate failed (exit 1)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_FAILED)


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def flag_error(exc: ValidationError) -> CliError:
    """The first problem of options validated by a pydantic model, as one line naming the flag."""
    e = exc.errors()[0]
    flag = "--" + "-".join(str(p) for p in e["loc"]).replace("_", "-")
    if e["type"] in _BOUNDS:
        return CliError(f"{flag} must be {_BOUNDS[e['type']]} {next(iter(e['ctx'].values()))}, not {e['input']}")
    return CliError(f"{flag}: {e['msg']}")


# Ordered: the first matching class decides the prefix and the exit code.
_TABLE: list[tuple[type[BaseException], str, int]] = [
    (ConfigError, "configuration error", EXIT_USAGE),
    (StorageError, "storage error", EXIT_FAILED),
    (TransferError, "transfer error", EXIT_FAILED),
    (KvbmError, "error", EXIT_FAILED),
    (FileNotFoundError, "file not found", EXIT_USAGE),
    (PermissionError, "permission denied", EXIT_USAGE),
]


def report(exc: Exception) -> int:
    """Print `exc` as one line on stderr and return its exit code."""
    if isinstance(exc, CliError):
        print(f"kvbm: {exc}", file=sys.stderr)
        return exc.code
    for cls, prefix, code in _TABLE:
        if isinstance(exc, cls):
            detail = str(exc)
            if isinstance(exc, OSError) and exc.filename:
                detail = f"{exc.filename}: {exc.strerror}"
            print(f"kvbm: {prefix}: {detail}", file=sys.stderr)
            return code
    print(f"kvbm: unexpected {type(exc).__name__}: {exc} (set KVBM_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_FAILED


def run_app(app) -> None:
    """Run a Typer app with standalone_mode off so errors pass through `report`; usage errors are one line."""
    import typer

    try:
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("kvbm: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except typer.TyperException as exc:  # click's own errors (typer vendors click): bad option, missing value
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"kvbm: usage: {exc.format_message()}{where}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except Exception as exc:  # noqa: BLE001 - the CLI edge: every error becomes one line (SystemExit passes)
        if os.environ.get("KVBM_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        sys.exit(report(exc))
    sys.exit(result if isinstance(result, int) else 0)
