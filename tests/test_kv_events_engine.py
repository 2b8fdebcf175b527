"""KV events on the real engine: vLLM CPU with --kv-events-config (ZMQ publisher) and KVBM with a tiny G2 and a
G3, a ZMQ subscriber decoding vLLM's KVEventBatch the way vLLM's own example subscriber does.

Workload: 5 prompts of 1,600 tokens (12 full blocks of 128 tokens each) through a G2 of 16 blocks, so kvbm
stores blocks in G2, evicts most of them (cascading to G3, the disk filter off) and evicts from G3 (24
blocks). What a router must be able to rely on:
- kvbm's BlockStored (medium CPU) names blocks vLLM's own G1 BlockStored named, with the same hash, parent and
  token ids (one engine block hash, so a router joins G1 and G2 residencies on it);
- BlockRemoved (CPU) follows G2 evictions, BlockStored / BlockRemoved (STORAGE) follow G3;
- replaying kvbm's events gives kvbm's own counts (its Prometheus exporter: blocks offloaded to host and disk,
  evicted from disk, held per tier), never holds more blocks than a tier has slots, and never removes a
  block it was not told about.
Negative control: the engine publishes vLLM's G1 events throughout, so a subscriber that decodes them and
finds no CPU event before kvbm's first store commit shows the CPU events are kvbm's. (Events off is tested
on the real connector without an engine, test_kv_events.py: kvbm stores the same blocks and publishes nothing.)
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request

import msgspec
import pytest
import zmq

from vllm_server import free_port, vllm_server

pytestmark = pytest.mark.engine

KV_TRANSFER = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                          "kv_connector_module_path": "kvbm.vllm_integration.connector"})
G2_SLOTS, G3_SLOTS = 16, 24
NUM_PROMPTS, PROMPT_TOKENS, BLOCK = 5, 1600, 128


class Subscriber:
    """SUB socket on vLLM's publisher; decodes (topic, seq, KVEventBatch) messages in a thread."""

    def __init__(self, endpoint: str):
        from vllm.distributed.kv_events import KVEventBatch

        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(endpoint)
        # ZMQ's slow joiner: a PUB drops what it sends before the subscription arrives
        assert monitor.poll(30_000), f"no ZMQ handshake with vLLM's publisher at {endpoint}"
        self.sock.disable_monitor()
        monitor.close(linger=0)
        time.sleep(1.0)  # the subscription itself travels after the handshake
        self.events: list = []  # (seq, event)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop.is_set():
            if poller.poll(100):
                _topic, seq, payload = self.sock.recv_multipart()
                batch = self.decoder.decode(payload)
                self.events.extend((int.from_bytes(seq, "big"), e) for e in batch.events)

    def settle(self, metrics_url: str, timeout_s: float = 30.0) -> dict[str, float]:
        """kvbm's metrics once the events received account for every block kvbm stored (publishing is
        asynchronous); after `timeout_s` the last scrape, and the tests say what is missing."""
        deadline = time.monotonic() + timeout_s
        while True:
            time.sleep(1.0)
            metrics = scrape(metrics_url)
            stored = {"CPU": 0, "STORAGE": 0}
            for _, e in list(self.events):
                if type(e).__name__ == "BlockStored" and e.medium in stored:
                    stored[e.medium] += len(e.block_hashes)
            if (stored["CPU"] == metrics["kvbm_offload_blocks_d2h"] and stored["STORAGE"] == metrics["kvbm_offload_blocks_h2d"]) \
                    or time.monotonic() > deadline:
                return metrics

    def close(self) -> list:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close(linger=0)
        self.ctx.term()
        return [e for _, e in sorted(self.events, key=lambda x: x[0])]


def _complete(url: str, model: str, tokens: list[int]) -> None:
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


@pytest.fixture(scope="module")
def events(tiny_model_dir, tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    disk = tmp_path_factory.mktemp("g3")
    env = {"DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(metrics_port), "VLLM_CPU_KVCACHE_SPACE": None, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(G2_SLOTS),
           "DYN_KVBM_DISK_CACHE_DIR": str(disk), "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(G3_SLOTS),
           "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true", "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"}
    kv_events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}",
                            "topic": "kv"})
    args = ["--kv-cache-memory-bytes", str(48 * 256 * 1024), "--seed", "0", "--kv-transfer-config", KV_TRANSFER,
            "--kv-events-config", kv_events]
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 2000) for _ in range(PROMPT_TOKENS)] for _ in range(NUM_PROMPTS)]
    with vllm_server(tiny_model_dir, args, env, max_model_len=4096) as url:
        sub = Subscriber(f"tcp://127.0.0.1:{port}")
        try:
            for tokens in prompts:
                _complete(url, str(tiny_model_dir), tokens)
            _complete(url, str(tiny_model_dir), [7] * 40)  # one more step: the last stores' reports commit
            metrics = sub.settle(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            got = sub.close()
    return got, prompts, metrics


def scrape(url: str) -> dict[str, float]:
    """kvbm's Prometheus text -> {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _blocks(event) -> list[tuple]:
    """(hash, parent hash, token ids) of each block of a BlockStored."""
    out, parent = [], event.parent_block_hash
    for i, h in enumerate(event.block_hashes):
        out.append((h, parent, tuple(event.token_ids[i * event.block_size:(i + 1) * event.block_size])))
        parent = h
    return out


def _kind(event) -> str:
    return type(event).__name__


def test_offloaded_blocks_are_announced_on_cpu_with_g1s_hashes_parents_and_tokens(events):
    got, prompts, metrics = events
    g1 = {}
    for e in got:
        if _kind(e) == "BlockStored" and e.medium not in ("CPU", "STORAGE"):
            for h, parent, tokens in _blocks(e):
                g1[h] = (parent, tokens)
    cpu = [b for e in got if _kind(e) == "BlockStored" and e.medium == "CPU" for b in _blocks(e)]
    assert {e.medium for e in got if _kind(e) == "BlockStored"} == {"GPU", "CPU", "STORAGE"}
    assert len(cpu) == metrics["kvbm_offload_blocks_d2h"] > 0, "one CPU BlockStored per block kvbm offloaded"
    for h, parent, tokens in cpu:
        assert h in g1, "a CPU block whose hash vLLM's G1 never announced"
        assert (parent, tokens) == g1[h], "a CPU block's parent or tokens differ from G1's for the same hash"
        assert len(tokens) == BLOCK
    # the prompts' own tokens, block by block (the hashes name the right content)
    prompt_blocks = {tuple(p[i * BLOCK:(i + 1) * BLOCK]) for p in prompts for i in range(len(p) // BLOCK)}
    assert {tokens for _, _, tokens in cpu} <= prompt_blocks


def test_evictions_are_announced_and_a_replay_matches_the_tiers(events):
    got, _, metrics = events
    held = {"CPU": set(), "STORAGE": set()}
    peak = {"CPU": 0, "STORAGE": 0}
    removed = {"CPU": 0, "STORAGE": 0}
    for e in got:
        if getattr(e, "medium", None) not in held:
            continue
        if _kind(e) == "BlockStored":
            assert e.locality == "LOCAL"
            for h in e.block_hashes:
                assert h not in held[e.medium], f"{e.medium}: stored twice without a removal"
                held[e.medium].add(h)
            peak[e.medium] = max(peak[e.medium], len(held[e.medium]))
        elif _kind(e) == "BlockRemoved":
            for h in e.block_hashes:
                assert h in held[e.medium], f"{e.medium}: removed a block never announced stored"
                held[e.medium].discard(h)
                removed[e.medium] += 1
    assert removed["CPU"] > 0 and removed["STORAGE"] > 0
    assert peak["CPU"] <= G2_SLOTS and peak["STORAGE"] <= G3_SLOTS
    stored_disk = sum(len(e.block_hashes) for e in got if _kind(e) == "BlockStored" and e.medium == "STORAGE")
    assert stored_disk == metrics["kvbm_offload_blocks_h2d"]
    assert removed["STORAGE"] == metrics["kvbm_cache_evictions"]  # the disk filter is off: evictions are G3's
    assert len(held["CPU"]) == metrics['kvbm_tier_usage_blocks{tier="host"}']
    assert len(held["STORAGE"]) == metrics['kvbm_tier_usage_blocks{tier="disk"}']


def test_cpu_events_appear_only_once_kvbm_stored_something(events):
    """Negative control: the first events are vLLM's own (G1) -- the subscriber is not just echoing one medium."""
    got, _, _ = events
    first_cpu = next(i for i, e in enumerate(got) if getattr(e, "medium", None) == "CPU")
    assert first_cpu > 0 and any(_kind(e) == "BlockStored" and e.medium == "GPU" for e in got[:first_cpu])
