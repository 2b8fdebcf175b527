"""`kvbm gate`: fail CI when a candidate run is slower than a baseline run beyond a tolerance, not on noise
(the decision is kvbm_cli.gate's): the table on stdout, --summary-md / $GITHUB_STEP_SUMMARY, exit 1 on regression."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvbm_cli import gate as gating
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._options import JsonOpt, NBootOpt, SeedOpt
from kvbm_cli._output import emit_json, note, out

MetricOpt = Annotated[Optional[list[str]], typer.Option(
    "--metric", "-m", help="Metric to gate, repeatable: ttft|itl|e2e|tpot|tps with _p50|_p90|_p99|_mean, or "
    f"output_tokens_per_s; NAME=5% sets its own tolerance. Default: {', '.join(gating.DEFAULT_METRICS)}.")]


def gate(
    baseline: Annotated[Path, typer.Option("--baseline", "-b", help="Baseline run directory (requests.jsonl).")],
    candidate: Annotated[Path, typer.Option("--candidate", "-c", help="Candidate run directory (requests.jsonl).")],
    metric: MetricOpt = None,
    max_regression: Annotated[str, typer.Option("--max-regression", help="Tolerated worsening, e.g. 5% (default for every metric).")] = "5%",
    thresholds: Annotated[Optional[Path], typer.Option("--thresholds", help="YAML/JSON: metric -> tolerance or {max_regression, direction}.")] = None,
    confidence: Annotated[float, typer.Option("--confidence", help="Bootstrap interval level.")] = 0.95,
    n_boot: NBootOpt = 2000,
    seed: SeedOpt = 0,
    summary_md: Annotated[Optional[Path], typer.Option("--summary-md", help="Append the Markdown table to this file ($GITHUB_STEP_SUMMARY is used too when set).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare a candidate run with a baseline: exit 1 when a metric regressed beyond its tolerance."""
    if not 0.5 <= confidence < 1.0:
        raise CliError(f"--confidence {confidence}: use a level between 0.5 and 1 (e.g. 0.95)")
    default = gating.parse_fraction(max_regression)
    chosen = gating.choose_metrics(metric, thresholds)
    verdicts = gating.gate(baseline, candidate, chosen, default_max_regression=default, confidence=confidence,
                           n_boot=n_boot, seed=seed)
    table = gating.markdown_table(verdicts, title=f"kvbm gate: {candidate} vs {baseline}")
    for target in filter(None, (summary_md, os.environ.get("GITHUB_STEP_SUMMARY"))):
        with open(target, "a") as f:
            f.write(table + "\n")
    if json_out:
        emit_json({"baseline": str(baseline), "candidate": str(candidate),
                   "passed": not any(v.regressed for v in verdicts), "verdicts": [asdict(v) for v in verdicts]})
    else:
        out().print(table, markup=False, soft_wrap=True)
    bad = [v for v in verdicts if v.regressed]
    if bad:
        worst = ", ".join(f"{v.metric} {v.change * 100:+.1f}% (worse-ratio CI [{v.ci_low:.3f}, {v.ci_high:.3f}], "
                          f"tolerance {v.max_regression * 100:.0f}%)" for v in bad)
        raise CheckFailed(f"regression: {worst}")
    note(f"gate passed: {len(verdicts)} metric(s) within tolerance")
