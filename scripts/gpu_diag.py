"""Where the CUDA offload/onboard path loses time against one raw copy (Qwen3-4B geometry, block size 16, 1 GiB).

Prints wall and GPU-side times (median of 10, ms) for: the engine path (thread hand-off included), the copier
called directly, its GPU-side span (events on its own streams), one raw 1 GiB copy, the same bytes as raw
64 MiB copies back to back, and the gather/scatter kernels alone; with blocking-sync and spin-wait finish.
Usage (device machine): python3 scripts/gpu_diag.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm.mechanism import BlockMove, HostTier, KVLayout, OffloadJob, OnboardJob, TransferEngine  # noqa: E402
from kvbm.mechanism import cuda_copy  # noqa: E402
from kvbm_cli.bench.transfer import engine_cache  # noqa: E402


def med(fn, n=10) -> float:
    fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def gpu_ms(fn, n=10) -> float:
    fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def span_ms(cp, kind, fn, n=10) -> float:
    """From the call to the end of the copier's last GPU op (events on its own streams)."""
    fn()
    lane = cp._lanes[kind]
    first = lane.kernel if kind == "offload" else lane.copy
    original, end = cuda_copy._Lane.finish, {}

    def timed_finish(self, stream):
        end["event"] = torch.cuda.Event(enable_timing=True)
        end["event"].record(stream)
        original(self, stream)
    cuda_copy._Lane.finish = timed_finish
    times = []
    try:
        for _ in range(n):
            a = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record(first)
            fn()
            times.append(a.elapsed_time(end["event"]))
    finally:
        cuda_copy._Lane.finish = original
    return statistics.median(times)


def main() -> None:
    layers, bs = 36, 16
    caches, block_dim = engine_cache(layers, 8, 128, bs, 910, "cuda")
    layout = KVLayout.from_layers(caches, block_dim=block_dim)
    n = (1 << 30) // layout.block_bytes
    host = HostTier.for_layout(layout, n)
    ids = torch.randperm(2 * n)[:n].tolist()
    slots = list(range(n))
    nbytes = n * layout.block_bytes
    engine = TransferEngine(layout, host, None)
    cp = engine.cuda
    stores = [BlockMove(i, b, s) for i, (b, s) in enumerate(zip(ids, slots))]
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    chunk = cp.chunk_blocks * layout.block_bytes
    rows = {}

    def eng(kind):
        def go():
            (engine.submit_offload(OffloadJob("o", stores=stores)) if kind == "offload"
             else engine.submit_onboard(OnboardJob("i", loads=stores)))
            engine.wait()
        return go

    direct = {"offload": lambda: cp.offload(ids, slots), "onboard": lambda: cp.onboard(ids, slots)}
    raw = {"offload": lambda: pinned.copy_(gpu, non_blocking=True), "onboard": lambda: gpu.copy_(pinned, non_blocking=True)}

    def raw_chunked(kind):
        def go():
            for off in range(0, nbytes, chunk):
                (pinned[off:off + chunk].copy_(gpu[off:off + chunk], non_blocking=True) if kind == "offload"
                 else gpu[off:off + chunk].copy_(pinned[off:off + chunk], non_blocking=True))
        return go

    def kernels(kind):
        staged = torch.empty(cp.chunk_blocks, layout.num_segments, layout.segment_words, dtype=layout.word, device="cuda")

        def go():
            for c in cuda_copy.plan_chunks(ids, slots, cp.chunk_blocks):
                t = torch.tensor(c.block_ids, device="cuda")
                st = staged[:len(c.block_ids)]
                if kind == "offload":
                    torch.index_select(cp.flat.rows, 0, cp.flat.index(t, False), out=st.view(-1, layout.segment_words))
                else:
                    cp.flat.rows.index_copy_(0, cp.flat.index(t, False), st.reshape(-1, layout.segment_words))
        return go

    spin_finish = lambda self, stream: stream.synchronize()  # noqa: E731
    default_finish = cuda_copy._Lane.finish
    for kind in ("offload", "onboard"):
        rows[f"{kind}: engine (blocking-sync finish)"] = med(eng(kind))
        rows[f"{kind}: copier direct (blocking-sync)"] = med(direct[kind])
        rows[f"{kind}: copier direct, span to last GPU op"] = span_ms(cp, kind, direct[kind])
        cuda_copy._Lane.finish = spin_finish
        rows[f"{kind}: engine (spin-wait finish)"] = med(eng(kind))
        rows[f"{kind}: copier direct (spin-wait)"] = med(direct[kind])
        cuda_copy._Lane.finish = default_finish
        rows[f"{kind}: raw one copy, wall"] = med(lambda: (raw[kind](), torch.cuda.synchronize()))
        rows[f"{kind}: raw one copy, GPU"] = gpu_ms(raw[kind])
        rows[f"{kind}: raw {chunk >> 20} MiB copies, GPU"] = gpu_ms(raw_chunked(kind))
        rows[f"{kind}: gather/scatter kernels alone, GPU"] = gpu_ms(kernels(kind))
    print(f"Qwen3-4B bs {bs}: {n} blocks, {nbytes / 1e9:.3f} GB, chunk {cp.chunk_blocks} blocks")
    for name, ms in rows.items():
        print(f"{name:<48}{ms:9.3f} ms  {nbytes / ms / 1e6:7.2f} GB/s")
    engine.close()


if __name__ == "__main__":
    main()
