"""Where the time of kvbm's G1<->G2 copies goes, against raw pinned memcpy of the same bytes (issue 13).

One call on the device machine: for a few of part C's cases (scripts/gpu_layerwise.py), time side by side
(interleaved, medians) raw memcpy, raw memcpy cut into per-layer copies, kvbm's layer-wise load/store and
whole-request paths (CudaCopier direct and through the TransferEngine), the layer-wise paths with their
planning taken out, and zero-copy kernels reading or writing the pinned host tier through UVA. Then one
profiled run of each main path: when the first GPU operation starts after the call, how long the copy engine
is busy, the gaps between copies, and the tail after the last copy.

Usage (device machine): python3 scripts/gpu_copy_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm.mechanism import BlockMove, HostTier, KVLayout, OffloadJob, OnboardJob, TransferEngine  # noqa: E402
from kvbm.mechanism import layerwise as lw_mod  # noqa: E402
from kvbm.mechanism.cuda_copy import FlatRows  # noqa: E402
from kvbm.mechanism.engine_views import load_descriptions, replay  # noqa: E402
from kvbm.policy import Tier  # noqa: E402
from gpu_layerwise import raw_engine  # noqa: E402  (scripts/ is on sys.path: this script's folder)


def bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class _CAI:
    def __init__(self, t: torch.Tensor):
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i8", "data": (t.data_ptr(), False),
                                         "version": 3, "strides": None}


def uva_view(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over pinned host memory (the same address under UVA)."""
    assert t.dtype == torch.int64 and t.is_contiguous()
    return torch.as_tensor(_CAI(t), device="cuda")


def interleaved(fns, repeats):
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}, {k: (min(v), max(v)) for k, v in ts.items()}


def triton_page_copy():
    import triton
    import triton.language as tl

    @triton.jit
    def page_copy(src, dst, src_off, dst_off, WORDS: tl.constexpr, BLOCK: tl.constexpr):
        p = tl.program_id(0)
        s = tl.multiple_of(tl.load(src_off + p), 16)
        d = tl.multiple_of(tl.load(dst_off + p), 16)
        for k in range(0, WORDS, BLOCK):
            o = k + tl.arange(0, BLOCK)
            tl.store(dst + d + o, tl.load(src + s + o))

    def run(src, dst, src_off, dst_off, words):
        block = min(words, 1024)
        page_copy[(src_off.numel(),)](src, dst, src_off, dst_off, WORDS=words, BLOCK=block, num_warps=8)
    return run


def profile_summary(fn, name):
    """One profiled call: offsets (us) from the call's start of the first GPU op, copy busy time, gaps, end."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("probe_call"):
            fn()
        torch.cuda.synchronize()
    evs = prof.profiler.kineto_results.events()
    call = [e for e in evs if e.name() == "probe_call" and e.device_type() == torch.autograd.DeviceType.CPU]
    t0 = min(e.start_ns() for e in call) / 1e3
    t1 = max(e.start_ns() + e.duration_ns() for e in call) / 1e3
    gpu = [(e.name(), e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3) for e in evs
           if e.device_type() == torch.autograd.DeviceType.CUDA and e.name() != "probe_call"]
    gpu.sort(key=lambda x: x[1])
    copies = [g for g in gpu if "emcpy" in g[0] or "Memcpy" in g[0]]
    kernels = [g for g in gpu if g not in copies]
    out = {"name": name, "wall_us": t1 - t0, "n_gpu": len(gpu), "n_copies": len(copies), "n_kernels": len(kernels)}
    if gpu:
        out["first_gpu_us"] = gpu[0][1] - t0
        out["last_gpu_end_us"] = max(g[2] for g in gpu) - t0
    if copies:
        big = [c for c in copies if c[2] - c[1] > 20]
        out["first_copy_us"] = copies[0][1] - t0
        out["first_big_copy_us"] = big[0][1] - t0 if big else None
        out["last_copy_end_us"] = max(c[2] for c in copies) - t0
        out["copy_busy_us"] = sum(c[2] - c[1] for c in copies)
        gaps = [b[1] - a[2] for a, b in zip(big, big[1:])]
        out["big_copies"] = len(big)
        out["gap_sum_us"] = sum(gaps)
        out["gap_max_us"] = max(gaps) if gaps else 0
        out["gap_median_us"] = statistics.median(gaps) if gaps else 0
    if kernels:
        out["kernel_busy_us"] = sum(k[2] - k[1] for k in kernels)
    return out, gpu, t0


OLD = None  # the previous layerwise module (--old PATH), timed beside the current one
OLD_THREAD = False  # --old-thread: its TransferEngine jobs also take the thread hand-off (before 2026-12-05b)


def case(name, desc, repeats, lines, rows, prof_rows, zero_copy=False, profiles=True):
    dev = "cuda"
    raw, views = replay(desc, dev)
    raw.random_(-128, 127)
    layout = KVLayout.from_layers(views, KVLayout.infer_block_dim(next(iter(views.values())), desc["num_blocks"]))
    n = desc["num_blocks"] // 2
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(desc["num_blocks"], generator=g).tolist()
    src, dst = perm[:n], perm[n:2 * n]
    slots = list(range(n))
    nbytes = n * layout.block_bytes
    L = layout.num_segments
    host = HostTier(n, L, layout.segment_words, layout.word, pin=True, block_major=False)
    host2 = HostTier(n, L, layout.segment_words, layout.word, pin=True, block_major=False)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    gpu.random_()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    per = nbytes // L
    cp = lw_mod.LayerwiseCopier(layout, host)
    engine = TransferEngine(layout, host2, None)
    cp_old = engine_old = None
    if OLD is not None:
        host3 = HostTier(n, L, layout.segment_words, layout.word, pin=True, block_major=False)
        cp_old = OLD.LayerwiseCopier(layout, host)
        engine_old = TransferEngine(layout, host3, None)
        engine_old.cuda._layerwise.close()
        engine_old.cuda._layerwise = OLD.LayerwiseCopier(layout, host3)
        if OLD_THREAD and hasattr(engine_old, "_directable"):  # the old hand-off: every job on the kind's thread
            engine_old._directable = lambda kind, job: False
        if not hasattr(OLD.LayerwiseCopier, "store_all"):  # CudaCopier.start_offload as it was with that copier
            old_lw = engine_old.cuda._layerwise

            def old_start_offload(block_ids, slots_, ready=None, _cp=old_lw):
                with torch.cuda.device(_cp.device):
                    if ready is None:
                        ready = torch.cuda.current_stream(_cp.device).record_event()
                    return _cp.start_store(block_ids, slots_).finish(ready)
            engine_old.cuda.start_offload = old_start_offload
    big = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    host_bytes = host.tensor.view(-1).view(torch.uint8)
    big_rows = big.view(torch.int64).view(-1, layout.segment_words)
    engine_raw = raw_engine(layout, gpu, pinned)
    stores = [BlockMove(i, b, s) for i, (b, s) in enumerate(zip(src, slots))]
    loads = [BlockMove(i, b, s, Tier.G2) for i, (b, s) in enumerate(zip(dst, slots))]
    flat = FlatRows.of(layout)
    words = layout.segment_words
    ids_src = torch.tensor(src, device=dev)
    ids_dst = torch.tensor(dst, device=dev)
    # flat rows of (layer, block) in host order (layer-major, slot = position)
    idx_src = (flat.seg_base[:, None] + ids_src[None, :] * flat.block_stride).reshape(-1)
    idx_dst = (flat.seg_base[:, None] + ids_dst[None, :] * flat.block_stride).reshape(-1)
    host_rows = host.tensor.view(torch.int64).view(-1, words) if layout.word == torch.int64 else None
    uva = None
    try:
        uva = uva_view(host.tensor.view(-1).view(torch.int64)).view(-1, words)
        lines.append(f"  uva view: ok ({uva.device}, ptr equal {uva.data_ptr() == host.tensor.data_ptr()})")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"  uva view: FAILED {exc!r}")
    tri = None
    try:
        tri = triton_page_copy() if zero_copy else None
        rows_flat = flat.rows.view(-1)
        host_off = torch.arange(L * n, device=dev, dtype=torch.int64) * words
        src_off_dev = idx_src * words
        dst_off_dev = idx_dst * words
    except Exception as exc:  # noqa: BLE001
        lines.append(f"  triton: FAILED {exc!r}")
    cur = torch.cuda.current_stream()

    def raw_d2h():
        pinned.copy_(gpu, non_blocking=True)
        torch.cuda.synchronize()

    def raw_h2d():
        gpu.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    def raw_d2h_split():
        for i in range(L):
            pinned[i * per:(i + 1) * per].copy_(gpu[i * per:(i + 1) * per], non_blocking=True)
        torch.cuda.synchronize()

    def raw_h2d_split():
        for i in range(L):
            gpu[i * per:(i + 1) * per].copy_(pinned[i * per:(i + 1) * per], non_blocking=True)
        torch.cuda.synchronize()

    def lw_store():
        cp.start_store(src, slots).finish().synchronize()

    def lw_load():
        cp.start_load(dst, slots).synchronize()

    def cc_off():
        engine.cuda.offload(src, slots)

    def cc_on():
        engine.cuda.onboard(dst, slots)

    def te_off():
        engine.submit_offload(OffloadJob("o", stores=stores))
        engine.wait()

    def te_on():
        engine.submit_onboard(OnboardJob("i", loads=loads))
        engine.wait()

    def zc_store():  # one gather kernel writing host memory through UVA
        torch.index_select(flat.rows, 0, idx_src, out=uva)
        torch.cuda.synchronize()

    def zc_load():
        flat.rows.index_copy_(0, idx_dst, uva)
        torch.cuda.synchronize()

    def tri_store():
        tri(rows_flat, uva.view(-1), src_off_dev, host_off, words)
        torch.cuda.synchronize()

    def tri_load():
        tri(uva.view(-1), rows_flat, host_off, dst_off_dev, words)
        torch.cuda.synchronize()

    def pregather_store():  # one gather of every layer, then per-layer D2H: the DMA alone, cut per layer
        torch.index_select(flat.rows, 0, idx_src, out=big_rows)
        for i in range(L):
            host_bytes[i * per:(i + 1) * per].copy_(big[i * per:(i + 1) * per], non_blocking=True)
        torch.cuda.synchronize()

    def prescatter_load():
        for i in range(L):
            big[i * per:(i + 1) * per].copy_(host_bytes[i * per:(i + 1) * per], non_blocking=True)
        flat.rows.index_copy_(0, idx_dst, big_rows)
        torch.cuda.synchronize()

    def job(eng, kind):
        def go():
            if kind == "off":
                eng.submit_offload(OffloadJob("o", stores=stores))
            else:
                eng.submit_onboard(OnboardJob("i", loads=loads))
            eng.wait()
        return go

    d2h = {"raw D2H": raw_d2h, "raw D2H split per layer": raw_d2h_split, "layer-wise store": lw_store,
           "CudaCopier.offload": cc_off, "TransferEngine offload": te_off,
           "raw D2H as a TE job": job(engine_raw, "off"), "gather all, then D2H per layer": pregather_store}
    h2d = {"raw H2D": raw_h2d, "raw H2D split per layer": raw_h2d_split, "layer-wise load": lw_load,
           "CudaCopier.onboard": cc_on, "TransferEngine onboard": te_on,
           "raw H2D as a TE job": job(engine_raw, "on"), "H2D per layer, then scatter all": prescatter_load}
    if OLD is not None:
        d2h["OLD layer-wise store"] = lambda: cp_old.start_store(src, slots).finish().synchronize()
        d2h["OLD CudaCopier.offload"] = lambda: engine_old.cuda.offload(src, slots)
        d2h["OLD TransferEngine offload"] = job(engine_old, "off")
        h2d["OLD layer-wise load"] = lambda: cp_old.start_load(dst, slots).synchronize()
        h2d["OLD CudaCopier.onboard"] = lambda: engine_old.cuda.onboard(dst, slots)
        h2d["OLD TransferEngine onboard"] = job(engine_old, "on")
    if uva is not None and zero_copy:
        d2h["zero-copy index_select -> host"] = zc_store
        h2d["zero-copy index_copy_ <- host"] = zc_load
    if tri is not None and uva is not None and zero_copy:
        d2h["zero-copy triton -> host"] = tri_store
        h2d["zero-copy triton <- host"] = tri_load
    res = {}
    spread = {}
    for group in (d2h, h2d):
        try:
            m, s = interleaved(group, repeats)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"  group FAILED {exc!r}")
            continue
        res.update(m)
        spread.update(s)
    for k, t in res.items():
        ref = res["raw D2H"] if k in d2h else res["raw H2D"]
        line = (f"{name:<22} {k:<34} {nbytes / t / 1e9:7.2f} GB/s  vs raw {ref / t:6.3f}  "
                f"(min {spread[k][0] * 1e3:6.2f} ms, max {spread[k][1] * 1e3:6.2f} ms, median {t * 1e3:6.2f} ms)")
        lines.append(line)
        print(line, flush=True)
        rows.append({"case": name, "path": k, "gbps": nbytes / t / 1e9, "ratio": ref / t, "median_s": t})
    # exactness of the zero-copy variants
    ex = {}
    try:
        for nm, st, ld in (("zero-copy index", zc_store, zc_load), ("zero-copy triton", tri_store, tri_load)):
            if uva is None or not zero_copy or (nm.endswith("triton") and tri is None):
                continue
            host.tensor.fill_(0)
            for seg in layout.segments:
                seg.index_fill_(0, ids_dst, -1)
            st()
            ld()
            ex[nm] = all(bits_equal(seg[ids_src], seg[ids_dst]) for seg in layout.segments)
        host.tensor.fill_(0)
        for seg in layout.segments:
            seg.index_fill_(0, ids_dst, -1)
        lw_store()
        lw_load()
        ex["layer-wise"] = all(bits_equal(seg[ids_src], seg[ids_dst]) for seg in layout.segments)
        host2.tensor.fill_(0)
        for seg in layout.segments:
            seg.index_fill_(0, ids_dst, -1)
        cc_off()
        cc_on()
        ex["CudaCopier"] = all(bits_equal(seg[ids_src], seg[ids_dst]) for seg in layout.segments)
        for seg in layout.segments:
            seg.index_fill_(0, ids_dst, -1)
        te_off()
        te_on()
        ex["TransferEngine"] = all(bits_equal(seg[ids_src], seg[ids_dst]) for seg in layout.segments)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        ex["error"] = repr(exc)
    lines.append(f"{name:<22} exact: {ex}")
    print(lines[-1], flush=True)
    # GPU-side startup and span, from timing events (no profiler): E0 on the current stream at the call,
    # E1 before the first copy on the copy stream, E2 after the last copy
    mods = [lw_mod] + ([OLD] if OLD is not None else [])
    trace = {"on": False, "first": None, "last": None}
    origs = {}
    for m in mods:
        origs[m] = m.LayerwiseCopier._copy

        def patched(self_, c, staged, to_host, stream, *rest, _orig=origs[m]):
            if trace["on"] and trace["first"] is None:
                trace["first"] = torch.cuda.Event(enable_timing=True)
                trace["first"].record(stream)
            _orig(self_, c, staged, to_host, stream, *rest)
            if trace["on"]:
                trace["last"] = torch.cuda.Event(enable_timing=True)
                trace["last"].record(stream)
        m.LayerwiseCopier._copy = patched

    def raw_traced(to_host):
        def go():
            trace["first"] = torch.cuda.Event(enable_timing=True)
            trace["first"].record(cur)
            (pinned.copy_(gpu, non_blocking=True) if to_host else gpu.copy_(pinned, non_blocking=True))
            trace["last"] = torch.cuda.Event(enable_timing=True)
            trace["last"].record(cur)
            torch.cuda.synchronize()
        return go

    traced = {"raw D2H": raw_traced(True), "raw H2D": raw_traced(False), "layer-wise store": lw_store,
              "layer-wise load": lw_load, "CudaCopier.offload": cc_off, "CudaCopier.onboard": cc_on,
              "TransferEngine offload": te_off, "TransferEngine onboard": te_on}
    if OLD is not None:
        for k in ("OLD layer-wise store", "OLD layer-wise load", "OLD CudaCopier.offload", "OLD CudaCopier.onboard"):
            traced[k] = d2h.get(k) or h2d.get(k)
    for k, fn in traced.items():
        st, sp, wl = [], [], []
        for _ in range(7):
            torch.cuda.synchronize()
            trace.update(on=True, first=None, last=None)
            e0 = torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            e0.record(cur)
            fn()
            wall = time.perf_counter() - t
            trace["on"] = False
            torch.cuda.synchronize()
            st.append(e0.elapsed_time(trace["first"]))
            sp.append(trace["first"].elapsed_time(trace["last"]))
            wl.append(wall * 1e3)
        line = (f"{name:<22} TRACE {k:<28} start {statistics.median(st) * 1e3:7.0f} us  copies span "
                f"{statistics.median(sp) * 1e3:8.0f} us  wall {statistics.median(wl) * 1e3:8.0f} us  "
                f"wall - start - span {statistics.median([w - a - b for w, a, b in zip(wl, st, sp)]) * 1e3:6.0f} us")
        lines.append(line)
        print(line, flush=True)
    for m in mods:
        m.LayerwiseCopier._copy = origs[m]
    # profiles
    for k, fn in () if not profiles else (("raw H2D", raw_h2d), ("raw D2H", raw_d2h), ("layer-wise load", lw_load),
                  ("layer-wise store", lw_store), ("CudaCopier.onboard", cc_on), ("CudaCopier.offload", cc_off),
                  ("TransferEngine onboard", te_on), ("TransferEngine offload", te_off)):
        try:
            summ, gpu_ops, t0 = profile_summary(fn, k)
            summ["case"] = name
            prof_rows.append(summ)
            line = f"{name:<22} PROFILE {json.dumps({a: (round(b, 1) if isinstance(b, float) else b) for a, b in summ.items() if a != 'case'})}"
            lines.append(line)
            print(line, flush=True)
            if k in ("layer-wise load", "layer-wise store"):
                for op in gpu_ops[:8] + gpu_ops[-4:]:
                    lines.append(f"      {op[0][:50]:<50} {op[1] - t0:9.1f} {op[2] - t0:9.1f}")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"  profile {k} FAILED {exc!r}")
    # host-side costs
    t = time.perf_counter()
    for _ in range(20):
        lw_mod._plan(dst, slots, cp.max_rows)
    lines.append(f"{name:<22} plan_units host time {(time.perf_counter() - t) / 20 * 1e6:.0f} us")
    torch.cuda.synchronize()
    t = time.perf_counter()
    ld = cp.start_load(dst, slots)
    t_enq = time.perf_counter() - t
    ld.synchronize()
    t_all = time.perf_counter() - t
    lines.append(f"{name:<22} start_load host time {t_enq * 1e3:.2f} ms of {t_all * 1e3:.2f} ms")
    print(lines[-1], flush=True)
    # host time of a whole-request store before its first copy can start, phase by phase (medians of 9), for
    # this copier and the --old one
    for tag, c, mod in [("", cp, lw_mod)] + ([("OLD ", cp_old, OLD)] if OLD is not None else []):
        ph: dict[str, list[float]] = {}
        for _ in range(9):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids_sorted, units = mod._plan(src, slots, c.max_rows)
            t1 = time.perf_counter()
            c._unit_copies(units)
            t2 = time.perf_counter()
            with torch.cuda.device(c.device):
                up = c._upload_rows(ids_sorted, units, c.store_kernel)
                if isinstance(up, tuple):  # (rows, kept buffer): hand the buffer back
                    c._release_index("store", up[1])
            t3 = time.perf_counter()
            st = c.start_store(src, slots)
            t4 = time.perf_counter()
            st.save_layer(0)
            t5 = time.perf_counter()
            st.finish()
            t6 = time.perf_counter()
            st.synchronize()
            t7 = t8 = time.perf_counter()
            if hasattr(c, "store_all"):  # the whole-request store (CudaCopier.start_offload)
                c.store_all(src, slots)
                t8 = time.perf_counter()
                torch.cuda.synchronize()
            for key, a, b in (("plan", t0, t1), ("unit copies", t1, t2), ("upload rows", t2, t3),
                              ("start_store", t3, t4), ("save_layer(0)", t4, t5), ("finish (other layers)", t5, t6),
                              ("store_all", t7, t8)):
                ph.setdefault(key, []).append((b - a) * 1e6)
        lines.append(f"{name:<22} {tag}store host phases (us): " +
                     ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in ph.items()))
        print(lines[-1], flush=True)
    for e in (engine, engine_old, engine_raw):
        if e is not None:
            e.close()
    cp.close()
    del raw, views, layout, host, host2, gpu, pinned, cp, engine, flat, uva, cp_old, engine_old, engine_raw, big
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="transfer-LBNHC-bs16,transfer-BLHNC-bs16,transfer-LBNHC-bs128")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--old", type=Path, help="a previous kvbm/mechanism/layerwise.py to time beside the current one")
    ap.add_argument("--old-thread", action="store_true", help="the OLD engine's jobs take the thread hand-off")
    ap.add_argument("--zero-copy", action="store_true", help="also time zero-copy UVA kernels")
    ap.add_argument("--profiles", default="", help="comma list of cases to profile")
    args = ap.parse_args()
    if args.old is not None:
        import importlib.util

        global OLD, OLD_THREAD
        OLD_THREAD = args.old_thread
        spec = importlib.util.spec_from_file_location("layerwise_old", args.old)
        OLD = importlib.util.module_from_spec(spec)
        sys.modules["layerwise_old"] = OLD
        spec.loader.exec_module(OLD)
    args.out.mkdir(parents=True, exist_ok=True)
    descs = load_descriptions()
    lines, rows, prof_rows = [], [], []
    lines.append(f"environment: torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(lines[-1], flush=True)
    for name in args.cases.split(","):
        try:
            case(name, descs[name], args.repeats, lines, rows, prof_rows, args.zero_copy,
                 name in args.profiles.split(","))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"{name} FAILED {exc!r}")
        (args.out / "probe.txt").write_text("\n".join(lines) + "\n")
        (args.out / "probe.json").write_text(json.dumps({"rows": rows, "profiles": prof_rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
