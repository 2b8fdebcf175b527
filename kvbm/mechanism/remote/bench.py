"""G4 get throughput through a BlockStore against a raw pipelined Redis GET of the same values, same run.

  python -m kvbm.mechanism.remote.bench [--url redis://HOST:PORT/0] [--blocks 256] [--block-kib 2048]
                                        [--secret S] [--rounds 30] [--onboard] [--chunk-mib 256]

--onboard measures the whole G4 onboard instead of get_many: the transfer engine's load job, G4 -> host (G2)
staging slots -> a CPU engine cache (G1), verified byte for byte, against the raw GET of the same values.

Without --url it starts its own redis-server on a free loopback port (Debian's redis-server). Both sides read
the same keys from the same server with the same client settings (socket timeout, 1 MiB socket reads, one
pipeline per 64 MiB); the raw side only receives the bytes, the store also checks size, trailer, identity,
fingerprint and xxh3 (and the HMAC with --secret). The two sides take turns, ABAB... (the first of a pair
alternates), many rounds; each pair gives a ratio (raw time / kvbm time, > 1: kvbm faster), and the figure
is the median of those ratios with its quartiles and extremes: two machines' noise hits both sides of a pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def _raw_getter(url: str, keys: list[str], block_bytes: int):
    """A raw pipelined GET of `keys` with the store's client settings (values held to the end, as kvbm's are)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from kvbm.mechanism.remote.redis_store import PIPELINE_BYTES, READ_SIZE

    raw = redis.Redis.from_url(url, socket_timeout=10.0, retry=Retry(NoBackoff(), 0), socket_read_size=READ_SIZE)
    per = max(1, PIPELINE_BYTES // block_bytes)

    def raw_get() -> None:
        values = []
        for i in range(0, len(keys), per):
            pipe = raw.pipeline(transaction=False)
            for k in keys[i:i + per]:
                pipe.get(k)
            values.extend(pipe.execute())
        if any(v is None for v in values):
            raise RuntimeError("raw GET missed a benchmark block")

    return raw, raw_get


def interleaved(ours, raw, rounds: int, total_bytes: int) -> dict:
    """Time `ours` and `raw` in turns (ABAB..., the first of each pair alternating) for `rounds` pairs: median
    GB/s of each, and the median, quartiles and extremes of the per-pair ratios (raw time / our time)."""
    times: dict[str, list[float]] = {"ours": [], "raw": []}
    for r in range(rounds):
        order = (("ours", ours), ("raw", raw))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ratios = sorted(b / a for a, b in zip(times["ours"], times["raw"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    gbps = {k: round(total_bytes / statistics.median(v) / 1e9, 3) for k, v in times.items()}
    return {"rounds": rounds, "ours_GBps": gbps["ours"], "raw_GBps": gbps["raw"],
            "ratio": round(statistics.median(ratios), 3), "ratio_q1_q3": [round(q[0], 3), round(q[2], 3)],
            "ratio_min_max": [round(ratios[0], 3), round(ratios[-1], 3)]}


def bench_get(url: str, *, blocks: int = 256, block_bytes: int = 2 << 20, secret: bytes | None = None,
              rounds: int = 30, workers: int = 2) -> dict:
    """store.get_many(N blocks) against a raw pipelined GET of the same keys (see interleaved)."""
    from kvbm.mechanism.remote import make_store

    fp = os.urandom(16)
    store = make_store(url, fp, secret, block_bytes=block_bytes, timeout=10.0, workers=workers)
    rng = np.random.default_rng(0)
    hashes = [i.to_bytes(8, "little") for i in range(blocks)]
    data = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    for i in range(0, blocks, 32):
        ok = store.put_many([(hashes[j], data[j]) for j in range(i, min(blocks, i + 32))]).result()
        if not all(ok):
            raise RuntimeError("could not store the benchmark blocks (is the server full?)")
    raw, raw_get = _raw_getter(url, [store.key(h) for h in hashes], block_bytes)

    def store_get() -> None:
        got = store.get_many(hashes).result()
        if any(g is None for g in got):
            raise RuntimeError(f"store get missed {sum(g is None for g in got)} blocks: {store.stats()}")

    check = store.get_many(hashes[:4]).result()
    assert all(bytes(c) == data[i].tobytes() for i, c in enumerate(check)), "round trip not byte-exact"
    raw_get(), store_get()  # warm up connections
    try:
        result = interleaved(store_get, raw_get, rounds, blocks * block_bytes)
    finally:
        store.close()
        raw.close()
    return {"mode": "get_many", "blocks": blocks, "block_bytes": block_bytes, "secret": bool(secret), **result}


def bench_onboard(url: str, *, blocks: int = 256, block_bytes: int = 2 << 20, secret: bytes | None = None,
                  rounds: int = 30, chunk_bytes: int | None = None) -> dict:
    """A G4 onboard job (G4 -> G2 -> G1 through TransferEngine, the worker's settings unless `chunk_bytes`)
    against a raw pipelined GET of the same values (see interleaved)."""
    import torch

    from kvbm.mechanism.host import HostTier
    from kvbm.mechanism.layout import KVLayout
    from kvbm.mechanism.remote import make_store
    from kvbm.mechanism.transfer import OnboardJob, RemoteStoreJob, TransferEngine
    from kvbm.protocol import BlockMove, Tier

    layers, page = 16, block_bytes // 16  # a block: 16 layer pages, each [1 head, 64 tokens, page/128 bf16]
    words = page // 2
    caches = [torch.zeros(blocks + 1, 1, 64, words // 64, dtype=torch.bfloat16) for _ in range(layers)]
    layout = KVLayout.from_layers(caches, block_dim=0)
    assert layout.block_bytes == block_bytes, (layout.block_bytes, block_bytes)
    host = HostTier.for_layout(layout, blocks)
    fp = os.urandom(16)
    store = make_store(url, fp, secret, block_bytes=block_bytes, timeout=10.0, workers=2)
    options = {} if chunk_bytes is None else {"remote_chunk_bytes": chunk_bytes}
    engine = TransferEngine(layout, host, None, remote=store, remote_inflight_bytes=1 << 40, **options)
    hashes = [i.to_bytes(8, "little") for i in range(blocks)]
    host.tensor.view(torch.uint8).copy_(torch.randint(0, 256, host.tensor.view(torch.uint8).shape, dtype=torch.uint8))
    want = [host.read_slot(i) for i in range(min(4, blocks))]
    for i in range(0, blocks, 32):
        res = engine.run_remote_store(RemoteStoreJob(f"put{i}", [(hashes[j], j) for j in range(i, min(blocks, i + 32))]))
        if res.failed_hashes:
            raise RuntimeError("could not store the benchmark blocks (is the server full?)")
    raw, raw_get = _raw_getter(url, [store.key(h) for h in hashes], block_bytes)
    moves = [BlockMove(h, i + 1, i, Tier.G4) for i, h in enumerate(hashes)]  # engine block i+1 <- G4 via slot i

    def onboard() -> None:
        res = engine.run_onboard(OnboardJob("onboard", moves))
        if res.failed_hashes:
            raise RuntimeError(f"G4 onboard missed {len(res.failed_hashes)} blocks: {store.stats()}")

    host.tensor.zero_()  # the onboard must bring the bytes back from the store, not find them in G2
    onboard()
    for i, w in enumerate(want):  # byte-exact: G1 (and G2) hold what the host slots held when written
        got = torch.cat([c[i + 1].reshape(-1).view(torch.uint8) for c in caches])
        assert torch.equal(got, w.reshape(-1).view(torch.uint8)), "G4 onboard not byte-exact"
        assert torch.equal(host.read_slot(i).reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    raw_get()
    try:
        result = interleaved(onboard, raw_get, rounds, blocks * block_bytes)
    finally:
        engine.close()
        raw.close()
    return {"mode": "onboard G4->G2->G1", "blocks": blocks, "block_bytes": block_bytes, "secret": bool(secret),
            "chunk_bytes": engine._remote_chunk_bytes, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=2048)
    ap.add_argument("--secret")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--onboard", action="store_true", help="the whole G4 -> G2 -> G1 onboard, not get_many")
    ap.add_argument("--chunk-mib", type=int, help="--onboard: one GET batch (default: the worker's)")
    args = ap.parse_args(argv)
    server = None
    url = args.url
    if url is None:
        from kvbm.mechanism.remote.local_server import RedisServer

        server = RedisServer().start()
        url = server.url
    try:
        for secret in ([None, args.secret.encode()] if args.secret else [None]):
            kw = dict(blocks=args.blocks, block_bytes=args.block_kib << 10, secret=secret, rounds=args.rounds)
            if args.onboard:
                print(json.dumps(bench_onboard(url, **kw, chunk_bytes=args.chunk_mib and args.chunk_mib << 20)))
            else:
                print(json.dumps(bench_get(url, **kw)))
    finally:
        if server is not None:
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
