"""`kvbm doctor store --url URL`'s checks, without Typer: can the shared tier (G4) use this store, how fast.

Operations:
  store_checks(url, secret, blocks, sizes)  rows (name, status, detail, fix) and facts: URL, reachable, server
                                            version and mode, maxmemory and policy (warn on noeviction or no
                                            limit), MAC secret, round-trip latency, put/get throughput of
                                            KV-block-sized values, byte-exact; test values removed afterwards
  redact_variable_rows(rows)                `kvbm doctor`'s variable rows with the store password and the
                                            secret masked

Status is ok, warn, fail or info; the password never appears in a row or a fact (redacted()).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from typing import Any

import numpy as np

from kvbm.mechanism.remote import make_store, redacted, scrub

Row = tuple[str, str, str, str]
DEFAULT_SIZES = (256 << 10, 2 << 20)
POLICIES_THAT_EVICT = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
                       "volatile-random", "volatile-ttl")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"


def redact_variable_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mask DYN_KVBM_REMOTE_URL's password and DYN_KVBM_REMOTE_SECRET in `kvbm doctor`'s variable rows."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("name") == "DYN_KVBM_REMOTE_URL":
            r["raw"] = None if r.get("raw") is None else redacted(r["raw"])
            r["value"] = redacted(r["value"]) if r.get("value") not in (None, "unset", "invalid") else r.get("value")
        elif r.get("name") == "DYN_KVBM_REMOTE_SECRET" and r.get("raw") is not None:
            r["raw"] = "***"
            r["value"] = "set (hidden)"
        out.append(r)
    return out


def _server_rows(store) -> tuple[list[Row], dict[str, Any]]:
    info = store.server_info()
    rows: list[Row] = [("server", "ok", f"Redis {info['redis_version']}, {info['mode']}", "")]
    maxmem, policy = info["maxmemory"], info["maxmemory_policy"]
    if not maxmem:
        rows.append(("maxmemory", "warn", f"no limit (used {info['used_memory'] / 1e9:.2f} GB)",
                     "set maxmemory (e.g. CONFIG SET maxmemory 64gb) so the store evicts instead of growing "
                     "until the host runs out of memory"))
    else:
        rows.append(("maxmemory", "ok", f"{maxmem / 1e9:.2f} GB (used {info['used_memory'] / 1e9:.2f} GB)", ""))
    if policy == "noeviction":
        rows.append(("maxmemory-policy", "warn", "noeviction: once full, every write fails",
                     "CONFIG SET maxmemory-policy allkeys-lru (KV blocks are a cache)"))
    elif policy in POLICIES_THAT_EVICT and policy.startswith("volatile"):
        rows.append(("maxmemory-policy", "warn", f"{policy}: evicts only keys with a TTL, kvbm's have none",
                     "CONFIG SET maxmemory-policy allkeys-lru"))
    else:
        rows.append(("maxmemory-policy", "ok", str(policy), ""))
    return rows, info


def _latency_ms(store, n: int = 20) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        store._ping()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def _cleanup(store, hashes: list[bytes]) -> None:
    keys = [store.key(h) for h in hashes]
    if store.scheme == "redis":
        client = store.client()
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.delete(k)
        pipe.execute(raise_on_error=False)
    elif store.scheme == "file":
        shutil.rmtree(store.folder, ignore_errors=True)


def store_checks(url: str, *, secret: str | None = None, blocks: int = 16,
                 sizes: tuple[int, ...] = DEFAULT_SIZES, timeout: float = 2.0) -> tuple[list[Row], dict[str, Any]]:
    """Every check of `kvbm doctor store`, as rows, and the measured facts (for --json)."""
    shown = redacted(url)
    facts: dict[str, Any] = {"url": shown}
    fp = os.urandom(16)  # test values never meet an engine's fingerprint
    try:
        store = make_store(url, fp, secret, timeout=timeout, workers=1)
    except ImportError as exc:
        return [("url", "fail", f"{shown}: the redis client is missing ({exc})", "pip install redis hiredis")], facts
    except (ValueError, OSError) as exc:
        return [("url", "fail", f"{shown}: {scrub(str(exc), url)}",
                 "set DYN_KVBM_REMOTE_URL / --url to redis://[user:password@]host:port/db, rediss://... or "
                 "file:///shared/dir")], facts
    rows: list[Row] = [("url", "ok", shown, "")]
    try:
        try:
            store._ping()
        except ValueError as exc:
            return [("url", "fail", f"{shown}: {scrub(str(exc), url)}",
                     "write the URL as redis://[user:password@]host:port/db")], facts
        except Exception as exc:
            why = scrub(f"{type(exc).__name__}: {exc}", url)
            fix = ("check the password / ACL user in the URL" if "auth" in why.lower() or "pass" in why.lower()
                   else "start the store, or check host, port, TLS (rediss://) and firewall")
            rows.append(("reachable", "fail", why, fix))
            return rows, facts
        rows.append(("reachable", "ok", "yes", ""))
        if store.scheme == "redis":
            try:
                server, info = _server_rows(store)
                rows += server
                facts.update(info)
            except Exception as exc:
                rows.append(("server", "warn", f"INFO / CONFIG GET not allowed: {scrub(str(exc), url)}",
                             "give the ACL user +info and +config|get to see maxmemory here"))
        else:
            usage = shutil.disk_usage(store.root)
            rows.append(("directory", "ok", f"{store.root}: {usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB", ""))
            facts["free_bytes"] = usage.free
        rows.append(("secret", "ok", "DYN_KVBM_REMOTE_SECRET set: every value carries an HMAC-SHA256", "") if secret
                    else ("secret", "warn", "DYN_KVBM_REMOTE_SECRET unset: values are trusted as they are",
                          "set DYN_KVBM_REMOTE_SECRET (the same on every engine) if others can write to the store"))
        latency = _latency_ms(store)
        facts["round_trip_ms"] = latency
        rows.append(("round trip", "ok" if latency < 5 else "warn", f"{latency:.3f} ms median of 20 pings",
                     "" if latency < 5 else "a store this far away costs a G4 lookup more than a step; use a nearer one"))
        rng = np.random.default_rng(0)
        for size in sizes:
            hashes = [f"doctor-{size}-{i}".encode() for i in range(blocks)]
            data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
            try:
                t = time.perf_counter()
                done = store.put_many([(h, data[i]) for i, h in enumerate(hashes)]).result()
                put_s = time.perf_counter() - t
                t = time.perf_counter()
                got = store.get_many(hashes).result()
                get_s = time.perf_counter() - t
            finally:
                try:
                    _cleanup(store, hashes)
                except Exception:
                    pass
            stored = sum(done)
            exact = sum(g is not None and bytes(g) == data[i].tobytes() for i, g in enumerate(got))
            name = f"throughput {_mib(size)}"
            facts[f"put_{size}_bytes_per_s"] = blocks * size / put_s if put_s else 0
            facts[f"get_{size}_bytes_per_s"] = blocks * size / get_s if get_s else 0
            if stored < blocks:
                rows.append((name, "fail", f"{blocks - stored} of {blocks} puts failed (store full or refusing writes)",
                             "free memory on the store or set maxmemory-policy allkeys-lru"))
            elif exact < blocks:
                rows.append((name, "fail", f"{blocks - exact} of {blocks} values did not come back byte-exact",
                             "another writer or an eviction policy removed them at once: check maxmemory"))
            else:
                rows.append((name, "ok", f"put {_rate(blocks * size, put_s)}, get {_rate(blocks * size, get_s)} "
                                         f"({blocks} blocks, byte-exact)", ""))
        facts["stats"] = store.stats()
        return rows, facts
    finally:
        store.close()
