"""`kvbm doctor`, `kvbm doctor disk` and `kvbm doctor store`: can KVBM run here, use this directory, this store.

The checks are kvbm_cli.doctor's; this module renders them (a table, or --json) and
exits 1 when a check fails (CI can gate on it), 2 for bad options; warnings do not fail.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvbm.config import KvbmConfig
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._options import JsonOpt, StoreUrlOpt, group
from kvbm_cli._output import emit_json, out, table
from kvbm_cli.doctor import DEFAULT_BLOCK_BYTES, Check, disk_checks, env_checks, store_checks, verdict

doctor_app = group(help="Check this machine and a disk-cache directory for KVBM; exit 1 when a check fails.",
                   no_args_is_help=False, invoke_without_command=True)


def _show(checks: list[Check], title: str, subject: str, extra: dict[str, Any], as_json: bool) -> None:
    """Print the report (table or JSON) and raise CheckFailed when a check failed."""
    ok, line = verdict(checks, subject)
    if as_json:
        emit_json({"ok": ok, "verdict": line, "checks": [asdict(c) for c in checks], **extra})
    else:
        style = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "dim"}
        out().print(table(title, ["check", "status", "detail", "fix"],
                          [(c.name, f"[{style[c.status]}]{c.status}[/]", c.detail, c.fix) for c in checks]))
        if ok:
            out().print(line)
    if not ok:
        raise CheckFailed(line)


@doctor_app.command("disk")
def disk(
    target: Annotated[Optional[Path], typer.Option("--dir", help="Directory to check (default: DYN_KVBM_DISK_CACHE_DIR, else /tmp/).")] = None,
    disk_gb: Annotated[Optional[float], typer.Option(help="Disk cache GB to check free space for (default: DYN_KVBM_DISK_CACHE_GB).", min=0)] = None,
    workers: Annotated[int, typer.Option(help="Workers (TP ranks) that each create a cache file of that size.", min=1)] = 1,
    size: Annotated[int, typer.Option("--size", help="MiB written and read in the throughput test (0 skips it).", min=0)] = 1024,
    block_bytes: Annotated[int, typer.Option(help="KV block bytes for the random reads (see `kvbm size`).", min=1)] = DEFAULT_BLOCK_BYTES,
    random_reads: Annotated[int, typer.Option(help="Number of random KV-block reads.", min=0)] = 256,
    remove_stale: Annotated[bool, typer.Option(help="Remove cache files left by dead processes of this host.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Can KVBM keep its disk cache in this directory, and how fast is it."""
    config = KvbmConfig.from_env(check_paths=False)
    if disk_gb is not None:
        config = config.model_copy(update={"disk_cache_gb": disk_gb})
    directory = (target or config.disk_cache_dir).expanduser()
    checks, facts = disk_checks(directory, config, size_bytes=size << 20, block_bytes=block_bytes,
                                num_random=random_reads, workers=workers, remove_stale=remove_stale,
                                show_progress=not as_json)
    _show(checks, f"kvbm doctor disk {directory}", f"disk cache directory {directory}", facts, as_json)


@doctor_app.command("store")
def store(
    url: StoreUrlOpt = None,
    blocks: Annotated[int, typer.Option(help="Values of each size put and read back in the throughput test.",
                                        min=1)] = 16,
    as_json: JsonOpt = False,
) -> None:
    """Can the shared tier (G4) use this store: reachable, version, maxmemory and policy, latency, throughput."""
    if not url:
        raise CliError("give --url redis://host:port/0 (or set DYN_KVBM_REMOTE_URL)")
    checks, facts = store_checks(url, secret=os.environ.get("DYN_KVBM_REMOTE_SECRET") or None, blocks=blocks)
    _show(checks, f"kvbm doctor store {facts['url']}", f"shared store {facts['url']}", facts, as_json)


@doctor_app.callback(invoke_without_command=True)
def doctor(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port the engine will serve on (checked free).", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Workers (TP ranks) that each allocate DYN_KVBM_CPU_CACHE_GB.", min=1)] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Every DYN_KVBM_* variable explained, RAM, pinned-memory limit, GPU, versions, ports."""
    if ctx.invoked_subcommand is not None:
        return
    checks, rows = env_checks(dict(os.environ), port, workers)
    if not as_json:
        out().print(table("DYN_KVBM_* variables", ["variable", "set to", "in effect", "meaning"],
                          [(r["name"], "-" if r["raw"] is None else repr(r["raw"]), r["value"], r["meaning"])
                           for r in rows]))
    _show(checks, "kvbm doctor", "environment", {"variables": rows}, as_json)
