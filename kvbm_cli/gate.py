"""What `kvbm gate` decides: is a candidate run slower than a baseline run beyond a tolerance, not on noise.

Operations:
  METRICS / metric_spec(name)     gateable metrics: ttft|itl|e2e|tpot|tps _p50|_p90|_p99|_mean, output_tokens_per_s
  samples(requests, spec)         the per-request sample a metric is computed on
  compare(base, cand, spec, max_regression, ...) -> Verdict    the statistical decision for one metric
  gate(baseline, candidate, metrics, ...) -> list[Verdict]      every metric of two runs
  choose_metrics(args, thresholds)   {metric: tolerance and direction} from --metric NAME[=5%] and a YAML/JSON file
  markdown_table(verdicts) / fmt_value(value, unit)   the table for a CI step summary / a value as tables show it

Decision, per metric: r = stat(candidate) / stat(baseline), turned so that r > 1 is worse (baseline /
candidate for higher-is-better metrics). Quantiles are Harrell-Davis estimates (kvbm_cli.stats), the interval
a seeded percentile bootstrap that resamples each run's requests independently. A metric regresses when
  r > 1 + max_regression   (worse than the tolerance)   and   the interval's lower end > 1   (not noise).
Operating characteristic (tests/test_gate.py, n=30 requests per run, 5% tolerance, lognormal per-request
noise, 500 seeds): at 8% coefficient of variation A/A passes 98.6% and a 10% regression fails 97.4%; at 10% CV
97.4% and 87.4%; at 12% CV 97.2% and 74%; beyond that a 10% change needs more requests (the power grows with n):
the table shows n and the interval so a reader sees when a run was too short to judge.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kvbm_cli._errors import CliError
from kvbm_cli._output import markdown
from kvbm_cli.results import RequestRecord, measured_requests
from kvbm_cli.stats import Statistic, bootstrap_ratio

LOWER, HIGHER = "lower", "higher"
# per-request value (time to first token, mean inter-token latency, end-to-end latency, time per output token
# after the first, output tokens per second) -> (unit, better direction)
_BASES = {"ttft": ("s", LOWER), "itl": ("s", LOWER), "e2e": ("s", LOWER), "tpot": ("s", LOWER), "tps": ("tok/s", HIGHER)}
_STATS = {"p50": Statistic("quantile", 0.5), "p90": Statistic("quantile", 0.9), "p99": Statistic("quantile", 0.99),
          "mean": Statistic("mean")}
DEFAULT_METRICS = ("ttft_p50", "ttft_p90", "itl_p50", "output_tokens_per_s")
MIN_SAMPLES = 5


@dataclass(frozen=True)
class MetricSpec:
    """A gateable metric: which per-request values, which statistic, which direction is better."""

    name: str
    base: str
    statistic: Statistic
    direction: str
    unit: str


METRICS = tuple(f"{b}_{s}" for b in _BASES for s in _STATS) + ("output_tokens_per_s",)


def metric_spec(name: str, direction: str | None = None) -> MetricSpec:
    """The spec for `name` (e.g. ttft_p50, e2e_mean, output_tokens_per_s); `direction` overrides the default."""
    if direction not in (None, LOWER, HIGHER):
        raise CliError(f"direction {direction!r} for {name}: use 'lower' or 'higher' (which way is better)")
    if name not in METRICS:
        raise CliError(f"unknown metric {name!r}: use ttft|itl|e2e|tpot|tps with _p50|_p90|_p99|_mean, "
                       "or output_tokens_per_s (e.g. --metric ttft_p50)")
    if name == "output_tokens_per_s":
        return MetricSpec(name, "throughput", Statistic("ratio_of_sums"), direction or HIGHER, "tok/s")
    base, stat = name.split("_")
    unit, better = _BASES[base]
    return MetricSpec(name, base, _STATS[stat], direction or better, unit)


def _num(value) -> float:  # None -> nan
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")


_PER_REQUEST = {  # base -> the value of one request (nan when it has none)
    "ttft": lambda r: _num(r.ttft_s),
    "e2e": lambda r: _num(r.e2e_s),
    "itl": lambda r: float(np.mean(r.itl_s)) if r.itl_s else float("nan"),
    "tpot": lambda r: (_num(r.e2e_s) - _num(r.ttft_s)) / (r.output_tokens - 1) if r.output_tokens > 1 else float("nan"),
    "tps": lambda r: r.output_tokens / _num(r.e2e_s) if _num(r.e2e_s) > 0 else float("nan"),
}


def samples(requests: list[RequestRecord], spec: MetricSpec) -> np.ndarray:
    """The per-request values `spec` is computed on (finite ones only); (n, 2) pairs for output_tokens_per_s."""
    if spec.base == "throughput":
        pairs = np.array([(_num(r.output_tokens), _num(r.e2e_s)) for r in requests], dtype=float).reshape(-1, 2)
        return pairs[np.isfinite(pairs).all(axis=1) & (pairs[:, 1] > 0)]
    arr = np.asarray([_PER_REQUEST[spec.base](r) for r in requests], dtype=float)
    return arr[np.isfinite(arr)]


@dataclass(frozen=True)
class Verdict:
    """One metric's comparison. `worse_ratio` > 1 means the candidate is worse; `status` pass|regression."""

    metric: str
    direction: str
    baseline: float
    candidate: float
    change: float          # candidate / baseline - 1 (signed, in the metric's own terms)
    worse_ratio: float     # > 1: worse
    ci_low: float          # interval of worse_ratio
    ci_high: float
    max_regression: float
    n_baseline: int
    n_candidate: int
    status: str
    unit: str
    confidence: float = 0.95

    @property
    def regressed(self) -> bool:
        return self.status == "regression"


def compare(baseline, candidate, spec: MetricSpec, max_regression: float, *, confidence: float = 0.95,
            n_boot: int = 2000, seed: int = 0) -> Verdict:
    """Decide whether `candidate` regressed against `baseline` on one metric (samples from `samples()`)."""
    if len(baseline) < MIN_SAMPLES or len(candidate) < MIN_SAMPLES:
        raise CliError(f"{spec.name}: {len(baseline)} baseline and {len(candidate)} candidate requests with a "
                       f"value; the gate needs at least {MIN_SAMPLES} on each side (run more requests)")
    ci = bootstrap_ratio(baseline, candidate, spec.statistic, n_boot=n_boot, confidence=confidence, seed=seed)
    worse, low, high = ((ci.ratio, ci.low, ci.high) if spec.direction == LOWER  # turned so that > 1 is worse
                        else (1.0 / ci.ratio, 1.0 / ci.high, 1.0 / ci.low))
    regressed = worse > 1.0 + max_regression and low > 1.0
    return Verdict(spec.name, spec.direction, ci.stat_a, ci.stat_b, ci.ratio - 1.0, worse, low, high,
                   max_regression, ci.n_a, ci.n_b, "regression" if regressed else "pass", spec.unit, confidence)


def parse_fraction(text: str | float) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05, 5 -> 0.05 (a bare number above 1 is taken as percent)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CliError(f"max regression {text!r}: use a percentage such as 5% or a fraction such as 0.05") from None
    if not raw.endswith("%") and value > 1.0:
        value /= 100.0
    if not 0.0 <= value < 10.0 or not math.isfinite(value):
        raise CliError(f"max regression {text!r} is out of range (0% to 1000%)")
    return value


def load_thresholds(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{metric: {"max_regression": fraction, "direction": lower|higher|None}} from a YAML or JSON file.

    Format: `metrics: {ttft_p50: 5%, output_tokens_per_s: {max_regression: 3%, direction: higher}}`
    (the top-level `metrics:` key is optional).
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not YAML/JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict) or not data:
        raise CliError(f"{path}: expected a mapping of metric -> max regression, e.g. 'ttft_p50: 5%'")
    result = {}
    for name, value in data.items():
        value = value if isinstance(value, dict) else {"max_regression": value}
        if unknown := set(value) - {"max_regression", "direction"}:
            raise CliError(f"{path}: {name}: unknown keys {sorted(unknown)} (use max_regression, direction)")
        result[str(name)] = {"direction": value.get("direction"), "max_regression":
                             parse_fraction(value["max_regression"]) if "max_regression" in value else None}
        metric_spec(str(name), value.get("direction"))  # validate now: one clear line, before any work
    return result


def choose_metrics(metric_args: list[str] | None, thresholds: str | os.PathLike[str] | None
                   ) -> dict[str, dict[str, Any]]:
    """The metrics to gate: the thresholds file's, then each `NAME` or `NAME=5%` given (default: DEFAULT_METRICS)."""
    chosen = load_thresholds(thresholds) if thresholds else {}
    for item in metric_args or ([] if chosen else list(DEFAULT_METRICS)):
        name, _, tol = (part.strip() for part in item.partition("="))
        metric_spec(name)
        entry = chosen.setdefault(name, {"max_regression": None, "direction": None})
        entry["max_regression"] = parse_fraction(tol) if tol else entry["max_regression"]
    return chosen


def gate(baseline: str | os.PathLike[str], candidate: str | os.PathLike[str], metrics: dict[str, dict[str, Any]],
         *, default_max_regression: float = 0.05, confidence: float = 0.95, n_boot: int = 2000,
         seed: int = 0) -> list[Verdict]:
    """Compare two runs on each metric ({name: {"max_regression", "direction"}}; None values take defaults)."""
    base_rows, cand_rows = measured_requests(baseline), measured_requests(candidate)
    verdicts = []
    for name, entry in metrics.items():
        spec = metric_spec(name, entry.get("direction"))
        tolerance = entry.get("max_regression")
        verdicts.append(compare(samples(base_rows, spec), samples(cand_rows, spec), spec,
                                default_max_regression if tolerance is None else tolerance,
                                confidence=confidence, n_boot=n_boot, seed=seed))
    return verdicts


def fmt_value(value: float | None, unit: str) -> str:
    """`value` in `unit` as the tables show it: seconds as ms below 10 s, "n/a" when missing."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.2f} s"
    return f"{value:,.1f} {unit}"


def markdown_table(verdicts: list[Verdict], *, title: str | None = None) -> str:
    """A GitHub-flavoured Markdown table of the verdicts (for $GITHUB_STEP_SUMMARY)."""
    level = f"{verdicts[0].confidence * 100:.0f}% " if verdicts else ""
    rows = [[v.metric, v.direction, fmt_value(v.baseline, v.unit), fmt_value(v.candidate, v.unit),
             f"{v.change * 100:+.1f}%", f"{v.worse_ratio:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}]",
             f"{v.max_regression * 100:.1f}%", f"{v.n_baseline}/{v.n_candidate}",
             "**REGRESSION**" if v.regressed else "pass"] for v in verdicts]
    table = markdown(["metric", "better", "baseline>", "candidate>", "change>", f"worse-ratio {level}CI",
                      "tolerance>", "n (base/cand)>", "result"], rows)
    return ("\n".join([f"### {title}", "", table]) if title else table) + (
        "\n\nworse-ratio > 1 means the candidate is worse; a metric regresses when the ratio exceeds "
        "1 + tolerance and its bootstrap interval lies above 1.\n")
