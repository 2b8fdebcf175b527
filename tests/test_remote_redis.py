"""The shared tier (G4) on real redis-server processes: a single server, a 3-node Redis Cluster, and faults.

Every server is Debian's redis-server started here on a free loopback port with nothing persisted; nothing is
mocked. Each fault test first shows the check passing on a healthy store (the negative control), then the fault.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest
import redis

from kvbm.mechanism.remote import OVERHEAD, open_store, redacted
from kvbm.mechanism.remote.local_server import RedisServer, available, local_cluster, self_signed
from redis_fixtures import server, url  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed: run `make redis` "
                                                        "(Debian package redis-server)")

BLOCK = 64 << 10
FP = bytes(range(16))
FP_OTHER = bytes(range(1, 17))


def blocks(n: int, seed: int = 0, size: int = BLOCK) -> dict[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"blk-{seed}-{i}".encode(): rng.integers(0, 256, size, dtype=np.uint8) for i in range(n)}


def store_of(url: str, secret=None, fp: bytes = FP, **kw):
    kw.setdefault("timeout", 2.0)  # generous: a loaded 2-core CI runner; fault tests set their own
    kw.setdefault("backoff_s", (0.05, 0.2))
    store = open_store(url, fp, secret, block_bytes=BLOCK, **kw)
    assert store is not None, f"could not open {redacted(url)}"
    return store


def assert_exact(store, data: dict[bytes, np.ndarray]) -> None:
    got = store.get_many(list(data)).result(timeout=30)
    assert [g is not None for g in got] == [True] * len(data)
    for g, want in zip(got, data.values()):
        assert bytes(g) == want.tobytes()


def test_round_trip_byte_exact_and_misses(url):
    data = blocks(200)
    with store_of(url) as store:
        assert all(store.put_many(list(data.items())).result(timeout=30))
        assert_exact(store, data)
        absent = [b"never-stored-1", b"never-stored-2"]
        assert store.get_many(absent).result() == [None, None]
        pieces = [(h, [v[:1000], v[1000:]]) for h, v in blocks(3, seed=9).items()]  # a block given as pieces
        assert all(store.put_many(pieces).result())
        assert_exact(store, {h: np.concatenate(p) for h, p in pieces})
        s = store.stats()
        assert s["puts"] == 203 and s["hits"] == 203 and s["misses"] == 2 and s["rejected"] == 0
        assert s["bytes_read"] == s["bytes_written"] == 203 * BLOCK and s["errors"] == 0


def test_lookups_are_pipelined(url, server):
    """1,000 EXISTS arrive in a handful of socket reads; the control (one call per key) needs one read each."""
    data = blocks(50)
    client = redis.Redis.from_url(url)
    with store_of(url) as store:
        store.put_many(list(data.items())).result()
        keys = list(data) + [f"absent-{i}".encode() for i in range(950)]

        def reads() -> int:
            return int(client.info("stats")["total_reads_processed"])

        before = reads()
        found = store.contains_many(keys).result(timeout=10)
        pipelined = reads() - before - 1  # the INFO call itself
        assert found == [True] * 50 + [False] * 950
        before = reads()
        for k in keys[:50]:  # negative control: the same lookups one by one
            client.exists(store.key(k))
        one_by_one = reads() - before - 1
    assert pipelined <= 20 < 50 <= one_by_one


def test_cluster_round_trip_spreads_over_nodes_and_survives_a_node_restart(tmp_path):
    nodes = local_cluster(3, tmp_path)
    try:
        data = blocks(120, seed=1)
        with store_of(nodes[2].url) as store:  # reached from any node
            assert store.cluster
            assert all(store.put_many(list(data.items())).result(timeout=30))
            assert_exact(store, data)
            assert store.contains_many(list(data)[:10] + [b"absent"]).result() == [True] * 10 + [False]
            sizes = [int(n.cli("dbsize")) for n in nodes]
            assert sum(sizes) == 120 and min(sizes) > 10, sizes
            victim = nodes[1]
            victim.kill()  # a node dies mid-run: misses, no exception
            assert store.get_many(list(data)).result(timeout=5) == [None] * 120 and not store.reachable
            nodes[1] = RedisServer(victim.port, *victim.args, workdir=victim.workdir).start()  # rejoins (nodes.conf)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not all(store.put_many(list(data.items())).result()):
                time.sleep(0.1)
            assert_exact(store, data)
            assert store.stats()["reconnects"] >= 1
    finally:
        for n in nodes:
            n.kill()


def test_value_from_a_writer_without_the_secret_is_a_miss(url):
    good = blocks(20, seed=2)
    with store_of(url, secret="s3cret") as reader:
        reader.put_many(list(good.items())).result()
        assert_exact(reader, good)  # control: the secret's own values are served
        forged = {h: np.full(BLOCK, 7, dtype=np.uint8) for h in good}
        with store_of(url) as attacker:  # can write to Redis, lacks the secret
            assert all(attacker.put_many(list(forged.items())).result())
            assert_exact(attacker, forged)  # the forgery is well formed: only the MAC tells it apart
        with store_of(url, secret="another") as other:
            other.put_many(list(blocks(1, seed=3).items())).result()
        assert reader.get_many(list(good)).result() == [None] * 20
        assert reader.get_many(list(blocks(1, seed=3))).result() == [None]
        assert reader.stats()["rejected"] == 21


def test_corrupt_truncated_and_foreign_values_are_misses(url):
    data = blocks(4, seed=4)
    client = redis.Redis.from_url(url)
    with store_of(url) as store, store_of(url, fp=FP_OTHER) as foreign:
        store.put_many(list(data.items())).result()
        h = list(data)
        assert_exact(store, data)  # control
        key = [store.key(x) for x in h]
        raw = client.get(key[0])
        client.setrange(key[0], 100, bytes([raw[100] ^ 0xFF]))          # one flipped data byte
        client.set(key[1], client.get(key[1])[:-1])                      # truncated
        client.set(key[2], client.get(key[3]))                           # another block's value
        client.set(foreign.key(h[3]), client.get(key[3]))                # same block, another model's key
        assert store.get_many(h).result() == [None, None, None, store.get_many([h[3]]).result()[0]]
        assert foreign.get_many([h[3]]).result() == [None]
        assert store.stats()["rejected"] == 3 and foreign.stats()["rejected"] == 1
        assert len(raw) == BLOCK + OVERHEAD


def test_server_killed_then_restarted(tmp_path, caplog):
    srv = RedisServer(workdir=tmp_path).start()
    data, later = blocks(10, seed=5), blocks(10, seed=6)
    try:
        with store_of(srv.url) as store:
            store.put_many(list(data.items())).result()
            assert_exact(store, data)  # control
            srv.kill()
            with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
                t = time.monotonic()
                assert store.get_many(list(data)).result(timeout=5) == [None] * 10
                assert store.put_many(list(later.items())).result(timeout=5) == [False] * 10
                assert store.contains_many(list(data)).result(timeout=5) == [False] * 10
                assert time.monotonic() - t < 2.5
            assert not store.reachable
            assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
            for _ in range(20):  # no busy loop: a burst of operations during the backoff is skipped, not sent
                store.contains_many([b"x"]).result()
            assert store.stats()["skipped"] > 0
            srv = RedisServer(srv.port, workdir=tmp_path).start()  # restarted, empty (nothing persisted)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not all(store.put_many(list(later.items())).result()):
                time.sleep(0.05)
            assert_exact(store, later)
            assert store.get_many(list(data)).result() == [None] * 10  # lost with the restart: misses
            s = store.stats()
            assert store.reachable and s["reconnects"] >= 1 and s["errors"] >= 1
    finally:
        srv.kill()


def test_store_down_at_start_is_one_warning_and_none(caplog):
    with RedisServer() as srv:
        port = srv.port
    with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
        assert open_store(f"redis://127.0.0.1:{port}/0", FP, timeout=0.3) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "DYN_KVBM_REMOTE_URL" in lines[0] and "unreachable" in lines[0]


def test_store_down_at_start_can_be_kept_and_is_used_once_up(tmp_path, caplog):
    port = RedisServer().port
    with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
        store = open_store(f"redis://127.0.0.1:{port}/0", FP, block_bytes=BLOCK, timeout=0.3,
                           backoff_s=(0.05, 0.2), keep_if_unreachable=True)
    assert store is not None and not store.reachable and len(caplog.records) == 1
    data = blocks(4, seed=13)
    try:
        assert store.put_many(list(data.items())).result() == [False] * 4
        srv = RedisServer(port, workdir=tmp_path).start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(store.put_many(list(data.items())).result()):
            time.sleep(0.05)
        assert_exact(store, data)
        assert store.reachable and store.stats()["reconnects"] == 1
    finally:
        store.close()
        srv.kill()


def test_slow_server_is_bounded_by_the_timeout(tmp_path):
    srv = RedisServer(workdir=tmp_path).start()
    try:
        data = blocks(8, seed=7)
        with store_of(srv.url, timeout=0.3) as store:
            store.put_many(list(data.items())).result()
            assert_exact(store, data)  # control
            sleeper = threading.Thread(target=srv.cli, args=("debug", "sleep", "1.5"), kwargs={"check": False})
            sleeper.start()
            time.sleep(0.1)
            t = time.monotonic()
            assert store.get_many(list(data)).result(timeout=5) == [None] * 8
            assert time.monotonic() - t < 1.2  # the 0.3 s timeout, not the 1.5 s sleep
            sleeper.join()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and store.get_many(list(data)).result()[0] is None:
                time.sleep(0.05)
            assert_exact(store, data)
            assert store.stats()["errors"] >= 1
    finally:
        srv.kill()


def test_full_server_refuses_puts_without_raising(tmp_path, caplog):
    srv = RedisServer(None, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction", workdir=tmp_path).start()
    try:
        data = blocks(60, seed=8)  # 3.9 MB
        with store_of(srv.url) as store:
            with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
                done = store.put_many(list(data.items())).result(timeout=10)
            assert any(done) and not all(done)
            assert sum("is full" in r.getMessage() for r in caplog.records) == 1
            stored = {h: v for (h, v), ok in zip(data.items(), done) if ok}
            assert_exact(store, stored)
            s = store.stats()
            assert s["put_failures"] == 60 - len(stored) and s["errors"] == 0
            assert store.put_many(list(blocks(5, seed=9).items())).result() == [False] * 5  # still full
    finally:
        srv.kill()


def test_evicting_server_turns_old_blocks_into_misses(tmp_path):
    srv = RedisServer(None, "--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru", workdir=tmp_path).start()
    try:
        data = blocks(100, seed=10)
        with store_of(srv.url) as store:
            assert all(store.put_many(list(data.items())).result(timeout=10))
            got = store.get_many(list(data)).result()
            hits = [g for g in got if g is not None]
            assert 0 < len(hits) < 100
            for h, g in zip(data, got):
                assert g is None or bytes(g) == data[h].tobytes()
    finally:
        srv.kill()


def test_password_right_wrong_and_missing(tmp_path, caplog):
    pw = "Pa55-w0rd-xyz"
    srv = RedisServer(None, password=pw, workdir=tmp_path).start()
    try:
        data = blocks(5, seed=11)
        with store_of(srv.url) as store:  # right password, through the URL
            assert store.describe() == f"redis://:***@127.0.0.1:{srv.port}/0"
            store.put_many(list(data.items())).result()
            assert_exact(store, data)
        srv.cli("acl", "setuser", "kv", "on", ">user-pw-123", "~kvbm:*", "+@all")
        with store_of(f"redis://kv:user-pw-123@127.0.0.1:{srv.port}/0") as store:  # an ACL user
            assert_exact(store, data)
        for bad in (f"redis://:wrong@127.0.0.1:{srv.port}/0", f"redis://127.0.0.1:{srv.port}/0",
                    f"redis://kv:{pw}@127.0.0.1:{srv.port}/0"):
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="kvbm.remote"):
                assert open_store(bad, FP, timeout=0.5) is None
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "DYN_KVBM_REMOTE_URL" in warnings[0], warnings
            assert all(pw not in r.getMessage() and "wrong" not in r.getMessage().split("(")[0]
                       for r in caplog.records)
    finally:
        srv.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a certificate")
def test_tls_rediss_with_password(tmp_path, caplog):
    cert, key = self_signed(tmp_path)
    srv = RedisServer(None, password="tls-pw-1", tls=(cert, key), workdir=tmp_path).start()
    try:
        data = blocks(6, seed=12)
        with store_of(srv.url) as store:
            assert store.describe().startswith("rediss://:***@")
            assert all(store.put_many(list(data.items())).result())
            assert_exact(store, data)
        plain = f"redis://:tls-pw-1@127.0.0.1:{srv.port}/0"  # control: the same server without TLS is refused
        with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
            assert open_store(plain, FP, timeout=0.5) is None
        assert "tls-pw-1" not in caplog.text
    finally:
        srv.kill()


@pytest.mark.parametrize("bad", ["http://127.0.0.1:6379", "redis://127.0.0.1:notaport/0", "127.0.0.1:6379",
                                 "file://relative/dir"])
def test_bad_url_is_one_warning_and_none(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
        assert open_store(bad, FP) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("DYN_KVBM_REMOTE_URL=") and "without the shared tier" in lines[0]


def test_redacted_never_shows_a_password():
    assert redacted("redis://user:hunter2@h:6379/0") == "redis://user:***@h:6379/0"
    assert redacted("rediss://:hunter2@h:6380") == "rediss://:***@h:6380"
    assert redacted("redis://h:6379/0?password=hunter2") == "redis://h:6379/0?password=***"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"  # control: nothing to hide
    assert "hunter2" not in redacted("redis://u:hunter2@[::1:6379")


def test_benchmark_reports_the_ratio(url):
    from kvbm.mechanism.remote.bench import bench_get

    r = bench_get(url, blocks=32, block_bytes=256 << 10, rounds=3)
    assert r["ours_GBps"] > 0 and r["raw_GBps"] > 0 and r["ratio"] > 0.3, r
    assert r["ratio_min_max"][0] <= r["ratio"] <= r["ratio_min_max"][1] and r["rounds"] == 3
