"""End to end: a real Prometheus scrapes a real vLLM + KVBM run; every PromQL expression of the Grafana
dashboard returns data from it; `kvbm metrics collect` (scraping, and from Prometheus) and `kvbm report`
work on the run.

Workload (as tests/test_vllm_connector.py): 5 prompts of 1,600 tokens, 3 rounds; vLLM's own cache holds 47
blocks of 128 tokens (fewer than the 60 the prompts need), so rounds 2 and 3 onboard the prefixes from
KVBM's host tier (DYN_KVBM_CPU_CACHE_GB=1).
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from kvbm_cli.collect import background
from kvbm_cli.results import RequestRecord, summarize, write_run
from kvbm_runner import run_kvbm
from prom_server import dashboard_exprs, prometheus_bin, prometheus_server, query_range, wait_for_targets
from vllm_server import free_port, vllm_server

pytestmark = pytest.mark.engine

KV_TRANSFER = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                          "kv_connector_module_path": "kvbm.vllm_integration.connector"})
G1_ARGS = ["--kv-cache-memory-bytes", str(48 * 256 * 1024), "--seed", "0"]
NUM_PREFIXES, PREFIX_TOKENS, SUFFIX_TOKENS, MAX_TOKENS, ROUNDS = 5, 1536, 64, 12, 3


def _request(url: str, model: str, tokens: list[int], rid: str, prefix: int, rnd: int) -> RequestRecord:
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start_unix, start, stamps, n_out = time.time(), time.perf_counter(), [], 0
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n_out = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter() - start)
    end = time.perf_counter() - start
    return RequestRecord(request_id=rid, run="kvbm", workload="prefix-reuse", start_s=start_unix,
                         ttft_s=stamps[0] if stamps else None, itl_s=[b - a for a, b in zip(stamps, stamps[1:])],
                         e2e_s=end, input_tokens=len(tokens), output_tokens=n_out or len(stamps), prefix_id=prefix,
                         round=rnd, warmup=rnd == 0)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """vLLM + KVBM, Prometheus scraping both every second, the collector writing metrics.csv beside."""
    prometheus_bin()
    work = tmp_path_factory.mktemp("metrics-e2e")
    run_dir = work / "run"
    kvbm_port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": None, "DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_METRICS": "true",
           "DYN_KVBM_METRICS_PORT": str(kvbm_port)}
    rng = random.Random(0)
    prefixes = [[rng.randrange(10, 2000) for _ in range(PREFIX_TOKENS)] for _ in range(NUM_PREFIXES)]
    with vllm_server(tiny_model_dir, G1_ARGS + ["--kv-transfer-config", KV_TRANSFER], env, max_model_len=4096,
                     log_path=work / "vllm.log") as url:
        vllm_target, kvbm_target = url.removeprefix("http://"), f"127.0.0.1:{kvbm_port}"
        with prometheus_server({"vllm": [vllm_target], "kvbm": [kvbm_target]}, work / "prom") as prom:
            wait_for_targets(prom, 2)
            started = time.time()
            records = []
            with background([url, kvbm_target], run_dir / "metrics.csv", interval_s=1.0) as box:
                for rnd in range(ROUNDS):
                    for p in range(NUM_PREFIXES):
                        tokens = prefixes[p] + [rng.randrange(10, 2000) for _ in range(SUFFIX_TOKENS)]
                        records.append(_request(url, str(tiny_model_dir), tokens, f"r{rnd}p{p}", p, rnd))
                time.sleep(3.0)  # let Prometheus take a few scrapes after the last request
            ended = time.time()
            summary = summarize(records, run="kvbm", workload="prefix-reuse", url=url, model="tiny",
                                started_at=pd.Timestamp(started, unit="s", tz="UTC").isoformat(),
                                duration_s=ended - started)
            write_run(run_dir, records, summary)
            yield {"prom": prom, "start": started, "end": ended, "run_dir": run_dir, "collect": box["result"],
                   "vllm": url, "kvbm": kvbm_target, "work": work}


def test_every_dashboard_expression_returns_data_from_a_real_run(run):
    empty = []
    for title, expr in dashboard_exprs():
        result = query_range(run["prom"], expr, run["start"], run["end"], 1.0)
        finite = [float(v) for s in result for _, v in s["values"] if math.isfinite(float(v))]
        if not finite:
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)


def test_the_run_moved_blocks_both_ways(run):
    onboarded = query_range(run["prom"], "max_over_time(kvbm_onboard_blocks_h2d[1h])", run["end"] - 1, run["end"])
    offloaded = query_range(run["prom"], "max_over_time(kvbm_offload_blocks_d2h[1h])", run["end"] - 1, run["end"])
    assert float(onboarded[0]["values"][-1][1]) >= 2 * NUM_PREFIXES * 10
    assert float(offloaded[0]["values"][-1][1]) >= NUM_PREFIXES * 12


def test_collect_during_scraped_vllm_and_kvbm(run):
    result = run["collect"]
    assert result.rows > 0 and all(n >= 3 for n in result.scrapes.values()), result
    frame = pd.read_csv(run["run_dir"] / "metrics.csv", keep_default_na=False)
    names = set(frame["name"])
    assert {"kvbm_onboard_blocks_h2d", "kvbm_host_cache_hit_rate", "vllm:prefix_cache_queries_total",
            "vllm:time_to_first_token_seconds_bucket"} <= names
    onboard = frame[frame["name"] == "kvbm_onboard_blocks_h2d"]["value"].astype(float)
    assert onboard.is_monotonic_increasing and onboard.iloc[-1] >= 2 * NUM_PREFIXES * 10


def test_collect_from_prometheus_reads_the_same_series(run):
    out_csv = run["work"] / "from-prom.csv"
    outcome = run_kvbm("metrics", "collect", "--prometheus", run["prom"], "--start", str(run["start"]),
                       "--end", str(run["end"]), "--out", str(out_csv))
    assert outcome.exit_code == 0, outcome.stderr
    frame = pd.read_csv(out_csv, keep_default_na=False)
    assert set(frame["source"]) == {f"http://{run['vllm'].removeprefix('http://')}/metrics", f"http://{run['kvbm']}/metrics"}
    scraped = pd.read_csv(run["run_dir"] / "metrics.csv", keep_default_na=False)
    assert {"kvbm_onboard_blocks_h2d", "vllm:prefix_cache_hits_total"} <= set(frame["name"]) & set(scraped["name"])
    last = lambda f: float(f[f["name"] == "kvbm_onboard_blocks_h2d"]["value"].astype(float).max())  # noqa: E731
    assert last(frame) == last(scraped)


def test_report_on_the_run_shows_hit_rates_and_tier_traffic(run):
    out = run["work"] / "report"
    outcome = run_kvbm("report", str(run["run_dir"]), "--out", str(out))
    assert outcome.exit_code == 0, outcome.stderr
    for name in ("report.html", "report.md", "ttft_cdf.png", "hit_rates.png", "tier_traffic.png"):
        assert (out / name).stat().st_size > 0
    assert "onboarded" in (out / "report.md").read_text()
