"""G4 get throughput through a BlockStore against a raw pipelined Redis GET of the same values, same run.

  python -m kvbm.mechanism.remote.bench [--url redis://HOST:PORT/0] [--blocks 256] [--block-kib 2048]
                                        [--secret S] [--rounds 5]

Without --url it starts its own redis-server on a free loopback port (Debian's redis-server). Both sides read
the same keys from the same server with the same client settings (socket timeout, 1 MiB socket reads, one
pipeline per 64 MiB); the raw side only receives the bytes, the store also checks size, trailer, identity,
fingerprint and xxh3 (and the HMAC with --secret). Rounds alternate store-then-raw and raw-then-store; the
ratio is of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def bench_get(url: str, *, blocks: int = 256, block_bytes: int = 2 << 20, secret: bytes | None = None,
              rounds: int = 5, workers: int = 2) -> dict:
    """Median GB/s of store.get_many(N blocks) and of a raw pipelined GET of the same keys; their ratio."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from kvbm.mechanism.remote import make_store
    from kvbm.mechanism.remote.redis_store import PIPELINE_BYTES, READ_SIZE

    fp = os.urandom(16)
    store = make_store(url, fp, secret, block_bytes=block_bytes, timeout=10.0, workers=workers)
    rng = np.random.default_rng(0)
    hashes = [i.to_bytes(8, "little") for i in range(blocks)]
    data = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    for i in range(0, blocks, 32):
        ok = store.put_many([(hashes[j], data[j]) for j in range(i, min(blocks, i + 32))]).result()
        if not all(ok):
            raise RuntimeError("could not store the benchmark blocks (is the server full?)")
    keys = [store.key(h) for h in hashes]
    raw = redis.Redis.from_url(url, socket_timeout=10.0, retry=Retry(NoBackoff(), 0), socket_read_size=READ_SIZE)
    per = max(1, PIPELINE_BYTES // block_bytes)

    def raw_get() -> int:
        values = []  # held to the end, as get_many's result is: the same memory traffic
        for i in range(0, blocks, per):
            pipe = raw.pipeline(transaction=False)
            for k in keys[i:i + per]:
                pipe.get(k)
            values.extend(pipe.execute())
        return sum(len(v) for v in values)

    def store_get() -> int:
        got = store.get_many(hashes).result()
        if any(g is None for g in got):
            raise RuntimeError(f"store get missed {sum(g is None for g in got)} blocks: {store.stats()}")
        return sum(len(g) for g in got)

    check = store.get_many(hashes[:4]).result()
    assert all(bytes(c) == data[i].tobytes() for i, c in enumerate(check)), "round trip not byte-exact"
    raw_get(), store_get()  # warm up connections
    times = {"store": [], "raw": []}
    for r in range(rounds):
        order = (("store", store_get), ("raw", raw_get))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    store.close()
    raw.close()
    total = blocks * block_bytes
    store_gbps = total / statistics.median(times["store"]) / 1e9
    raw_gbps = total / statistics.median(times["raw"]) / 1e9
    return {"blocks": blocks, "block_bytes": block_bytes, "secret": bool(secret), "rounds": rounds,
            "store_GBps": round(store_gbps, 3), "raw_GBps": round(raw_gbps, 3), "ratio": round(store_gbps / raw_gbps, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=2048)
    ap.add_argument("--secret")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    server = None
    url = args.url
    if url is None:
        from kvbm.mechanism.remote.local_server import RedisServer

        server = RedisServer().start()
        url = server.url
    try:
        for secret in ([None, args.secret.encode()] if args.secret else [None]):
            print(json.dumps(bench_get(url, blocks=args.blocks, block_bytes=args.block_kib << 10, secret=secret,
                                       rounds=args.rounds)))
    finally:
        if server is not None:
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
