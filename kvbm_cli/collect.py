"""Sample Prometheus /metrics endpoints (vLLM's API server, KVBM's exporter) into a long-format CSV.

The file, `<run-dir>/metrics.csv`, has one row per sample: t (unix seconds), source (the URL scraped), name
(the sample name, e.g. vllm:prefix_cache_hits_total, kvbm_offload_blocks_d2h), labels (k=v pairs sorted by
key, joined with ';'), value. pandas reads it with `pd.read_csv`; `kvbm report` plots it.

Operations:
  collect(urls, out_csv, should_stop, ...)    scrape every `interval_s` until should_stop(), then once more; also
                                              in a thread while a body runs (background), or until a duration, a
                                              file, a process's exit or Ctrl-C (collect_until)
  default_urls()                              vLLM on 8000 and KVBM's exporter
  parse_time(text) / run_window(run_dir)      unix seconds from ISO 8601 / a bench run's (start, end)
  query_prometheus(url, out_csv, start, end)  the same series from a Prometheus server (/api/v1/query_range)
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.utils import floatToGoString

from kvbm_cli import prom
from kvbm_cli.httpclient import metrics_url
from kvbm_cli._errors import CliError

COLUMNS = ("t", "source", "name", "labels", "value")
# vLLM's metrics and KVBM's; python_*/process_* of either process are left out unless --match asks for them.
DEFAULT_MATCH = r"^(vllm:|kvbm_)"


def format_labels(labels: dict[str, str]) -> str:
    """Labels as 'k=v;k2=v2', sorted by key (';' and '\\' inside values are escaped with '\\')."""
    return ";".join(f"{k}={str(v).replace(chr(92), chr(92) * 2).replace(';', chr(92) + ';')}"
                    for k, v in sorted(labels.items()))


def parse_labels(text: str) -> dict[str, str]:
    """Inverse of format_labels."""
    pairs = re.findall(r"([^;=]+)=((?:[^;\\]|\\.)*)", text) if isinstance(text, str) else []
    return {key: re.sub(r"\\(.)", r"\1", value) for key, value in pairs}


@dataclass
class CollectResult:
    """What a collection wrote: samples per source, failed scrapes per source and the last error."""

    out_csv: Path
    rows: int = 0
    scrapes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _csv_rows(out_csv: Path):
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "a", newline="") as f:
        writer = csv.writer(f)
        if f.tell() == 0:  # a new or empty file
            writer.writerow(COLUMNS)
        yield f, writer


def collect(urls: Sequence[str], out_csv: str | os.PathLike[str], should_stop: Callable[[], bool], *,
            interval_s: float = 1.0, match: str = DEFAULT_MATCH, wait: Callable[[float], object] = time.sleep,
            on_error: Callable[[str, str], None] | None = None) -> CollectResult:
    """Scrape each URL every `interval_s` into `out_csv` (appending) until `should_stop()`; then once more.

    A source that cannot be reached is retried on the next tick (the server may still be starting);
    `on_error(url, message)` is called the first time each source fails.
    """
    urls, pattern = [metrics_url(u) for u in urls], re.compile(match)
    result = CollectResult(Path(out_csv), scrapes={u: 0 for u in urls}, failures={u: 0 for u in urls})
    existed = result.out_csv.exists()
    try:
        timeout = max(1.0, min(5.0, interval_s * 2))
        with _csv_rows(result.out_csv) as (f, writer), httpx.Client(timeout=timeout) as client:
            last = False
            while True:
                last = last or should_stop()
                tick = time.monotonic()
                for url in urls:
                    t = round(time.time(), 3)
                    try:
                        samples = prom.parse(client.get(url).raise_for_status().text)
                    except (httpx.HTTPError, ValueError) as exc:
                        result.failures[url] += 1
                        message = f"{type(exc).__name__}: {exc}"
                        if on_error and url not in result.last_error:
                            on_error(url, message)
                        result.last_error[url] = message
                        continue
                    rows = [(t, url, name, format_labels(labels), floatToGoString(value))  # names matching `match`
                            for name, values in samples.items() if pattern.search(name) for labels, value in values]
                    writer.writerows(rows)
                    result.rows += len(rows)
                    result.scrapes[url] += 1
                f.flush()
                if last:
                    break
                wait(max(0.0, interval_s - (time.monotonic() - tick)))
    finally:
        if result.rows == 0 and not existed:
            result.out_csv.unlink(missing_ok=True)  # no header-only file when nothing answered
    return result


@contextlib.contextmanager
def background(urls: Sequence[str], out_csv: str | os.PathLike[str], *, interval_s: float = 1.0,
               match: str = DEFAULT_MATCH) -> Iterator[dict[str, CollectResult]]:
    """Collect in a daemon thread while the body runs; the yielded dict gets "result" when the body ends."""
    stop = threading.Event()
    box: dict[str, CollectResult] = {}
    thread = threading.Thread(target=lambda: box.__setitem__("result", collect(
        urls, out_csv, stop.is_set, interval_s=interval_s, match=match, wait=stop.wait)), name="kvbm-metrics-collect",
        daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join(timeout=30)


def collect_until(urls: Sequence[str], out_csv: str | os.PathLike[str], *, interval_s: float, match: str,
                  duration_s: float | None = None, until_file: Path | None = None, pid: int | None = None,
                  on_error: Callable[[str, str], None] | None = None) -> CollectResult:
    """`collect` until `duration_s` passed, `until_file` exists, process `pid` ended, or Ctrl-C / SIGTERM."""
    deadline = time.monotonic() + duration_s if duration_s is not None else None
    stop = threading.Event()

    def should_stop() -> bool:
        return (stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                or (until_file is not None and until_file.exists()) or (pid is not None and not pid_alive(pid)))

    handlers = ({sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        return collect(urls, out_csv, should_stop, interval_s=interval_s, match=match, wait=stop.wait,
                       on_error=on_error)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def default_urls() -> list[str]:
    """vLLM's API server on 8000 and KVBM's exporter on DYN_KVBM_METRICS_PORT (default 6880), on localhost."""
    port = os.environ.get("DYN_KVBM_METRICS_PORT", "6880").strip() or "6880"
    return ["http://127.0.0.1:8000/metrics", f"http://127.0.0.1:{port}/metrics"]


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC when no zone is given)."""
    with contextlib.suppress(ValueError):
        return float(text)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"time {text!r}: use unix seconds or ISO 8601 (e.g. 2026-11-24T18:00:00Z)") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def run_window(run_dir: Path) -> tuple[float, float] | None:
    """(start, end) of a bench run from its summary.json (started_at + duration_s), or None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        start = parse_time(str(summary["started_at"]))
        return start, start + float(summary["duration_s"])
    except (OSError, ValueError, KeyError, TypeError, CliError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (an exited child nobody has reaped yet, a zombie, counts as ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def promql_name_selector(match: str) -> str:
    """A PromQL selector for the names `match` (a Python re.search pattern, RE2-compatible) finds."""
    return '{__name__=~".*(?:' + match.replace("\\", "\\\\").replace('"', '\\"') + ').*"}'


def query_prometheus(prom_url: str, out_csv: str | os.PathLike[str], start: float, end: float, *,
                     step_s: float = 1.0, match: str = DEFAULT_MATCH, timeout_s: float = 60.0) -> CollectResult:
    """Read the matching series from a Prometheus server over [start, end] into `out_csv` (same columns).

    `source` is the series' scrape target as a URL (http://<instance>/metrics), the labels drop `job` and
    `instance`. The step grows when needed to stay under Prometheus's 11,000 points per series.
    """
    step = max(step_s, (end - start) / 10_000)
    base = prom_url.rstrip("/") if "://" in prom_url else "http://" + prom_url.rstrip("/")
    resp = httpx.get(base + "/api/v1/query_range", timeout=timeout_s, params={
        "query": promql_name_selector(match), "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    try:
        body = resp.json()  # Prometheus explains a refused query in JSON, with a 4xx status
    except ValueError:
        resp.raise_for_status()
        raise
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {resp.status_code}: {body.get('error', body)}")
    pattern = re.compile(match)
    result = CollectResult(Path(out_csv))
    with _csv_rows(result.out_csv) as (_, writer):
        for series in body["data"]["result"]:
            labels = dict(series["metric"])
            name = labels.pop("__name__", "")
            if name.endswith("_created") or not pattern.search(name):
                continue
            instance = labels.pop("instance", "")
            labels.pop("job", None)
            source = f"http://{instance}/metrics" if instance else base
            result.scrapes[source] = result.scrapes.get(source, 0) + 1
            text = format_labels(labels)
            for t, value in series["values"]:
                writer.writerow((round(float(t), 3), source, name, text, floatToGoString(float(value))))
                result.rows += 1
    return result
