"""kvbm report on bench result files (schema of kvbm_cli.results) with and without metrics.csv."""

from __future__ import annotations

import csv
import json

import pytest

from bench_runs import write_run
from kvbm_cli.collect import COLUMNS, format_labels
from kvbm_cli.report import build_report
from kvbm_cli.results import load_run
from kvbm_runner import run_kvbm


def _metrics(path, *, onboard: bool, t0: float = 1_790_000_000.0):
    """A metrics.csv as the collector writes it: counters rising, gauges, two sources."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i in range(20):
            t = t0 + i
            k, v = "http://127.0.0.1:6880/metrics", "http://127.0.0.1:8000/metrics"
            w.writerow((t, k, "kvbm_offload_blocks_d2h", "", 12.0 * i))
            w.writerow((t, k, "kvbm_onboard_blocks_h2d", "", 10.0 * i if onboard else 0.0))
            w.writerow((t, k, "kvbm_matched_tokens", "", 1280.0 * i if onboard else 0.0))
            w.writerow((t, k, "kvbm_host_cache_hit_rate", "", 0.8 if onboard else 0.0))
            w.writerow((t + 0.01, v, "vllm:prefix_cache_queries_total", format_labels({"engine": "0", "model_name": "m"}), 2000.0 * i))
            w.writerow((t + 0.01, v, "vllm:prefix_cache_hits_total", format_labels({"engine": "0", "model_name": "m"}), 300.0 * i))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    base = write_run(root / "baseline", "baseline", ttft_s=0.40, spike_every=4, seed=1)
    kvbm = write_run(root / "kvbm", "kvbm", ttft_s=0.15, seed=2, errors=1)
    idle = write_run(root / "idle", "kvbm-idle", ttft_s=0.40, seed=3)
    _metrics(kvbm / "metrics.csv", onboard=True)
    _metrics(idle / "metrics.csv", onboard=False)
    return base, kvbm, idle


def test_report_writes_html_markdown_and_pngs(runs, tmp_path):
    outcome = run_kvbm("report", *map(str, runs), "--out", str(tmp_path), "--n-boot", "500")
    assert outcome.exit_code == 0, outcome.stderr
    for name in ("report.html", "report.md", "summary.csv", "ttft_cdf.png", "ttft_over_time.png", "itl.png",
                 "throughput.png", "hit_rates.png", "tier_traffic.png"):
        data = (tmp_path / name).read_bytes()
        assert data, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 6 and "http" not in page.split("<ul>")[0]
    md = (tmp_path / "report.md").read_text()
    assert "| ttft_p50 | lower |" in md and "kvbm / baseline" in md and "better" in md
    assert "kvbm-idle: KVBM offloaded 228 blocks but onboarded none" in md
    assert "kvbm: KVBM onboarded 190 blocks" in md and "kvbm: 1 request(s) failed" in md
    assert "baseline: no metrics.csv" in md
    assert "wrote report.html" in outcome.stdout


def test_ratios_against_the_first_run_have_intervals(runs, tmp_path):
    result = build_report([load_run(r) for r in runs[:2]], tmp_path, n_boot=500)
    row = next(r for r in result["table"] if r["metric"] == "ttft_p50")
    ratio, interval = row["kvbm / baseline"].split(" [")
    low, high = (float(x) for x in interval.split("]")[0].split(", "))
    assert low <= float(ratio) <= high < 1.0
    assert "tier_traffic.png" in result["files"] and "hit_rates.png" in result["files"]
    # Without metrics: no hit-rate or traffic figures, and the report still works.
    plain = build_report([load_run(runs[0])], tmp_path / "plain", n_boot=200)
    assert "hit_rates.png" not in plain["files"] and "ttft_cdf.png" in plain["files"]


def test_report_json_and_errors(runs, tmp_path):
    outcome = run_kvbm("report", str(runs[0]), "--out", str(tmp_path), "--json", "--n-boot", "200")
    assert outcome.exit_code == 0 and json.loads(outcome.stdout)["runs"] == ["baseline"]
    outcome = run_kvbm("report", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert outcome.exit_code == 2 and "no requests.jsonl" in outcome.stderr and len(outcome.stderr.splitlines()) == 1
