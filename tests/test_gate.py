"""kvbm gate and kvbm_cli.stats: estimators, the decision's error rates over many seeds, and the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench_runs import write_run
from kvbm_cli import gate
from kvbm_cli.stats import Statistic, betainc, bootstrap_ratio, hd_weights, quantile, summary
from kvbm_runner import run_kvbm

SEEDS = 400


@pytest.mark.parametrize("n,p", [(2, 0.5), (7, 0.1), (30, 0.5), (30, 0.9), (200, 0.99)])
def test_harrell_davis_equals_scipys(n, p):
    from scipy.stats.mstats import hdquantiles

    x = np.random.default_rng(n).lognormal(0, 0.5, n)
    assert quantile(x, p) == pytest.approx(float(hdquantiles(x, prob=[p])[0]), rel=1e-12)


def test_incomplete_beta_matches_closed_forms():
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-12)            # uniform
        assert betainc(2, 1, x) == pytest.approx(x * x, abs=1e-12)        # x^2
        assert betainc(1, 3, x) == pytest.approx(1 - (1 - x) ** 3, abs=1e-12)
    assert betainc(7.5, 7.5, 0.5) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("n,p", [(1, 0.5), (2, 0.5), (30, 0.5), (30, 0.9), (30, 0.99), (500, 0.99)])
def test_harrell_davis_weights_sum_to_one_and_peak_at_the_quantile(n, p):
    w = hd_weights(n, p)
    assert w.sum() == pytest.approx(1.0, abs=1e-9) and (w >= -1e-15).all()
    assert abs(int(np.argmax(w)) - p * (n - 1)) <= max(1, 0.05 * n)


def test_harrell_davis_median_of_a_symmetric_sample_is_its_centre():
    assert quantile([1, 2, 3, 4, 5], 0.5) == pytest.approx(3.0)
    assert quantile([5, 1, 3], 0.5, method="sample") == 3.0
    assert summary([1.0, 2.0, float("nan")])["n"] == 2


def test_bootstrap_is_deterministic_and_brackets_the_ratio():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0, 0.1, 40), 1.2 * rng.lognormal(0, 0.1, 40)
    one = bootstrap_ratio(a, b, Statistic("quantile", 0.5), seed=3)
    two = bootstrap_ratio(a, b, Statistic("quantile", 0.5), seed=3)
    assert one == two
    assert one.low < one.ratio < one.high and 1.05 < one.ratio < 1.35
    pairs = np.column_stack([np.full(10, 50.0), np.linspace(1, 2, 10)])
    assert Statistic("ratio_of_sums")(pairs) == pytest.approx(500 / 15)


def _lognormal(rng, n, scale, cv):
    return scale * np.exp(rng.normal(0.0, cv, n))


def _rate(metric, make, seeds=SEEDS):
    spec = gate.metric_spec(metric)
    fails = 0
    for seed in range(seeds):
        base, cand = make(np.random.default_rng(seed))
        fails += gate.compare(base, cand, spec, 0.05, seed=seed).regressed
    return fails / seeds


def test_a_a_comparisons_pass_at_least_95_percent():
    # Per-request noise with an 8% coefficient of variation, n=30 a side: a same-distribution pair must pass.
    fail = _rate("ttft_p50", lambda r: (_lognormal(r, 30, 0.2, 0.08), _lognormal(r, 30, 0.2, 0.08)))
    assert 1 - fail >= 0.95, f"A/A passed {1 - fail:.1%}"


def test_a_a_passes_on_skewed_bimodal_latencies_too():
    # 20% of requests recompute (5x slower): the shape of a prefix workload with evictions.
    def draw(r):
        def one():
            x = _lognormal(r, 30, 0.2, 0.1)
            return np.where(r.random(30) < 0.2, 5 * x, x)
        return one(), one()
    assert 1 - _rate("ttft_p50", draw) >= 0.95
    assert 1 - _rate("ttft_p90", draw) >= 0.95


def test_injected_10_percent_ttft_regression_at_n30_fails_at_least_90_percent():
    fail = _rate("ttft_p50", lambda r: (_lognormal(r, 30, 0.2, 0.08), _lognormal(r, 30, 0.22, 0.08)))
    assert fail >= 0.90, f"a 10% regression failed only {fail:.1%} of the time"


def test_throughput_direction_a_10_percent_drop_fails_and_a_rise_passes():
    drop = _rate("tps_p50", lambda r: (_lognormal(r, 30, 100, 0.08), _lognormal(r, 30, 100 / 1.1, 0.08)))
    rise = _rate("tps_p50", lambda r: (_lognormal(r, 30, 100, 0.08), _lognormal(r, 30, 110, 0.08)), seeds=100)
    faster = _rate("ttft_p50", lambda r: (_lognormal(r, 30, 0.2, 0.08), _lognormal(r, 30, 0.18, 0.08)), seeds=100)
    assert drop >= 0.90 and rise == 0 and faster == 0


def test_a_change_inside_the_tolerance_is_not_a_regression_even_when_significant():
    spec = gate.metric_spec("ttft_p50")
    rng = np.random.default_rng(0)
    base, cand = _lognormal(rng, 2000, 0.2, 0.05), _lognormal(rng, 2000, 0.206, 0.05)  # +3%, tight CI
    verdict = gate.compare(base, cand, spec, 0.05)
    assert verdict.ci_low > 1.0 and not verdict.regressed


def test_metric_specs_and_samples_from_request_rows():
    from kvbm_cli.results import RequestRecord

    common = {"run": "r", "workload": "prefix-reuse", "start_s": 0.0, "input_tokens": 1}
    rows = [RequestRecord(request_id="a", ttft_s=0.1, e2e_s=1.1, output_tokens=11, itl_s=[0.1] * 10, **common),
            RequestRecord(request_id="b", ttft_s=None, e2e_s=2.0, output_tokens=0, itl_s=[], **common)]
    assert list(gate.samples(rows, gate.metric_spec("ttft_p50"))) == [0.1]
    assert gate.samples(rows, gate.metric_spec("tpot_mean"))[0] == pytest.approx(0.1)
    assert gate.samples(rows, gate.metric_spec("output_tokens_per_s")).shape == (2, 2)
    assert gate.metric_spec("tps_p90").direction == "higher" and gate.metric_spec("e2e_p99").direction == "lower"
    assert gate.metric_spec("ttft_p50", "higher").direction == "higher"
    assert set(gate.METRICS) >= {"ttft_p50", "itl_p90", "output_tokens_per_s"}
    assert gate.parse_fraction("5%") == gate.parse_fraction("0.05") == gate.parse_fraction(5) == 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate-runs")
    return {"main": write_run(root / "main", "main", ttft_s=0.20, seed=1),
            "same": write_run(root / "same", "same", ttft_s=0.20, seed=2),
            "slow": write_run(root / "slow", "slow", ttft_s=0.24, itl_s=0.02, seed=3),
            "tiny": write_run(root / "tiny", "tiny", n=3, seed=4)}


def test_gate_passes_a_same_distribution_candidate(runs, tmp_path):
    summary = tmp_path / "summary.md"
    outcome = run_kvbm("gate", "--baseline", str(runs["main"]), "--candidate", str(runs["same"]),
                       "--summary-md", str(summary), env={"GITHUB_STEP_SUMMARY": None})
    assert outcome.exit_code == 0, outcome.stderr
    assert "| ttft_p50 | lower |" in outcome.stdout and "REGRESSION" not in outcome.stdout
    assert summary.read_text().count("| metric |") == 1
    assert "gate passed" in outcome.stderr


def test_gate_fails_a_regression_with_one_line_and_a_step_summary(runs, tmp_path):
    step = tmp_path / "step.md"
    outcome = run_kvbm("gate", "-b", str(runs["main"]), "-c", str(runs["slow"]), "--metric", "ttft_p50",
                       "--metric", "itl_p50", "--max-regression", "5%", env={"GITHUB_STEP_SUMMARY": str(step)})
    assert outcome.exit_code == 1
    assert outcome.stderr.strip().count("\n") == 0 and outcome.stderr.startswith("kvbm: regression: ttft_p50 +")
    text = step.read_text()
    assert "| ttft_p50 | lower |" in text and "**REGRESSION**" in text
    assert "| itl_p50 | lower |" in text and text.count("**REGRESSION**") == 1


def test_gate_thresholds_file_sets_tolerance_and_direction(runs, tmp_path):
    loose = tmp_path / "loose.yaml"
    loose.write_text("metrics:\n  ttft_p50: 50%\n  output_tokens_per_s: {max_regression: 50%, direction: higher}\n")
    outcome = run_kvbm("gate", "-b", str(runs["main"]), "-c", str(runs["slow"]), "--thresholds", str(loose), "--json")
    assert outcome.exit_code == 0, outcome.stderr
    data = json.loads(outcome.stdout)
    assert data["passed"] and [v["metric"] for v in data["verdicts"]] == ["ttft_p50", "output_tokens_per_s"]
    assert data["verdicts"][0]["max_regression"] == 0.5
    # An inline tolerance on --metric overrides the file's.
    outcome = run_kvbm("gate", "-b", str(runs["main"]), "-c", str(runs["slow"]), "--thresholds", str(loose),
                       "--metric", "ttft_p50=5%")
    assert outcome.exit_code == 1


@pytest.mark.parametrize("args,needle", [
    (["--metric", "ttft_p42"], "unknown metric 'ttft_p42'"),
    (["--max-regression", "lots"], "max regression 'lots'"),
    (["--confidence", "1.5"], "--confidence"),
])
def test_gate_usage_errors_are_one_line_exit_2(runs, args, needle):
    outcome = run_kvbm("gate", "-b", str(runs["main"]), "-c", str(runs["same"]), *args)
    assert outcome.exit_code == 2 and needle in outcome.stderr and "Traceback" not in outcome.stderr


def test_gate_input_errors_are_one_line(runs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ttft_p50: {direction: sideways}\n")
    cases = [(["-b", str(tmp_path / "nope"), "-c", str(runs["same"])], "no requests.jsonl"),
             (["-b", str(runs["main"]), "-c", str(runs["tiny"])], "at least 5"),
             (["-b", str(runs["main"]), "-c", str(runs["same"]), "--thresholds", str(bad)], "direction 'sideways'")]
    for args, needle in cases:
        outcome = run_kvbm("gate", *args)
        assert outcome.exit_code == 2 and needle in outcome.stderr, outcome.stderr
        assert len(outcome.stderr.strip().splitlines()) == 1


def test_markdown_table_formats_units():
    v = gate.compare(np.full(10, 0.1) + np.arange(10) * 1e-3, np.full(10, 0.1) + np.arange(10) * 1e-3,
                     gate.metric_spec("ttft_p50"), 0.05)
    table = gate.markdown_table([v], title="t")
    assert "104.5 ms" in table and "| pass |" in table and not math.isnan(v.ci_low)
