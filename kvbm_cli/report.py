"""What `kvbm report` writes: one self-contained HTML page, a Markdown summary, a CSV and PNGs for bench runs.

Reads each run with kvbm_cli.results.load_run (requests.jsonl, summary.json and, when present, metrics.csv from
`kvbm metrics collect`). The first run is the reference: every other run gets ratios against it with
bootstrap confidence intervals (kvbm_cli.stats, the same estimators as `kvbm gate`). Figures: kvbm_cli.plots.

Operations:
  summary_table(runs, ...) / notes(runs)   per-run statistics and ratios against the first run / findings in words
  build_report(runs, out_dir)              everything into out_dir: report.html, report.md, summary.csv, *.png
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

from kvbm_cli import gate as gating
from kvbm_cli import plots
from kvbm_cli._output import markdown
from kvbm_cli.results import TIER_PAIRS, Run, kvbm_totals
from kvbm_cli.stats import bootstrap_ratio

# Metrics of the summary table, computed with gate's metric specs so report and gate agree.
TABLE_METRICS = ("ttft_p50", "ttft_p90", "ttft_p99", "ttft_mean", "itl_p50", "tpot_p50", "e2e_p50",
                 "output_tokens_per_s")


# ---------------------------------------------------------------- tables

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
            row[run.name] = gating.fmt_value(spec.statistic(sample) if len(sample) else float("nan"), spec.unit)
            if i and min(len(sample), len(base_sample)) < 2:
                row[f"{run.name} / {base.name}"] = "n/a"
            elif i:
                ci = bootstrap_ratio(base_sample, sample, spec.statistic, n_boot=n_boot, seed=seed, confidence=confidence)
                word = ((" better" if (ci.low > 1) == (spec.direction == gating.HIGHER) else " worse")
                        if ci.low > 1 or ci.high < 1 else "")  # NaN bounds: no word
                row[f"{run.name} / {base.name}"] = f"{ci.ratio:.3f} [{ci.low:.3f}, {ci.high:.3f}]{word}"
        records.append(row)
    records.insert(0, {"metric": "requests (measured/warm-up/errors)", "better": "",
                       **{run.name: f"{len(run.requests)}/{run.warmup}/{run.errors}" for run in runs}})
    totals = {run.name: kvbm_totals(run) for run in runs}
    for metric, label in {**TIER_PAIRS, "kvbm_matched_tokens": "tokens matched by KVBM"}.items():
        values = {name: run_totals.get(metric) for name, run_totals in totals.items()}
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


# ---------------------------------------------------------------- documents

def _run_line(run: Run) -> str:
    s = run.summary
    parts = [f"{k}={s[k]}" for k in ("workload", "model", "driver", "url") if s.get(k)]
    if s.get("duration_s") is not None:
        parts.append(f"duration {float(s['duration_s']):.1f} s")
    return f"{run.name}: {run.path}" + (f" ({', '.join(parts)})" if parts else "")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}"
        "code{background:#f3f3f3;padding:1px 4px}")


def build_report(runs: list[Run], out_dir: str | Path, *, n_boot: int = 2000, seed: int = 0,
                 title: str = "KVBM benchmark report") -> dict[str, Any]:
    """Write report.html (self-contained), report.md, summary.csv and the PNGs; returns what was written."""
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for run in runs:  # unique names: the table has a column per run
        if run.name in seen:
            run.name = (f"{run.name} ({run.path.name})" if run.path.name != run.name
                        else f"{run.name} #{seen[run.name] + 1}")
        seen[run.name] = seen.get(run.name, 0) + 1
    table = summary_table(runs, n_boot=n_boot, seed=seed)
    table.to_csv(out_path / "summary.csv", index=False)
    findings = notes(runs)
    figures = [(t, p) for t, name, fig in plots.PLOTS if (p := fig(runs, out_path / name)) is not None]
    explain = (f"Quantiles are Harrell-Davis estimates; a ratio is run / {runs[0].name} with a 95% bootstrap "
               f"interval ({n_boot} resamples, seed {seed}); 'better'/'worse' when the interval excludes 1. "
               "Warm-up and failed requests are left out.")
    md = [f"# {title}", "", *[f"- {_run_line(r)}" for r in runs], "", markdown(list(table.columns), table.values.tolist()), "", explain, ""]
    if findings:
        md += ["## Findings", "", *[f"- {line}" for line in findings], ""]
    md += ["## Figures", "", *[f"![{t}]({p.name})" for t, p in figures], ""]
    (out_path / "report.md").write_text("\n".join(md))
    images = "".join(f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,"
                      f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in figures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>"
            + "".join(f"<li>{html.escape(_run_line(r))}</li>" for r in runs) + "</ul>"
            + table.to_html(index=False, escape=True, border=0) + f"<p>{html.escape(explain)}</p>"
            + ("<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in findings) + "</ul>" if findings else "")
            + f"<h2>Figures</h2>{images}</body></html>")
    (out_path / "report.html").write_text(page)
    files = ["report.html", "report.md", "summary.csv"] + [p.name for _, p in figures]
    return {"out": str(out_path), "files": files, "runs": [r.name for r in runs], "findings": findings,
            "table": table.to_dict("records")}
