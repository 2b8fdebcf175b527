"""KVBM with tensor parallelism 2 on vLLM's CPU build: one worker per rank, each with its shard of every block.

vLLM's CPU build runs TP=2 on 2 cores when each rank is bound to one core (VLLM_CPU_OMP_THREADS_BIND=0|1);
slow, but it exercises the real multi-rank path: per-rank tiers, reports merged across ranks, finished
requests counted only when both ranks are done.
"""

from __future__ import annotations

import pytest

from test_vllm_connector import ENV, KV_TRANSFER, KVBM_OFF, NUM_PREFIXES, run_round, scrape
from vllm_server import free_port, vllm_server

pytestmark = pytest.mark.engine

TP2 = ["--tensor-parallel-size", "2", "--seed", "0", "--kv-transfer-config", KV_TRANSFER]
SMALL_G1 = ["--kv-cache-memory-bytes", str(48 * 128 * 1024)]  # per rank: 48 blocks of 128 KiB (its shard)
BIG_G1 = ["--kv-cache-memory-bytes", str(512 * 128 * 1024)]
TP2_ENV = ENV | {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def tp2_runs(tiny_model_dir):
    model = str(tiny_model_dir)
    # Reference: KVBM inactive and a cache that keeps every prefix (the same KV, the same suffix-only compute).
    with vllm_server(tiny_model_dir, TP2 + BIG_G1, TP2_ENV | KVBM_OFF, max_model_len=4096) as url:
        baseline = [run_round(url, model, r, rounds=2) for r in range(2)]
    port = free_port()
    env = TP2_ENV | {"DYN_KVBM_CPU_CACHE_GB": "0.5", "DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port)}
    with vllm_server(tiny_model_dir, TP2 + SMALL_G1, env, max_model_len=4096) as url:
        kvbm = [run_round(url, model, r, rounds=2) for r in range(2)]
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    return baseline, kvbm, metrics


def test_tp2_outputs_identical_and_prefixes_onboarded(tp2_runs):
    baseline, kvbm, metrics = tp2_runs
    for base, ours in zip(baseline, kvbm):
        assert [r["text"] for r in ours] == [r["text"] for r in base]
    assert metrics["kvbm_onboard_blocks_h2d"] >= NUM_PREFIXES * 10, "both ranks finished the loads"
    assert metrics["kvbm_offload_blocks_d2h"] >= NUM_PREFIXES * 12
    assert metrics["kvbm_load_failures_total"] == 0
