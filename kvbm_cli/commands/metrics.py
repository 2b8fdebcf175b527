"""`kvbm metrics`: collect vLLM's and KVBM's metrics during a run; start and stop Prometheus + Grafana.

Operations:
  collect   sample /metrics endpoints into <run-dir>/metrics.csv (interval; duration, --until-file, --pid or
            Ctrl-C), or read the same series from a Prometheus server (--prometheus URL): kvbm_cli.collect
  up        start Prometheus and Grafana (dashboards/, Grafana on 3001, login dynamo/dynamo): kvbm_cli.containers
  down      stop and remove them
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer

from kvbm_cli import collect as collector
from kvbm_cli import containers
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._options import JsonOpt, MetricsUrlsOpt, group
from kvbm_cli._output import emit_json, note, out

metrics_app = group(help="Collect vLLM and KVBM metrics; run Prometheus and Grafana with the KVBM dashboard.")


@metrics_app.command("collect")
def collect(
    out_arg: Annotated[Path, typer.Option("--out", "-o", help="Run directory (gets metrics.csv) or a .csv path.")] = Path("."),
    url: MetricsUrlsOpt = None,
    interval: Annotated[float, typer.Option("--interval", "-i", help="Seconds between scrapes (the step with --prometheus).")] = 1.0,
    duration: Annotated[Optional[float], typer.Option("--duration", "-d", help="Stop after this many seconds.", min=0)] = None,
    until_file: Annotated[Optional[Path], typer.Option("--until-file", help="Stop once this file exists (e.g. the bench's summary.json).")] = None,
    pid: Annotated[Optional[int], typer.Option("--pid", help="Stop when this process (e.g. the bench) exits.")] = None,
    match: Annotated[str, typer.Option("--match", help="Regex of sample names to keep.")] = collector.DEFAULT_MATCH,
    prometheus: Annotated[Optional[str], typer.Option("--prometheus", help="Read the series from this Prometheus server instead of scraping.")] = None,
    start: Annotated[Optional[str], typer.Option("--start", help="With --prometheus: range start (unix s or ISO 8601); default: the run's summary.json, else --since.")] = None,
    end: Annotated[Optional[str], typer.Option("--end", help="With --prometheus: range end; default: the run's end, else now.")] = None,
    since: Annotated[float, typer.Option("--since", help="With --prometheus and no range: the last this many seconds.")] = 600.0,
    json_out: JsonOpt = False,
) -> None:
    """Sample vLLM's and KVBM's /metrics into metrics.csv next to a bench run's results."""
    if interval <= 0:
        raise CliError(f"--interval {interval}: use a positive number of seconds")
    try:
        re.compile(match)
    except re.error as exc:
        raise CliError(f"--match {match!r} is not a regular expression ({exc})") from None
    as_csv = out_arg.suffix.lower() == ".csv"  # else a run directory, which gets metrics.csv
    target = out_arg if as_csv else out_arg / "metrics.csv"
    if prometheus:
        window = None if as_csv else collector.run_window(out_arg)
        t_end = collector.parse_time(end) if end else (window[1] + 2 * interval if window else time.time())
        t_start = collector.parse_time(start) if start else (window[0] - 2 * interval if window else t_end - since)
        if t_end <= t_start:
            raise CliError(f"empty time range: --start {t_start:.0f} is not before --end {t_end:.0f}")
        try:
            result = collector.query_prometheus(prometheus, target, t_start, t_end, step_s=interval, match=match)
        except (httpx.HTTPError, ValueError) as exc:  # the connection, or Prometheus' own error answer
            raise CheckFailed(f"Prometheus at {prometheus}: {exc}") from None
        if result.rows == 0:
            raise CheckFailed(f"Prometheus at {prometheus} has no series matching {match!r} between "
                              f"{t_start:.0f} and {t_end:.0f}: is it scraping vLLM and KVBM (dashboards/prometheus.yml)?")
    else:
        urls = url or collector.default_urls()
        if pid is not None and not collector.pid_alive(pid):
            raise CliError(f"--pid {pid}: no such process")
        if duration is None and until_file is None and pid is None and sys.stderr.isatty():
            note(f"collecting {', '.join(urls)} every {interval:g} s into {target}; Ctrl-C stops")
        result = collector.collect_until(urls, target, interval_s=interval, match=match, duration_s=duration,
                                         until_file=until_file, pid=pid,
                                         on_error=lambda u, m: note(f"warning: {u}: {m} (retrying)"))
        if all(n == 0 for n in result.scrapes.values()):
            failed = "; ".join(f"{u}: {result.last_error.get(u, '?')}" for u in result.scrapes)
            raise CheckFailed(f"no source answered: {failed}")
        for u in (u for u, n in result.scrapes.items() if n == 0):
            note(f"warning: {u} never answered ({result.last_error.get(u, '?')})")
    if json_out:
        emit_json({"out": str(result.out_csv), "rows": result.rows, "sources": result.scrapes,
                   "failures": result.failures})
    else:
        how = "series" if prometheus else "scrapes"
        per_source = ", ".join(f"{u} ({n} {how})" for u, n in result.scrapes.items())
        out().print(f"wrote {result.rows} samples to {result.out_csv}: {per_source}", markup=False, soft_wrap=True)


@metrics_app.command("up")
def up(
    dashboards: Annotated[Optional[Path], typer.Option("--dashboards", help="The dashboards directory (default: the one kvbm ships).")] = None,
    grafana_port: Annotated[int, typer.Option("--grafana-port", help="Grafana's port.")] = 3001,
    prometheus_port: Annotated[int, typer.Option("--prometheus-port", help="Prometheus' port.")] = 9090,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the containers and their mounts; start nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start Prometheus (scraping vLLM on 8000 and KVBM on 6880) and Grafana with the KVBM dashboard."""
    plan = containers.containers(containers.dashboards_dir(dashboards), grafana_port, prometheus_port)
    if dry_run:
        if json_out:
            emit_json(plan)
        for c in [] if json_out else plan:
            mounts = " ".join(f"-v {src}:{v['bind']}:{v['mode']}" for src, v in c["volumes"].items())
            out().print(f"docker run -d --name {c['name']} --network host {mounts} {c['image']}", markup=False, soft_wrap=True)
        return
    client = containers.docker_client()
    for c in plan:
        containers.run_container(client, **c)
    out().print(f"Grafana http://localhost:{grafana_port} (login dynamo / dynamo, dashboard \"KVBM Dashboard\"); "
                f"Prometheus http://localhost:{prometheus_port}. Stop with `kvbm metrics down`.", markup=False)


@metrics_app.command("down")
def down() -> None:
    """Stop and remove the Prometheus and Grafana containers `kvbm metrics up` started."""
    removed = containers.remove_all(containers.docker_client())
    out().print(f"removed {', '.join(removed)}" if removed else "nothing to remove: no kvbm metrics containers",
                markup=False)
