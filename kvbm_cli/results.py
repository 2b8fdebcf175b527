"""Result files of a benchmark run: the fixed schema shared by `kvbm bench`, `kvbm report` and `kvbm gate`.

Layout of an artifact dir:
  requests.jsonl   one `RequestRecord` per line (warm-up requests included, marked `warmup: true`)
  summary.json     one `Summary` (statistics over the non-warm-up requests only)
  metrics.csv      the engine's metrics time series (written by the metrics collector, not here)

Operations:
  RequestRecord, Stats, Summary          pydantic models of the two files; stats_of(values), summarize(records)
  write_requests / read_requests         requests.jsonl (mode "a" appends and flushes: a dying run keeps its lines)
  measured_requests(run)                 the requests gate and report count (no warm-up, no failures)
  write_run / read_run                   both files of one artifact dir
  load_run(path) -> Run                  a run directory as DataFrames (requests, metrics.csv) for reports
  series(run, name) / kvbm_totals(run)   one metric over time / counter increases per tier pair
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, Field, ValidationError

from kvbm_cli._errors import CliError

if TYPE_CHECKING:
    import pandas as pd

REQUESTS_FILE = "requests.jsonl"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"

Workload = Literal["prefix-reuse", "multi-round", "soak", "hit-rate"]
Driver = Literal["native", "aiperf", "genai-perf"]


class RequestRecord(BaseModel, extra="forbid"):
    """One request as measured by the client (times in seconds; `start_s` is unix time)."""

    request_id: str
    run: str
    workload: Workload
    start_s: float
    ttft_s: Optional[float] = None
    itl_s: list[float] = Field(default_factory=list)
    e2e_s: Optional[float] = None
    input_tokens: int
    output_tokens: int
    prefix_id: Optional[int] = None
    user_id: Optional[int] = None
    round: Optional[int] = None
    warmup: bool = False
    error: Optional[str] = None


class Stats(BaseModel, extra="forbid"):
    """Distribution of one latency (seconds); all None when there were no values."""

    mean: Optional[float] = None
    p50: Optional[float] = None
    p90: Optional[float] = None
    p99: Optional[float] = None
    min: Optional[float] = None
    max: Optional[float] = None


class Summary(BaseModel, extra="forbid"):
    """A run's summary; statistics exclude warm-up requests and failed requests' latencies."""

    run: str
    workload: Workload
    url: str
    model: str
    driver: Driver = "native"
    started_at: str
    duration_s: float
    config: dict[str, Any] = Field(default_factory=dict)
    engine: Optional[dict[str, Any]] = None
    num_requests: int
    num_errors: int
    ttft_s: Stats
    itl_s: Stats
    e2e_s: Stats
    output_tokens_per_s: float
    input_tokens_per_s: float
    requests_per_s: float


def stats_of(values: Iterable[float | None]) -> Stats:
    """mean, p50, p90, p99, min, max of the non-None values (kvbm_cli.stats.summary: numpy's quantiles)."""
    from kvbm_cli.stats import summary

    vals = [float(v) for v in values if v is not None]
    return Stats(**{k: v for k, v in summary(vals).items() if k != "n"}) if vals else Stats()


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def summarize(records: Iterable[RequestRecord], *, run: str, workload: Workload, url: str, model: str,
              driver: Driver = "native", started_at: str | None = None, duration_s: float | None = None,
              config: dict[str, Any] | None = None, engine: dict[str, Any] | None = None) -> Summary:
    """Summary of `records` (warm-up excluded). `duration_s` defaults to first start .. last finish.

    Throughputs are over `duration_s`; tokens and requests count successful requests only.
    """
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.error is None]
    if duration_s is None:
        ends = [r.start_s + (r.e2e_s or 0.0) for r in measured]
        duration_s = max(max(ends) - min(r.start_s for r in measured), 0.0) if measured else 0.0
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return Summary(
        run=run, workload=workload, url=url, model=model, driver=driver,
        started_at=started_at or iso_now(), duration_s=duration_s, config=config or {}, engine=engine,
        num_requests=len(measured), num_errors=len(measured) - len(ok),
        ttft_s=stats_of(r.ttft_s for r in ok), itl_s=stats_of(x for r in ok for x in r.itl_s),
        e2e_s=stats_of(r.e2e_s for r in ok),
        output_tokens_per_s=per_s(sum(r.output_tokens for r in ok)),
        input_tokens_per_s=per_s(sum(r.input_tokens for r in ok)),
        requests_per_s=per_s(len(ok)),
    )


def write_requests(path: str | Path, records: Iterable[RequestRecord], mode: str = "w") -> None:
    """Write `records` as JSON lines (replacing the file, or appending with mode "a")."""
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(r.model_dump_json() + "\n" for r in records)


def read_requests(path: str | Path) -> list[RequestRecord]:
    """Records of a requests.jsonl (blank lines ignored); a bad line is a CliError naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(RequestRecord.model_validate_json(line))
                except ValidationError as exc:
                    e = exc.errors()[0]
                    where = ".".join(str(x) for x in e["loc"])
                    raise CliError(f"{path}:{lineno}: not a kvbm request record ({where}: {e['msg']})") from None
    return out


def find_requests(run: str | Path) -> Path:
    """The requests.jsonl of a run directory (or the path itself); CliError when there is none."""
    path = Path(run)
    path = path / REQUESTS_FILE if path.is_dir() else path
    if not path.is_file():
        raise CliError(f"{run}: no requests.jsonl (pass `kvbm bench ... --artifact-dir` directories)")
    return path


def measured_requests(run: str | Path) -> list[RequestRecord]:
    """Neither warm-up nor failed requests of a run directory or requests.jsonl: what gates and reports count."""
    return [r for r in read_requests(find_requests(run)) if not r.warmup and not r.error]


def write_run(artifact_dir: str | Path, records: Iterable[RequestRecord], summary: Summary) -> None:
    (d := Path(artifact_dir)).mkdir(parents=True, exist_ok=True)
    write_requests(d / REQUESTS_FILE, records)
    (d / SUMMARY_FILE).write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_run(artifact_dir: str | Path) -> tuple[list[RequestRecord], Summary]:
    d = Path(artifact_dir)
    return read_requests(d / REQUESTS_FILE), Summary.model_validate_json((d / SUMMARY_FILE).read_text(encoding="utf-8"))


# --- a run directory as tables (kvbm report, its plots) -----------------------------------------------------

# KVBM counters (Dynamo's names) -> tier pair shown in the plots and the table.
TIER_PAIRS = {
    "kvbm_offload_blocks_d2h": "offload G1->G2 (device->host)",
    "kvbm_offload_blocks_h2d": "offload G2->G3 (host->disk)",
    "kvbm_offload_blocks_d2d": "offload G1->G3 (device->disk)",
    "kvbm_onboard_blocks_h2d": "onboard G2->G1 (host->device)",
    "kvbm_onboard_blocks_d2d": "onboard G3->G1 (disk->device)",
}
HIT_GAUGES = {"kvbm_host_cache_hit_rate": "KVBM host hit rate (window)",
              "kvbm_disk_cache_hit_rate": "KVBM disk hit rate (window)"}
HIT_COUNTERS = {("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"): "vLLM G1 prefix hits (cumulative)",
                ("vllm:external_prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total"):
                    "connector hits of G1 misses (cumulative)"}


@dataclass
class Run:
    """One bench run: its label, measured requests (warm-up and errors excluded), summary and metrics."""

    path: Path
    name: str
    requests: pd.DataFrame
    warmup: int
    errors: int
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    rows: list = field(default_factory=list)  # the measured RequestRecords (what gate's samples() take)


def load_run(path: str | Path) -> Run:
    """Read requests.jsonl (required), summary.json and metrics.csv of one run directory."""
    import pandas as pd

    req_path = find_requests(path)
    root, records = req_path.parent, read_requests(req_path)
    if not records:
        raise CliError(f"{req_path}: no requests (is it a `kvbm bench` requests.jsonl?)")
    measured = [r for r in records if not r.warmup and not r.error]
    frame = pd.DataFrame([r.model_dump() for r in measured], columns=list(RequestRecord.model_fields))
    summary = json.loads((root / SUMMARY_FILE).read_text()) if (root / SUMMARY_FILE).is_file() else {}
    metrics = None
    if (root / METRICS_FILE).is_file():
        metrics = pd.read_csv(root / METRICS_FILE, keep_default_na=False, na_values=["NaN"],
                              dtype={"labels": str, "source": str, "name": str})
        metrics["value"] = pd.to_numeric(metrics["value"], errors="coerce")
        if metrics.empty:
            metrics = None
    return Run(root, str(summary.get("run") or records[0].run or root.name), frame, sum(r.warmup for r in records),
               sum(bool(r.error) and not r.warmup for r in records), summary, metrics, measured)


def series(run: Run, name: str) -> pd.Series:
    """One metric summed over its labels per scrape time (seconds since the first sample of the file)."""
    import pandas as pd

    frame = None if run.metrics is None else run.metrics[run.metrics["name"] == name]
    if frame is None or frame.empty:
        return pd.Series(dtype=float)
    # One scrape of one source shares one t: sum its label sets there. Several sources (e.g. two KVBM
    # instances) are scraped at slightly different times: align on the union of times, carry values forward.
    by_source = frame.pivot_table(index="t", columns="source", values="value", aggfunc="sum")  # sorted by t
    values = by_source.ffill().sum(axis=1, min_count=1)
    values.index = values.index - run.metrics["t"].min()
    return values


def kvbm_totals(run: Run) -> dict[str, float]:
    """Counter increases over the collection: blocks per tier pair, matched tokens, vLLM cache hit tokens."""
    totals: dict[str, float] = {}
    for name in [*TIER_PAIRS, "kvbm_matched_tokens", "kvbm_load_failures_total", *itertools.chain(*HIT_COUNTERS)]:
        values = series(run, name)
        if len(values):
            totals[name] = float(values.iloc[-1] - values.iloc[0]) if len(values) > 1 else float(values.iloc[-1])
    return totals
