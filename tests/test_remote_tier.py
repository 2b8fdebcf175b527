"""The shared tier (G4) wired into the leader and workers, on real redis-server processes and a real directory.

Two scripted engines (tests/scripted_engine.py: the real leader, workers, host tiers and transfer threads,
driven as vLLM drives the connector) share one store: the second onboards the prefixes the first computed,
G4 -> G2 -> G1, and every loaded block is checked byte for byte on every rank. Negative controls: another
secret, another model fingerprint. Faults on a real server: killed and restarted, down at start, wrong
password, full (maxmemory), slow (DEBUG SLEEP), a value evicted between lookup and load. No request fails, the
lost hits are counted.
"""

from __future__ import annotations

import logging
import time

import pytest

from kvbm.mechanism.remote.local_server import RedisServer, available, free_port, local_cluster, stop_all
from kvbm.policy import FrequencyFilter
from redis_fixtures import server, url  # noqa: F401 - pytest fixtures
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed: run `make redis` "
                                                        "(Debian package redis-server)")


def serve(eng: ScriptedEngine, prefixes=None, rounds: int = 1) -> None:
    """Each prefix once per round (plus a distinct tail), each request run to completion."""
    for r in range(rounds):
        for p in (prefixes if prefixes is not None else range(len(eng.prefixes))):
            req_id = eng.add_request()
            req = eng.requests[req_id]
            req.tokens = list(eng.prefixes[p]) + [1500 + 10 * r + p] * 3
            req.num_prompt, req.max_out = len(req.tokens), 1
            eng.run_to_completion(req_id)


def settle(eng: ScriptedEngine, timeout: float = 10.0) -> None:
    """Run empty steps until every job (G4 writes included) has reported."""
    deadline = time.monotonic() + timeout
    while eng.leader.jobs_in_flight and time.monotonic() < deadline:
        eng.step(admit=0)
        time.sleep(0.005)
    assert not eng.leader.jobs_in_flight


def make(tmp_path, name: str, url: str | None, **kw) -> ScriptedEngine:
    d = tmp_path / name
    d.mkdir()
    kw.setdefault("world_size", 2)
    kw.setdefault("seed", 7)
    kw.setdefault("num_prefixes", 4)
    kw.setdefault("disk_slots", 0)
    return ScriptedEngine(d, remote_url=url, **kw)


def computed_by_first(tmp_path, url: str, **kw) -> ScriptedEngine:
    first = make(tmp_path, "a", url, **kw)
    try:
        serve(first)
        settle(first)
        first.check_quiescent()
        assert first.leader.manager.stats.offloaded_to_remote > 0, "the first engine wrote nothing to G4"
        assert first.leader.stats.remote_bytes_written > 0
    finally:
        first.close()
    return first


@pytest.fixture(scope="module")
def cluster():
    servers = local_cluster(3)
    try:
        yield servers
    finally:
        stop_all(servers)


@pytest.mark.parametrize("backend", ["redis", "cluster", "file"])
def test_second_engine_onboards_what_the_first_computed(tmp_path, url, backend, request):
    """Engine B (another process's tiers: nothing local) finds A's prefixes in G4, loads them through G2, and
    every loaded block holds the KV of its hash on both ranks. Lookups answered 'ask again later' first."""
    if backend == "file":
        url = (tmp_path / "shared").as_uri()
    elif backend == "cluster":
        nodes = request.getfixturevalue("cluster")
        url = nodes[1].url  # any node: the cluster is detected
    computed_by_first(tmp_path, url)
    second = make(tmp_path, "b", url)
    try:
        if backend == "cluster":
            assert second.workers[0].engine.remote.cluster
        serve(second)
        settle(second)
        second.check_quiescent()
        policy, stats = second.leader.manager.stats, second.leader.stats
        assert policy.onboarded_from_remote > 0 and policy.remote_load_failed == 0
        assert stats.remote_lookup_hits >= policy.onboarded_from_remote
        assert second.num_ask_again > 0, "a G4 lookup never deferred the request: it was answered synchronously"
        assert second.num_checked_loads >= 4 and second.num_loaded_blocks >= policy.onboarded_from_remote
        assert policy.offloaded_to_remote == 0, "B rewrote blocks G4 already holds"
        # the staged blocks are G2 blocks now: the last prefix again hits host memory, not the network
        before = policy.onboarded_from_host
        serve(second, prefixes=[3])
        assert policy.onboarded_from_host > before
    finally:
        second.close()


def test_another_secret_is_never_served(tmp_path, url):
    """A value written under another DYN_KVBM_REMOTE_SECRET exists (the lookup finds it) but its MAC does not
    verify: every such load fails, is counted, and the engine recomputes (the KV checks still hold)."""
    computed_by_first(tmp_path, url, remote_secret="alpha")
    control = make(tmp_path, "control", url, remote_secret="alpha")  # negative control: the same secret loads
    try:
        serve(control, prefixes=[0])
        assert control.leader.manager.stats.onboarded_from_remote > 0
    finally:
        control.close()
    other = make(tmp_path, "b", url, remote_secret="beta")
    try:
        serve(other)
        settle(other)
        other.check_quiescent()
        policy = other.leader.manager.stats
        assert policy.onboarded_from_remote == 0
        assert policy.remote_load_failed > 0
        # vLLM recomputes from the first failed block and looks the request up again: the bad values are not
        # offered again (else the request would loop, load failure after load failure, never served)
        from scripted_engine import chain_hashes

        tokens = list(other.prefixes[0]) + [1234] * 3
        assert other.leader.num_matched_tokens("again", chain_hashes(tokens), 0, len(tokens)) == 0
    finally:
        other.close()


def test_another_model_fingerprint_misses(tmp_path, url):
    """Keys carry the fingerprint: an engine of another model never even finds A's blocks."""
    computed_by_first(tmp_path, url)
    other = make(tmp_path, "b", url, model="another-model")
    try:
        serve(other)
        settle(other)
        assert other.leader.stats.remote_lookup_hits == 0
        assert other.leader.manager.stats.onboarded_from_remote == 0
    finally:
        other.close()


def test_frequency_filter_keeps_write_once_blocks_local(tmp_path, url):
    """With the disk offload filter on, blocks computed once are not written to G4; a prefix hit again is."""
    eng = make(tmp_path, "a", url, disk_filter=FrequencyFilter())
    try:
        serve(eng, prefixes=[0, 1])
        settle(eng)
        assert eng.leader.manager.stats.offloaded_to_remote == 0
        serve(eng, prefixes=[0])  # a G2 hit: frequency 2, admitted
        settle(eng)
        assert eng.leader.manager.stats.offloaded_to_remote > 0
        eng.check_quiescent()
    finally:
        eng.close()


def test_value_evicted_between_lookup_and_load(tmp_path, url, server):
    """The lookup finds the blocks, the store loses them before the load: load errors, recomputed, counted."""
    computed_by_first(tmp_path, url)
    second = make(tmp_path, "b", url)
    try:
        req_id = second.add_request()
        req = second.requests[req_id]
        req.tokens = list(second.prefixes[1]) + [1998] * 3
        req.num_prompt, req.max_out = len(req.tokens), 1
        original = second.leader._remote_match

        def evict_after_lookup(rid, hashes):
            n = original(rid, hashes)
            if n:  # the lookup answered hits: the store loses them now, before on_alloc and the load
                server.cli("flushall")
            return n

        second.leader._remote_match = evict_after_lookup
        second.run_to_completion(req_id)
        settle(second)
        second.check_quiescent()
        assert second.leader.manager.stats.remote_load_failed > 0
    finally:
        second.close()


def test_store_killed_mid_run_then_restarted(tmp_path):
    """The store dies mid-run: requests go on (misses), the failures are counted; it comes back on the same
    port and kvbm reconnects by itself (G4 writes and hits resume)."""
    port = free_port()
    srv = RedisServer(port).start()
    try:
        eng = make(tmp_path, "a", srv.url)
        try:
            serve(eng, prefixes=[0])
            settle(eng)
            assert eng.leader.manager.stats.offloaded_to_remote > 0
            srv.kill()
            serve(eng, prefixes=[1, 2])  # new prefixes: lookups and writes meet a dead store
            settle(eng)
            assert not eng.leader.remote.available or eng.leader.manager.stats.remote_offload_failed > 0
            assert eng.workers[0].engine.remote.stats()["errors"] + eng.leader.remote.stats()["errors"] > 0
            srv = RedisServer(port).start()
            deadline = time.monotonic() + 15
            written = eng.leader.manager.stats.offloaded_to_remote
            while time.monotonic() < deadline and eng.leader.manager.stats.offloaded_to_remote == written:
                serve(eng, prefixes=[3, 3])  # a new prefix, hit again: worth writing once the store is back
                settle(eng)
                eng.prefixes[3] = [p + 1 for p in eng.prefixes[3]]
                time.sleep(0.2)
            assert eng.leader.manager.stats.offloaded_to_remote > written, "kvbm never wrote to the restarted store"
            eng.check_quiescent()
        finally:
            eng.close()
    finally:
        srv.kill()


def test_serve_dry_run_redacts_the_store_password():
    """`kvbm serve --remote-url` sets DYN_KVBM_REMOTE_URL; the printed command never shows the password."""
    import json

    from typer.testing import CliRunner

    from kvbm_cli.app import app

    res = CliRunner().invoke(app, ["serve", "--connector", "kvbm", "--cpu-cache-gb", "1", "--remote-url",
                                   "redis://user:hunter2@127.0.0.1:6379/0", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert "hunter2" not in res.output
    env = json.loads(res.stdout)["env_set"]
    assert env["DYN_KVBM_REMOTE_URL"].startswith("redis://user:") and "127.0.0.1:6379" in env["DYN_KVBM_REMOTE_URL"]


def test_store_down_at_start_one_warning_then_serving(tmp_path, caplog):
    """Nothing listens at start-up: one warning naming DYN_KVBM_REMOTE_URL per rank, requests are served."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        eng = make(tmp_path, "a", url, world_size=1)
    try:
        warnings = [r.getMessage() for r in caplog.records if "DYN_KVBM_REMOTE_URL" in r.getMessage()]
        assert len(warnings) == 1, warnings
        serve(eng)
        settle(eng)
        eng.check_quiescent()
        assert eng.num_checked_loads == 0 and eng.leader.manager.stats.onboarded_from_remote == 0
    finally:
        eng.close()


def test_wrong_password_one_warning_no_g4(tmp_path, caplog):
    """A password-protected server and a wrong password: one warning naming the variable (the password
    redacted), no shared tier at all, serving goes on."""
    with RedisServer(password="right-one") as srv:
        bad = srv.url.replace("right-one", "wrong-one")
        with caplog.at_level(logging.WARNING, logger="kvbm"):
            eng = make(tmp_path, "a", bad, world_size=1)
        try:
            text = [r.getMessage() for r in caplog.records if "DYN_KVBM_REMOTE_URL" in r.getMessage()]
            assert len(text) == 1 and "wrong-one" not in text[0], text
            assert eng.leader.remote is None and eng.leader.remote_fingerprints is None
            serve(eng)
            eng.check_quiescent()
        finally:
            eng.close()
        # negative control: the right password gives G4
        good = make(tmp_path, "b", srv.url, world_size=1)
        try:
            assert good.leader.remote is not None
        finally:
            good.close()


def test_full_store_counts_failed_writes(tmp_path):
    """maxmemory reached with noeviction: G4 writes are refused and counted, every request is served."""
    with RedisServer(None, "--maxmemory", "100kb", "--maxmemory-policy", "noeviction") as srv:  # below its own use
        eng = make(tmp_path, "a", srv.url)
        try:
            serve(eng)
            settle(eng)
            eng.check_quiescent()
            assert eng.leader.manager.stats.remote_offload_failed > 0
            assert eng.leader.manager.stats.offloaded_to_remote == 0
        finally:
            eng.close()


def test_slow_store_never_blocks_a_step(tmp_path, url, server):
    """DEBUG SLEEP holds the server: lookups stay pending (the step does not wait), time out as misses, and
    every request is served; no step takes the sleep's length."""
    computed_by_first(tmp_path, url)
    second = make(tmp_path, "b", url)
    second.leader.remote_lookup_timeout_s = 0.2
    try:
        import subprocess

        sleeper = subprocess.Popen(["redis-cli", "-p", str(server.port), "debug", "sleep", "2"],
                                   stdout=subprocess.DEVNULL)
        time.sleep(0.1)
        worst = 0.0
        for p in range(4):
            req_id = second.add_request()
            req = second.requests[req_id]
            req.tokens = list(second.prefixes[p]) + [1990 + p] * 3
            req.num_prompt, req.max_out = len(req.tokens), 1
            for _ in range(2000):
                if req_id not in second.requests:
                    break
                t0 = time.monotonic()
                second.step(admit=1)
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.002)
        sleeper.wait(timeout=30)
        second.drain()
        settle(second)
        second.check_quiescent()
        assert worst < 1.0, f"a step waited {worst:.2f} s on the store"
        assert second.leader.stats.remote_lookup_timeouts > 0
    finally:
        second.close()


def test_world_size_two_needs_every_rank(tmp_path, url, server):
    """A block is a G4 hit only when every rank's shard is there: delete rank 1's keys, B finds nothing."""
    computed_by_first(tmp_path, url)
    keys = server.cli("--scan", "--pattern", "kvbm:*").split()
    assert keys
    fps = {k.split(":")[1] for k in keys}
    assert len(fps) == 2, "each rank writes its shard under its own fingerprint"
    rank1 = sorted(fps)[0]
    for k in keys:
        if k.split(":")[1] == rank1:
            server.cli("del", k)
    second = make(tmp_path, "b", url)
    try:
        serve(second)
        settle(second)
        assert second.leader.stats.remote_lookup_hits == 0
        assert second.leader.manager.stats.onboarded_from_remote == 0
    finally:
        second.close()


def test_dashboard_and_exporter_show_the_shared_tier(tmp_path, url):
    """The Grafana dashboard queries the G4 series, and the exporter serves them with values that moved."""
    from prom_server import dashboard_exprs

    from kvbm.metrics import KvbmCollector

    exprs = " ".join(e for _, e in dashboard_exprs())
    for name in ("kvbm_offload_blocks_h2r", "kvbm_onboard_blocks_r2d", "kvbm_remote_lookup_hits_total",
                 "kvbm_remote_failures_total", "kvbm_remote_cache_hit_rate"):
        assert name in exprs, name
    computed_by_first(tmp_path, url)
    second = make(tmp_path, "b", url)
    try:
        serve(second)
        settle(second)
        samples = {s.name + str(sorted(s.labels.items())): s.value
                   for family in KvbmCollector(second.leader).collect() for s in family.samples}
        assert samples["kvbm_onboard_blocks_r2d[]"] == second.leader.manager.stats.onboarded_from_remote > 0
        assert samples["kvbm_remote_lookup_hits_total[]"] > 0
        assert samples["kvbm_remote_cache_hit_rate[]"] > 0
        assert samples["kvbm_remote_tier_up[]"] == 1
        assert samples["kvbm_remote_failures_total[('reason', 'load')]"] == 0
    finally:
        second.close()


def test_staging_evictions_cascade_to_disk(tmp_path, url):
    """A G4 hit takes a host slot; when that evicts a host block, the block goes to disk first (snapshotted
    before the G4 bytes overwrite the slot), as a job of its own. Every loaded block and every disk block is
    checked; nothing leaks."""
    computed_by_first(tmp_path, url)
    second = make(tmp_path, "b", url, host_slots=4, disk_slots=24)
    try:
        serve(second)
        settle(second)
        second.check_quiescent()
        policy = second.leader.manager.stats
        assert policy.onboarded_from_remote > 0 and policy.offloaded_to_disk > 0
        before = policy.onboarded_from_disk
        serve(second, prefixes=[0])  # evicted from the small host tier by now: it comes back from disk
        settle(second)
        second.check_quiescent()
        assert policy.onboarded_from_disk > before
    finally:
        second.close()
