"""`kvbm report RUN_DIR... --out DIR`: one self-contained HTML page, a Markdown summary and PNGs for bench runs.

Reads each run's requests.jsonl and summary.json (`kvbm bench`) and, when present, metrics.csv
(`kvbm metrics collect`). The first run is the reference: every other run gets ratios against it with
bootstrap confidence intervals (kvbm_cli.stats, the same estimators as `kvbm gate`).

Operations:
  load_run(path) -> Run           requests, summary and metrics of one run directory
  summary_table(runs, ...)        per-run statistics and ratios against the first run (a DataFrame)
  kvbm_totals(run)                blocks offloaded/onboarded per tier pair and hit counts from metrics.csv
  plot_*(runs, path)              ttft_cdf, ttft_over_time, itl, throughput, hit_rates, tier_traffic PNGs
  build_report(runs, out_dir)     everything above into out_dir: report.html, report.md, summary.csv, *.png
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from kvbm_cli import gate as gating
from kvbm_cli import results
from kvbm_cli._options import JsonOpt
from kvbm_cli._output import out
from kvbm_cli._errors import CliError
from kvbm_cli.bench import hit_rate
from kvbm_cli.collect import parse_labels
from kvbm_cli.stats import bootstrap_ratio, ecdf

# Metric of the summary table -> shown name; all come from gate's metric specs so report and gate agree.
TABLE_METRICS = ("ttft_p50", "ttft_p90", "ttft_p99", "ttft_mean", "itl_p50", "tpot_p50", "e2e_p50",
                 "output_tokens_per_s")
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
    all_rows: int
    warmup: int
    errors: int
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    rows: list = field(default_factory=list)  # the measured RequestRecords (what gate's samples() take)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read requests.jsonl (required; the one reader, kvbm_cli.results), summary.json and metrics.csv."""
    req_path = results.find_requests(path)
    root, records = req_path.parent, results.read_requests(req_path)
    if not records:
        raise CliError(f"{req_path}: no requests (is it a `kvbm bench` requests.jsonl?)")
    measured = [r for r in records if results.is_measured(r)]
    frame = pd.DataFrame([r.model_dump() for r in measured], columns=list(results.RequestRecord.model_fields))
    summary = json.loads((root / results.SUMMARY_FILE).read_text()) if (root / results.SUMMARY_FILE).is_file() else {}
    metrics = None
    if (root / results.METRICS_FILE).is_file():
        metrics = pd.read_csv(root / results.METRICS_FILE, keep_default_na=False, na_values=["NaN"],
                              dtype={"labels": str, "source": str, "name": str})
        metrics["value"] = pd.to_numeric(metrics["value"], errors="coerce")
        if metrics.empty:
            metrics = None
    warm = sum(r.warmup for r in records)
    return Run(root, str(summary.get("run") or records[0].run or root.name), frame, len(records), warm,
               sum(bool(r.error) and not r.warmup for r in records), summary, metrics, measured)


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            run.name = f"{run.name} ({run.path.name})" if run.path.name != run.name else f"{run.name} #{seen[run.name] + 1}"
        seen[run.name] = seen.get(run.name, 0) + 1


# ---------------------------------------------------------------- metrics.csv helpers

def series(run: Run, name: str, label_filter: dict[str, str] | None = None) -> pd.Series:
    """One metric summed over its labels per scrape time (seconds since the first sample of the file)."""
    if run.metrics is None:
        return pd.Series(dtype=float)
    frame = run.metrics[run.metrics["name"] == name]
    if label_filter:
        keep = frame["labels"].map(lambda text: all(parse_labels(text).get(k) == v for k, v in label_filter.items()))
        frame = frame[keep]
    if frame.empty:
        return pd.Series(dtype=float)
    # One scrape of one source shares one t: sum its label sets there. Several sources (e.g. two KVBM
    # instances) are scraped at slightly different times: align on the union of times, carry values forward.
    t0 = run.metrics["t"].min()
    per_source = [g.groupby("t")["value"].sum() for _, g in frame.groupby("source")]
    if len(per_source) == 1:
        values = per_source[0]
    else:
        values = pd.concat(per_source, axis=1).sort_index().ffill().sum(axis=1, min_count=1)
    values.index = values.index - t0
    return values.sort_index()


def kvbm_totals(run: Run) -> dict[str, float]:
    """Counter increases over the collection: blocks per tier pair, matched tokens, vLLM cache hit tokens."""
    totals: dict[str, float] = {}
    names = list(TIER_PAIRS) + ["kvbm_matched_tokens", "kvbm_load_failures_total", "vllm:prefix_cache_hits_total",
                                "vllm:prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total",
                                "vllm:external_prefix_cache_queries_total"]
    for name in names:
        values = series(run, name)
        if len(values):
            totals[name] = float(values.iloc[-1] - values.iloc[0]) if len(values) > 1 else float(values.iloc[-1])
    return totals


# ---------------------------------------------------------------- tables

def _fmt(value: float, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    return f"{value:,.1f} {unit}"


def summary_table(runs: list[Run], *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Rows: metrics; per run a value column and, after the first, 'ratio [CI]' against the first run."""
    records = []
    base = runs[0]
    for name in TABLE_METRICS:
        spec = gating.metric_spec(name)
        base_sample = gating.samples(base.rows, spec)
        row: dict[str, Any] = {"metric": name, "better": spec.direction}
        for i, run in enumerate(runs):
            sample = gating.samples(run.rows, spec)
            value = spec.statistic(sample) if len(sample) else float("nan")
            row[run.name] = _fmt(value, spec.unit)
            if i == 0:
                continue
            col = f"{run.name} / {base.name}"
            if len(sample) >= 2 and len(base_sample) >= 2:
                ci = bootstrap_ratio(base_sample, sample, spec.statistic, n_boot=n_boot, seed=seed, confidence=confidence)
                word = ""
                if ci.low > 1 or ci.high < 1:
                    higher = ci.low > 1
                    word = " better" if higher == (spec.direction == gating.HIGHER) else " worse"
                row[col] = f"{ci.ratio:.3f} [{ci.low:.3f}, {ci.high:.3f}]{word}"
            else:
                row[col] = "n/a"
        records.append(row)
    counts: dict[str, Any] = {"metric": "requests (measured/warm-up/errors)", "better": ""}
    for run in runs:
        counts[run.name] = f"{len(run.requests)}/{run.warmup}/{run.errors}"
    records.insert(0, counts)
    for metric, label in (("kvbm_offload_blocks_d2h", "blocks offloaded G1->G2"),
                          ("kvbm_offload_blocks_h2d", "blocks offloaded G2->G3"),
                          ("kvbm_onboard_blocks_h2d", "blocks onboarded G2->G1"),
                          ("kvbm_onboard_blocks_d2d", "blocks onboarded G3->G1"),
                          ("kvbm_matched_tokens", "tokens matched by KVBM")):
        values = {run.name: kvbm_totals(run).get(metric) for run in runs}
        if any(v is not None for v in values.values()):
            records.append({"metric": label, "better": "",
                            **{k: ("n/a" if v is None else f"{v:,.0f}") for k, v in values.items()}})
    return pd.DataFrame.from_records(records).fillna("")


def notes(runs: list[Run]) -> list[str]:
    """Plain-language findings: errors, runs where KVBM never onboarded, missing metrics."""
    lines = []
    for run in runs:
        if run.errors:
            lines.append(f"{run.name}: {run.errors} request(s) failed and are left out.")
        if run.metrics is None:
            lines.append(f"{run.name}: no metrics.csv (run `kvbm metrics collect --out {run.path}` beside the bench "
                         "for hit rates and tier traffic).")
            continue
        totals = kvbm_totals(run)
        offloaded = totals.get("kvbm_offload_blocks_d2h")
        onboarded = sum(totals.get(k, 0.0) for k in ("kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d"))
        if offloaded is None:
            continue
        if offloaded == 0:
            lines.append(f"{run.name}: KVBM offloaded no blocks: it was not in the path (connector off, or "
                         "DYN_KVBM_CPU_CACHE_GB unset?).")
        elif onboarded == 0:
            lines.append(f"{run.name}: KVBM offloaded {offloaded:,.0f} blocks but onboarded none: the engine's own "
                         "cache held every reused prefix (or nothing was reused), so no TTFT gain is expected.")
        else:
            lines.append(f"{run.name}: KVBM onboarded {onboarded:,.0f} blocks "
                         f"({totals.get('kvbm_matched_tokens', 0):,.0f} tokens not recomputed).")
    return lines


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_ttft_cdf(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, color in zip(runs, _colors(len(runs))):
        x, p = ecdf(run.requests["ttft_s"].astype(float) * 1000)
        if len(x):
            x, p = np.r_[x[0], x], np.r_[0.0, p]
            ax.step(x, p, where="post", color=color, label=f"{run.name} (n={len(x)})")
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    _log_if_wide(ax, pd.concat([r.requests["ttft_s"] for r in runs]).astype(float) * 1000)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _log_if_wide(ax, values: pd.Series, axis: str = "x") -> None:
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def plot_ttft_over_time(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for run, color in zip(runs, _colors(len(runs))):
        frame = run.requests.dropna(subset=["ttft_s"]).sort_values("start_s")
        if frame.empty:
            continue
        t = frame["start_s"].astype(float) - float(frame["start_s"].min())
        ax.plot(t, frame["ttft_s"].astype(float) * 1000, marker="o", markersize=3, linewidth=1, color=color,
                label=run.name)
    ax.set_xlabel("request start (s since the first measured request)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT per request over time (spikes: prefixes recomputed)")
    _log_if_wide(ax, pd.concat([r.requests["ttft_s"] for r in runs]).astype(float) * 1000, axis="y")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _itl_values(run: Run) -> np.ndarray:
    values = [v for lst in run.requests["itl_s"] if isinstance(lst, list) for v in lst
              if isinstance(v, (int, float)) and math.isfinite(v)]
    return np.asarray(values, dtype=float)


def plot_itl(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    everything = []
    for run, color in zip(runs, _colors(len(runs))):
        values = _itl_values(run) * 1000
        everything.append(values)
        x, p = ecdf(values)
        if len(x):
            label = f"{run.name} (p50 {np.median(x):.1f} ms, n={len(x)})"
            ax.step(np.r_[x[0], x], np.r_[0.0, p], where="post", color=color, label=label)
    ax.set_xlabel("inter-token latency (ms)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("ITL CDF (all output tokens)")
    if everything:
        _log_if_wide(ax, pd.Series(np.concatenate(everything)))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_throughput(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for run, color in zip(runs, _colors(len(runs))):
        frame = run.requests.dropna(subset=["start_s", "e2e_s", "output_tokens"])
        if frame.empty:
            continue
        t0 = float(frame["start_s"].min())
        done = frame["start_s"].astype(float) + frame["e2e_s"].astype(float) - t0
        span = max(float(done.max()), 1e-3)
        width = max(span / 30.0, 1.0)
        edges = np.arange(0.0, span + width, width)
        tokens, _ = np.histogram(done, bins=edges, weights=frame["output_tokens"].astype(float))
        ax.step(edges[:-1], tokens / width, where="post", color=color,
                label=f"{run.name} ({frame['output_tokens'].sum() / span:,.1f} tok/s overall)")
    ax.set_xlabel("time (s since the first measured request)")
    ax.set_ylabel("output tokens/s (completed)")
    ax.set_title("Output throughput over time")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_hit_rates(runs: list[Run], path: Path) -> Path | None:
    with_metrics = [r for r in runs if r.metrics is not None]
    if not with_metrics:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    styles = ["-", "--", ":", "-."]
    drawn = 0
    for run, color in zip(runs, _colors(len(runs))):
        if run.metrics is None:
            continue
        curves = []
        for i, ((hits, queries), label) in enumerate(HIT_COUNTERS.items()):
            h, q = series(run, hits), series(run, queries)
            if len(h) and len(q):
                both = pd.concat([h - h.iloc[0], q - q.iloc[0]], axis=1).dropna()
                rate = (both.iloc[:, 0] / both.iloc[:, 1].where(both.iloc[:, 1] > 0)).dropna()
                curves.append((rate, label, styles[i]))
        for i, (gauge, label) in enumerate(HIT_GAUGES.items()):
            values = series(run, gauge)
            if len(values):
                curves.append((values, label, styles[2 + i]))
        for values, label, style in curves:
            if len(values):
                ax.plot(values.index, values.values, linestyle=style, color=color, label=f"{run.name}: {label}")
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time (s since metrics collection started)")
    ax.set_ylabel("hit rate")
    ax.set_title("Cache hit rates (vLLM prefix cache, KVBM tiers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_tier_traffic(runs: list[Run], path: Path) -> Path | None:
    with_kvbm = [r for r in runs if r.metrics is not None and (r.metrics["name"].isin(list(TIER_PAIRS))).any()]
    if not with_kvbm:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(with_kvbm), 1, figsize=(8, 3.0 * len(with_kvbm) + 0.6), squeeze=False, sharex=True)
    colors = _colors(len(TIER_PAIRS))
    for ax, run in zip(axes[:, 0], with_kvbm):
        for (name, label), color in zip(TIER_PAIRS.items(), colors):
            values = series(run, name)
            if len(values):
                ax.plot(values.index, values.values - values.iloc[0], color=color, label=label,
                        linestyle="-" if name.startswith("kvbm_offload") else "--")
        ax.set_ylabel("blocks (cumulative)")
        ax.set_title(f"{run.name}: KVBM blocks moved per tier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("time (s since metrics collection started)")
    return _save(fig, path)


# ---------------------------------------------------------------- documents

def _run_line(run: Run) -> str:
    s = run.summary
    parts = [f"{k}={s[k]}" for k in ("workload", "model", "driver", "url") if s.get(k)]
    if s.get("duration_s") is not None:
        parts.append(f"duration {float(s['duration_s']):.1f} s")
    return f"{run.name}: {run.path}" + (f" ({', '.join(parts)})" if parts else "")


def _md_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}"
        "code{background:#f3f3f3;padding:1px 4px}")


def build_report(runs: list[Run], out_dir: str | os.PathLike[str], *, n_boot: int = 2000, seed: int = 0,
                 title: str = "KVBM benchmark report") -> dict[str, Any]:
    """Write report.html (self-contained), report.md, summary.csv and the PNGs; returns what was written."""
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    _unique_names(runs)
    table = summary_table(runs, n_boot=n_boot, seed=seed)
    table.to_csv(out_path / "summary.csv", index=False)
    findings = notes(runs)
    plots = [
        ("TTFT CDF", plot_ttft_cdf(runs, out_path / "ttft_cdf.png")),
        ("TTFT per request over time", plot_ttft_over_time(runs, out_path / "ttft_over_time.png")),
        ("Inter-token latency", plot_itl(runs, out_path / "itl.png")),
        ("Throughput", plot_throughput(runs, out_path / "throughput.png")),
        ("Hit rates", plot_hit_rates(runs, out_path / "hit_rates.png")),
        ("Traffic per tier", plot_tier_traffic(runs, out_path / "tier_traffic.png")),
        ("Throughput against the hit rate", hit_rate.plot_throughput_vs_hit_rate([r.summary for r in runs],
                                                                                 out_path / "hit_rate.png")),
    ]
    plots = [(t, p) for t, p in plots if p is not None]
    explain = (f"Quantiles are Harrell-Davis estimates; a ratio is run / {runs[0].name} with a 95% bootstrap "
               f"interval ({n_boot} resamples, seed {seed}); 'better'/'worse' when the interval excludes 1. "
               "Warm-up and failed requests are left out.")
    md = [f"# {title}", "", *[f"- {_run_line(r)}" for r in runs], "", _md_table(table), "", explain, ""]
    if findings:
        md += ["## Findings", "", *[f"- {line}" for line in findings], ""]
    md += ["## Figures", "", *[f"![{t}]({p.name})" for t, p in plots], ""]
    (out_path / "report.md").write_text("\n".join(md))
    figures = "".join(f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,"
                      f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in plots)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>"
            + "".join(f"<li>{html.escape(_run_line(r))}</li>" for r in runs) + "</ul>"
            + table.to_html(index=False, escape=True, border=0) + f"<p>{html.escape(explain)}</p>"
            + ("<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in findings) + "</ul>" if findings else "")
            + f"<h2>Figures</h2>{figures}</body></html>")
    (out_path / "report.html").write_text(page)
    files = ["report.html", "report.md", "summary.csv"] + [p.name for _, p in plots]
    return {"out": str(out_path), "files": files, "runs": [r.name for r in runs], "findings": findings,
            "table": table.to_dict("records")}


def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (requests.jsonl, summary.json, metrics.csv); the first is the reference.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("report"),
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "KVBM benchmark report",
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the intervals.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Render an HTML page, a Markdown summary and PNGs comparing bench runs (ratios against the first)."""
    if n_boot < 100:
        raise CliError(f"--n-boot {n_boot}: use at least 100 resamples")
    loaded = [load_run(r) for r in runs]
    result = build_report(loaded, out_dir, n_boot=n_boot, seed=seed, title=title)
    if json_out:
        out().print_json(json.dumps({k: v for k, v in result.items() if k != "table"}))
        return
    console = out()
    console.print(_md_table(pd.DataFrame.from_records(result["table"])), markup=False, soft_wrap=True)
    for line in result["findings"]:
        console.print(f"- {line}", markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(result['files'])} to {result['out']}", markup=False, soft_wrap=True)
