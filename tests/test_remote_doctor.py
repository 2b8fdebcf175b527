"""`kvbm doctor store --url URL` against real redis-server processes and a real directory, as a user runs it."""

from __future__ import annotations

import json

import pytest

from kvbm.mechanism.remote.local_server import RedisServer, available
from kvbm_runner import run_kvbm

PW = "d0ctor-Secret"
SMALL = ("--blocks", "4", "--json")


def checks_of(stdout: str) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(stdout)["checks"]}


needs_redis = pytest.mark.skipif(not available(), reason="redis-server is not installed: run `make redis`")


@needs_redis
def test_healthy_server_passes_and_warns_on_noeviction(tmp_path):
    with RedisServer(None, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", password=PW,
                     workdir=tmp_path) as srv:
        good = run_kvbm("doctor", "store", "--url", srv.url, *SMALL, env={"DYN_KVBM_REMOTE_SECRET": "k"})
        assert good.exit_code == 0, good.stderr
        checks = checks_of(good.stdout)
        assert checks["server"]["detail"].startswith("Redis 7") and checks["maxmemory-policy"]["status"] == "ok"
        assert checks["throughput 256 KiB"]["status"] == checks["throughput 2 MiB"]["status"] == "ok"
        assert checks["secret"]["status"] == "ok" and json.loads(good.stdout)["round_trip_ms"] > 0
        assert PW not in good.stdout + good.stderr and "***" in good.stdout
        assert srv.cli("dbsize") == "0"  # its test values are removed
        srv.cli("config", "set", "maxmemory-policy", "noeviction")
        warned = run_kvbm("doctor", "store", "--url", srv.url, *SMALL)
        assert warned.exit_code == 0
        checks = checks_of(warned.stdout)
        assert checks["maxmemory-policy"]["status"] == "warn" and "allkeys-lru" in checks["maxmemory-policy"]["fix"]
        assert checks["secret"]["status"] == "warn"


@needs_redis
def test_full_server_fails_the_throughput_check(tmp_path):
    with RedisServer(None, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction", workdir=tmp_path) as srv:
        res = run_kvbm("doctor", "store", "--url", srv.url, *SMALL)
        assert res.exit_code == 1
        assert checks_of(res.stdout)["throughput 2 MiB"]["status"] == "fail"


@needs_redis
def test_wrong_password_and_unreachable_fail_with_one_line(tmp_path):
    with RedisServer(None, password=PW, workdir=tmp_path) as srv:
        wrong = run_kvbm("doctor", "store", "--url", f"redis://:not-{PW}@127.0.0.1:{srv.port}/0")
        port = srv.port
    assert wrong.exit_code == 1 and PW not in wrong.stdout + wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and "reachable" in wrong.stderr
    down = run_kvbm("doctor", "store", "--url", f"redis://127.0.0.1:{port}/0", "--json")
    assert down.exit_code == 1 and checks_of(down.stdout)["reachable"]["status"] == "fail"


def test_shared_directory_and_bad_urls(tmp_path):
    res = run_kvbm("doctor", "store", "--url", f"file://{tmp_path}", *SMALL)
    assert res.exit_code == 0, res.stderr
    assert checks_of(res.stdout)["throughput 2 MiB"]["status"] == "ok"
    assert [p for p in tmp_path.iterdir()] == []  # its test files are removed
    bad = run_kvbm("doctor", "store", "--url", "http://example", "--json")
    assert bad.exit_code == 1 and checks_of(bad.stdout)["url"]["status"] == "fail"
    missing = run_kvbm("doctor", "store", env={"DYN_KVBM_REMOTE_URL": None})
    assert missing.exit_code == 2 and "--url" in missing.stderr


def test_plain_doctor_never_prints_the_store_password_or_secret():
    res = run_kvbm("doctor", "--json", env={"DYN_KVBM_CPU_CACHE_GB": "1",
                                            "DYN_KVBM_REMOTE_URL": f"redis://u:{PW}@10.0.0.1:6379/0",
                                            "DYN_KVBM_REMOTE_SECRET": "mac-key-42"})
    assert PW not in res.stdout + res.stderr and "mac-key-42" not in res.stdout + res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["variables"]}
    assert rows["DYN_KVBM_REMOTE_URL"]["raw"] == "redis://u:***@10.0.0.1:6379/0"
    assert rows["DYN_KVBM_REMOTE_SECRET"]["value"] == "set (hidden)"
