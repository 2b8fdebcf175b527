"""`kvbm metrics`: collect vLLM's and KVBM's metrics during a run; start and stop Prometheus + Grafana.

Operations:
  collect   sample /metrics endpoints into <run-dir>/metrics.csv (interval; duration, --until-file, --pid or
            Ctrl-C), or read the same series from a Prometheus server (--prometheus URL)
  up        start Prometheus and Grafana (dashboards/, Grafana on 3001, login dynamo/dynamo) with the Docker SDK
  down      stop and remove them
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvbm_cli import collect as collector
from kvbm_cli._options import JsonOpt, MetricsUrlsOpt, group
from kvbm_cli._output import emit_json, err, out
from kvbm_cli._data import data_dir
from kvbm_cli._errors import CheckFailed, CliError

metrics_app = group(help="Collect vLLM and KVBM metrics; run Prometheus and Grafana with the KVBM dashboard.",
                          no_args_is_help=True)

LABEL = "kvbm.metrics"
PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
GRAFANA_IMAGE = "grafana/grafana:11.3.0"


def default_urls() -> list[str]:
    """vLLM's API server on 8000 and KVBM's exporter on DYN_KVBM_METRICS_PORT (default 6880), on localhost."""
    port = os.environ.get("DYN_KVBM_METRICS_PORT", "6880").strip() or "6880"
    return ["http://127.0.0.1:8000/metrics", f"http://127.0.0.1:{port}/metrics"]


def csv_path(out_arg: Path) -> Path:
    """A .csv path is used as is; anything else is a run directory that gets metrics.csv."""
    return out_arg if out_arg.suffix.lower() == ".csv" else out_arg / "metrics.csv"


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"time {text!r}: use unix seconds or ISO 8601 (e.g. 2026-11-24T18:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def run_window(run_dir: Path) -> tuple[float, float] | None:
    """(start, end) of a bench run from its summary.json (started_at + duration_s), or None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        start = parse_time(str(summary["started_at"]))
        return start, start + float(summary["duration_s"])
    except (OSError, ValueError, KeyError, TypeError, CliError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (an exited child nobody has reaped yet, a zombie, counts as ended)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@metrics_app.command("collect")
def collect_cmd(
    out_arg: Annotated[Path, typer.Option("--out", "-o", help="Run directory (gets metrics.csv) or a .csv path.")] = Path("."),
    url: MetricsUrlsOpt = None,
    interval: Annotated[float, typer.Option("--interval", "-i", help="Seconds between scrapes (the step with --prometheus).")] = 1.0,
    duration: Annotated[Optional[float], typer.Option("--duration", "-d", help="Stop after this many seconds.")] = None,
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
    if duration is not None and duration < 0:
        raise CliError(f"--duration {duration}: use a non-negative number of seconds")
    target = csv_path(out_arg)


    try:
        re.compile(match)
    except re.error as exc:
        raise CliError(f"--match {match!r} is not a regular expression ({exc})") from None
    if prometheus:
        window = run_window(out_arg) if out_arg.suffix.lower() != ".csv" else None
        t_end = parse_time(end) if end else (window[1] + 2 * interval if window else time.time())
        t_start = parse_time(start) if start else (window[0] - 2 * interval if window else t_end - since)
        if t_end <= t_start:
            raise CliError(f"empty time range: --start {t_start:.0f} is not before --end {t_end:.0f}")
        try:
            result = collector.query_prometheus(prometheus, target, t_start, t_end, step_s=interval, match=match)
        except Exception as exc:  # httpx errors and Prometheus' own error answer
            import httpx

            if isinstance(exc, (httpx.HTTPError, ValueError)):
                raise CheckFailed(f"Prometheus at {prometheus}: {exc}") from None
            raise
        if result.rows == 0:
            raise CheckFailed(f"Prometheus at {prometheus} has no series matching {match!r} between "
                              f"{t_start:.0f} and {t_end:.0f}: is it scraping vLLM and KVBM (dashboards/prometheus.yml)?")
    else:
        urls = url or default_urls()
        deadline = time.monotonic() + duration if duration is not None else None
        if pid is not None and not _pid_alive(pid):
            raise CliError(f"--pid {pid}: no such process")

        def should_stop() -> bool:
            return ((deadline is not None and time.monotonic() >= deadline)
                    or (until_file is not None and until_file.exists())
                    or (pid is not None and not _pid_alive(pid)))

        if deadline is None and until_file is None and pid is None and sys.stderr.isatty():
            err().print(f"collecting {', '.join(urls)} every {interval:g} s into {target}; Ctrl-C stops", markup=False)
        # Ctrl-C and SIGTERM end the collection like a stop condition: one last scrape, then the summary.
        stopped = {"flag": False}
        handlers = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda *_: stopped.__setitem__("flag", True))
        try:
            result = collector.collect(urls, target, lambda: stopped["flag"] or should_stop(), interval_s=interval,
                                       match=match, wait=lambda s: _sleep_unless(stopped, s),
                                       on_error=lambda u, m: err().print(f"warning: {u}: {m} (retrying)", markup=False))
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if all(n == 0 for n in result.scrapes.values()):
            failed = "; ".join(f"{u}: {result.last_error.get(u, '?')}" for u in result.scrapes)
            raise CheckFailed(f"no source answered: {failed}")
        for u in result.empty_sources:
            err().print(f"warning: {u} never answered ({result.last_error.get(u, '?')})", markup=False)
    if json_out:
        out().print_json(json.dumps({"out": str(result.out_csv), "rows": result.rows, "sources": result.scrapes,
                                     "failures": result.failures}))
    else:
        how = "series" if prometheus else "scrapes"
        per_source = ", ".join(f"{u} ({n} {how})" for u, n in result.scrapes.items())
        out().print(f"wrote {result.rows} samples to {result.out_csv}: {per_source}", markup=False, soft_wrap=True)


def _sleep_unless(stopped: dict, seconds: float) -> None:
    """Sleep in short steps so a stop request ends the wait early."""
    until = time.monotonic() + seconds
    while not stopped["flag"] and (left := until - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def dashboards_dir(given: Path | None = None) -> Path:
    """The shipped dashboards/ (or `given`), with its compose file."""
    path = given or data_dir("dashboards")
    if not (path / "prometheus.yml").is_file() or not (path / "grafana" / "dashboards").is_dir():
        raise CliError(f"{path} is not kvbm's dashboards directory (prometheus.yml, grafana/); pass --dashboards DIR")
    return path


def docker_client():
    """A connected Docker SDK client, or one clear line saying why there is none."""
    try:
        import docker
    except ModuleNotFoundError:
        raise CliError("the Docker SDK for Python is not installed: pip install docker") from None
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - DockerException, requests' and urllib3's connection errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckFailed(f"no Docker engine reachable at {where} ({reason}): start Docker or set DOCKER_HOST, "
                          "or run `docker compose -f dashboards/docker-compose.yml up -d` where Docker runs") from None
    return client


def containers(folder: Path, grafana_port: int = 3001, prometheus_port: int = 9090) -> list[dict]:
    """The two containers `kvbm metrics up` runs: name, image and the keyword arguments of containers.run."""
    grafana = folder / "grafana"
    return [
        {"name": "kvbm-prometheus", "image": PROMETHEUS_IMAGE,
         "command": ["--config.file=/etc/prometheus/prometheus.yml", f"--web.listen-address=:{prometheus_port}"],
         "volumes": {str(folder / "prometheus.yml"): {"bind": "/etc/prometheus/prometheus.yml", "mode": "ro"}}},
        {"name": "kvbm-grafana", "image": GRAFANA_IMAGE,
         "environment": {"GF_SERVER_HTTP_PORT": str(grafana_port), "GF_SECURITY_ADMIN_USER": "dynamo",
                         "GF_SECURITY_ADMIN_PASSWORD": "dynamo", "GF_USERS_ALLOW_SIGN_UP": "false",
                         "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/kvbm.json",
                         "KVBM_PROMETHEUS_URL": f"http://127.0.0.1:{prometheus_port}"},
         "volumes": {str(grafana / "provisioning"): {"bind": "/etc/grafana/provisioning", "mode": "ro"},
                     str(grafana / "dashboards"): {"bind": "/var/lib/grafana/dashboards", "mode": "ro"}}},
    ]


def _run(client, name: str, image: str, **kwargs):
    import docker

    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        err().print(f"pulling {image} ...", markup=False)
        client.images.pull(image)
    return client.containers.run(image, name=name, detach=True, network_mode="host", labels={LABEL: "1"},
                                 restart_policy={"Name": "unless-stopped"}, **kwargs)


@metrics_app.command("up")
def up_cmd(
    dashboards: Annotated[Optional[Path], typer.Option("--dashboards", help="The dashboards directory (default: the one kvbm ships).")] = None,
    grafana_port: Annotated[int, typer.Option("--grafana-port", help="Grafana's port.")] = 3001,
    prometheus_port: Annotated[int, typer.Option("--prometheus-port", help="Prometheus' port.")] = 9090,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the containers and their mounts; start nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start Prometheus (scraping vLLM on 8000 and KVBM on 6880) and Grafana with the KVBM dashboard."""
    plan = containers(dashboards_dir(dashboards), grafana_port, prometheus_port)
    if dry_run:
        if json_out:
            emit_json(plan)
        for c in [] if json_out else plan:
            mounts = " ".join(f"-v {src}:{v['bind']}:{v['mode']}" for src, v in c["volumes"].items())
            out().print(f"docker run -d --name {c['name']} --network host {mounts} {c['image']}", markup=False, soft_wrap=True)
        return
    client = docker_client()
    for c in plan:
        _run(client, **c)
    out().print(f"Grafana http://localhost:{grafana_port} (login dynamo / dynamo, dashboard \"KVBM Dashboard\"); "
                f"Prometheus http://localhost:{prometheus_port}. Stop with `kvbm metrics down`.", markup=False)


@metrics_app.command("down")
def down_cmd() -> None:
    """Stop and remove the Prometheus and Grafana containers `kvbm metrics up` started."""
    client = docker_client()
    removed = []
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}=1"}):
        container.remove(force=True)
        removed.append(container.name)
    out().print(f"removed {', '.join(sorted(removed))}" if removed else "nothing to remove: no kvbm metrics containers",
                markup=False)
