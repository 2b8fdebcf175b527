"""The shared tier (G4) between two real vLLM CPU engines in separate processes (the tiny model, real weights).

Per backend -- one redis-server, a three-node Redis Cluster, a shared directory (file://) -- two engines A and B
start together. A serves each prompt twice: the first computes it (its blocks go to G2, hit once: not yet worth
sharing), the second hits vLLM's own cache (a hit: the disk offload filter's frequency rule admits the blocks,
and A writes them G2 -> G4). The second answers are the reference: the same connector, the prefix's KV reused,
only the suffix computed. B, with nothing cached, serves the same prompts: it must find the prefixes in G4
(external hits, counted as G4 by kvbm's metrics) and answer exactly as A did.

Negative control (redis, with DYN_KVBM_REMOTE_SECRET on both engines): the values of the first prompt are
rewritten in the store by a client without the secret (one byte of KV flipped). B must not serve them: their
loads fail (counted), the prompt is recomputed, and no request fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from kvbm.mechanism.remote.local_server import RedisServer, available, local_cluster, stop_all
from vllm_server import free_port, vllm_server

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not available(), reason="redis-server is not installed: run `make redis`")]

KV_TRANSFER = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                          "kv_connector_module_path": "kvbm.vllm_integration.connector"})
ARGS = ["--kv-transfer-config", KV_TRANSFER, "--seed", "0"]
NUM_PROMPTS, PREFIX_BLOCKS, SUFFIX_TOKENS, MAX_TOKENS = 3, 5, 40, 8
SECRET = "g4-test-secret"


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(12)
    return [[rng.randrange(10, 2000) for _ in range(PREFIX_BLOCKS * 128 + SUFFIX_TOKENS)] for _ in range(NUM_PROMPTS)]


def complete(url: str, model: str, tokens: list[int]) -> str:
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def scrape(url: str) -> dict[str, float]:
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


def stored_keys(backend: str, where) -> list:
    """The keys (or files) in the store now."""
    if backend == "file":
        return sorted(p for p in Path(where).rglob("*") if p.is_file() and not p.name.startswith("."))
    nodes = where if isinstance(where, list) else [where]
    out = []
    for node in nodes:
        client = redis.Redis.from_url(node.url)
        out += [k for k in client.scan_iter("kvbm:*")]
        client.close()
    return sorted(out)


def wait_keys(backend: str, where, at_least: int, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = stored_keys(backend, where)
        if len(keys) >= at_least:
            return keys
        time.sleep(0.2)
    raise AssertionError(f"the store holds {len(stored_keys(backend, where))} blocks, expected >= {at_least}")


@contextlib.contextmanager
def two_engines(model_dir, env: dict, tmp: Path):
    """Engines A and B, started at the same time (start-up dominates this module's time)."""
    ports = [free_port(), free_port()]
    stack = contextlib.ExitStack()
    urls: list = [None, None]
    errors: list = []

    def start(i: int):
        try:
            e = env | {"DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(ports[i])}
            urls[i] = stack.enter_context(vllm_server(model_dir, ARGS, e, max_model_len=2048,
                                                      log_path=tmp / f"engine{'AB'[i]}.log"))
        except Exception as exc:  # noqa: BLE001 - reported below, after both tried
            errors.append(exc)

    with stack:
        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield [(urls[i], f"http://127.0.0.1:{ports[i]}/metrics") for i in range(2)]


def fresh(n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, 2000) for _ in range(PREFIX_BLOCKS * 128 + SUFFIX_TOKENS)] for _ in range(n)]


def kill_and_restart(server: RedisServer, model: str, a_url: str, a_metrics: str, b_url: str, b_metrics: str) -> dict:
    """The store is killed while both engines serve: no request fails; it comes back on its port (empty) and
    kvbm reconnects by itself: A's new hit prefix is written again and B onboards it."""
    before = scrape(b_metrics)
    server.kill()
    down = fresh(2, 99)
    for tokens in down:  # lookups and writes meet a dead store: misses
        complete(a_url, model, tokens)
        complete(a_url, model, tokens)
        complete(b_url, model, tokens)
    server.start()
    deadline = time.monotonic() + 60
    back, onboarded = fresh(6, 100), before["kvbm_onboard_blocks_r2d"]
    for tokens in back:  # the stores back off up to 5 s: try new prefixes until one goes A -> G4 -> B
        complete(a_url, model, tokens)
        complete(a_url, model, tokens)
        time.sleep(1.0)
        complete(a_url, model, [7] * 20)
        complete(b_url, model, tokens)
        onboarded = scrape(b_metrics)["kvbm_onboard_blocks_r2d"]
        if onboarded > before["kvbm_onboard_blocks_r2d"] or time.monotonic() > deadline:
            break
    health = [urllib.request.urlopen(u + "/health", timeout=10).status for u in (a_url, b_url)]
    return {"before": before, "after": scrape(b_metrics), "a_after": scrape(a_metrics), "health": health,
            "onboarded_after_restart": onboarded - before["kvbm_onboard_blocks_r2d"]}


def run_pair(model_dir, backend: str, url: str, where, tmp: Path, secret: str | None = None,
             restart: RedisServer | None = None) -> dict:
    env = {"DYN_KVBM_CPU_CACHE_GB": "0.2", "DYN_KVBM_REMOTE_URL": url, "PYTHONHASHSEED": None}
    if secret:
        env["DYN_KVBM_REMOTE_SECRET"] = secret
    model = str(model_dir)
    ps = prompts()
    with two_engines(model_dir, env, tmp) as ((a_url, a_metrics), (b_url, b_metrics)):
        first, reference = [], []
        forged = []
        for i, tokens in enumerate(ps):
            first.append(complete(a_url, model, tokens))       # computed: G1 and G2, frequency 1
            reference.append(complete(a_url, model, tokens))   # a G1 hit: frequency 2, written to G4
            keys = wait_keys(backend, where, PREFIX_BLOCKS * (i + 1))
            if i == 0 and secret:  # negative control: a client without the secret rewrites prompt 0's values
                client = redis.Redis.from_url(url)
                for key in keys:
                    value = client.get(key)
                    client.set(key, value[:1000] + bytes([value[1000] ^ 0xFF]) + value[1001:])
                    forged.append(key)
                client.close()
        complete(a_url, model, [7] * 20)  # one more step: A's leader hears its G4 writes finish
        a_kvbm = scrape(a_metrics)
        answers = [complete(b_url, model, tokens) for tokens in ps]
        time.sleep(0.5)
        b_kvbm, b_vllm = scrape(b_metrics), scrape(b_url + "/metrics")
        fault = kill_and_restart(restart, model, a_url, a_metrics, b_url, b_metrics) if restart else None
        log_b = (tmp / "engineB.log").read_text(errors="replace")
    return {"first": first, "reference": reference, "answers": answers, "a": a_kvbm, "b": b_kvbm, "b_vllm": b_vllm,
            "forged": forged, "log_b": log_b, "fault": fault}


@pytest.fixture(scope="module")
def redis_pair(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("g4-redis")
    with RedisServer() as srv:
        yield run_pair(tiny_model_dir, "redis", srv.url, srv, tmp, secret=SECRET, restart=srv)


@pytest.fixture(scope="module")
def cluster_pair(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("g4-cluster")
    nodes = local_cluster(3)
    try:
        yield run_pair(tiny_model_dir, "cluster", nodes[0].url, nodes, tmp)
    finally:
        stop_all(nodes)


@pytest.fixture(scope="module")
def file_pair(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("g4-file")
    shared = tmp / "shared"
    yield run_pair(tiny_model_dir, "file", shared.as_uri(), shared, tmp)


def check_shared(run: dict, skip: set = frozenset()) -> None:
    a, b, b_vllm = run["a"], run["b"], run["b_vllm"]
    assert a["kvbm_offload_blocks_h2r"] >= NUM_PROMPTS * PREFIX_BLOCKS, "A did not write its hit prefixes to G4"
    assert a["kvbm_onboard_blocks_r2d"] == 0
    served = NUM_PROMPTS - len(skip)
    assert b["kvbm_onboard_blocks_r2d"] >= served * PREFIX_BLOCKS, "B did not onboard A's prefixes from G4"
    assert b["kvbm_remote_lookup_hits_total"] >= served * PREFIX_BLOCKS
    assert b_vllm["vllm:external_prefix_cache_hits_total"] >= served * PREFIX_BLOCKS * 128
    # B writes back only what it had to recompute (the rejected values: it repairs them), never what it loaded
    assert b["kvbm_offload_blocks_h2r"] <= len(skip) * PREFIX_BLOCKS, "B rewrote blocks G4 already holds"
    for i in range(NUM_PROMPTS):
        if i not in skip:
            assert run["answers"][i] == run["reference"][i], f"prompt {i}: B's answer differs from A's"


def test_second_engine_onboards_from_one_redis_server(redis_pair):
    check_shared(redis_pair, skip={0})


def test_a_value_rewritten_without_the_secret_is_never_served(redis_pair):
    b = redis_pair["b"]
    assert redis_pair["forged"], "the control rewrote nothing"
    assert b['kvbm_remote_failures_total{reason="load"}'] >= 1, "a forged value was not rejected"
    assert b["kvbm_onboard_blocks_r2d"] < NUM_PROMPTS * PREFIX_BLOCKS  # prompt 0's blocks were not loaded
    assert "blocks failed to load and will be recomputed" in redis_pair["log_b"]
    assert all(isinstance(t, str) and t for t in redis_pair["answers"])  # served: recomputed, not failed


def test_second_engine_onboards_from_a_redis_cluster(cluster_pair):
    check_shared(cluster_pair)


def test_second_engine_onboards_from_a_shared_directory(file_pair):
    check_shared(file_pair)


def test_store_killed_and_restarted_under_two_engines(redis_pair):
    """No failed request (complete() raises on any HTTP error), both engines healthy, the failures counted,
    and G4 used again after the restart without restarting an engine."""
    fault = redis_pair["fault"]
    assert fault["health"] == [200, 200]
    failures = sum(v for k, v in fault["after"].items() if k.startswith("kvbm_remote_failures_total"))
    before = sum(v for k, v in fault["before"].items() if k.startswith("kvbm_remote_failures_total"))
    assert failures > before or fault["after"]["kvbm_remote_tier_up"] == 1
    assert fault["onboarded_after_restart"] >= PREFIX_BLOCKS, "kvbm never used the restarted store"
    assert "shared tier" in redis_pair["log_b"] and "reachable again" in redis_pair["log_b"]
