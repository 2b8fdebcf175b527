"""GPU proof of layer-wise onboarding/offload on vLLM 0.32's exact KV layouts (issue 13): one script, one call.

Every cache is replayed from tests/data/vllm032_layouts.json (vLLM's own compute_layout_strides /
create_kv_cache_views output, extracted on CPU): the GPU default layout (LBNHC: FlashAttention declares none,
vLLM takes its default preference) and the block-outermost BLHNC a connector can ask for.

Parts (baseline and candidate interleaved in the same run; medians):
  A. TTFT, seed shape (Qwen3-4B geometry, bf16, block size 16, 20,000-token prefix + 128 new tokens): a stand-in
     forward driven layer by layer (QKV/O/MLP matmuls with random weights, the new tokens' KV written into the
     paged cache, scaled_dot_product_attention over the request's blocks gathered from the cache, plus one
     calibrated matmul so that prefill of 20,128 tokens costs about 0.59 s and 128 tokens on the cached prefix
     about 0.051 s, as measured with vLLM on this machine kind, DESIGN.md section 4). Hooks are called as vLLM's
     attention decorator calls them: KV update, wait_for_layer_load(i), attention, save_kv_layer(i).
     G1 hit (prefix already in the cache), G2 hit layer-wise (block-major and layer-major host tier), G2 hit
     whole-request (TransferEngine onboard, then the forward: today's path), recompute (prefill).
     Outputs of the G2-hit forwards must equal the G1-hit forward bit for bit.
  B. Prefill forward (20,128 tokens, 1,258 blocks stored) with per-layer offload on vs off, and the time until
     the host holds the blocks, against storing after the forward (TransferEngine).
  C. G1->G2 and G2->G1 (TransferEngine, whole request) and layer-wise load/store of the same blocks, vs raw
     pinned memcpy of the same bytes, block sizes 16-128, both layouts, 1 GiB, engine pages scattered.

Usage (device machine): python3 scripts/gpu_layerwise.py --out $OUT      (gpu_layerwise.json, gpu_layerwise.txt)
CPU smoke test of the script itself (small geometry built live with vllm): python scripts/gpu_layerwise.py --quick --device cpu --out /tmp/x
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm.mechanism import BlockMove, HostTier, KVLayout, OffloadJob, OnboardJob, TransferEngine  # noqa: E402
from kvbm.mechanism.engine_views import load_descriptions, replay  # noqa: E402
from kvbm.mechanism.transfer import copy_g1_to_g2, copy_g2_to_g1  # noqa: E402
from kvbm.policy import Tier  # noqa: E402

HIDDEN, Q_HEADS, INTER = 2560, 32, 9728
TARGET_PREFILL_S, TARGET_SUFFIX_S = 0.592, 0.051  # DESIGN.md section 4 (vLLM, H200)


def log(lines: list[str], text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def sync(dev: str) -> None:
    if dev != "cpu":
        torch.cuda.synchronize()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal says NaN != NaN, and this stand-in, which has no normalisation,
    overflows to inf/NaN in its deep layers: byte-identical pages then compared unequal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- caches -------------------------------------------------------------------------------------------------

def descriptions(args) -> dict[str, dict]:
    if not args.quick:
        return load_descriptions()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from vllm_layouts import describe, gpu_default_layout  # needs vllm: CPU smoke test only

    geo = {"num_layers": 4, "num_kv_heads": 2, "head_size": 64}
    out = {}
    for lay in (gpu_default_layout(), "BLHNC"):
        for bs in args.block_sizes:
            out[f"transfer-{lay}-bs{bs}"] = describe(f"transfer-{lay}-bs{bs}", lay, **geo, block_size=bs, num_blocks=64)
        out[f"ttft-{lay}-bs16"] = describe(f"ttft-{lay}-bs16", lay, **geo, block_size=16, num_blocks=2 * args.prompt_blocks + 16)
    return out


def build(desc: dict, dev: str):
    raw, views = replay(desc, dev)
    raw.random_(-128, 127)
    return raw, views, KVLayout.from_layers(views, KVLayout.infer_block_dim(next(iter(views.values())), desc["num_blocks"]))


def host_tier(layout, n: int, block_major: bool, dev: str) -> HostTier:
    return HostTier(n, layout.num_segments, layout.segment_words, layout.word, pin=dev != "cpu", block_major=block_major)


def layerwise_copier(layout, host, dev):
    if dev == "cpu":
        return None
    from kvbm.mechanism.layerwise import LayerwiseCopier

    return LayerwiseCopier(layout, host)


# ---- the stand-in forward -----------------------------------------------------------------------------------

class StandIn:
    """Qwen3-4B-shaped layers with random weights (shared by all layers), reading and writing the paged cache."""

    def __init__(self, desc: dict, views: dict, dev: str, quick: bool):
        self.dev, self.views = dev, list(views.values())
        self.bs, self.kvh, self.hd = desc["block_size"], desc["num_kv_heads"], desc["head_size"]
        self.hidden, self.qh, self.inter = (HIDDEN, Q_HEADS, INTER) if not quick else (256, 8, 512)
        g = torch.Generator(device=dev).manual_seed(0)
        dt = torch.bfloat16
        r = lambda *s: (torch.randn(*s, generator=g, device=dev, dtype=torch.float32) * s[0] ** -0.5).to(dt)  # noqa: E731
        self.w_qkv = r(self.hidden, (self.qh + 2 * self.kvh) * self.hd)
        self.w_o = r(self.qh * self.hd, self.hidden)
        self.w_gu = r(self.hidden, 2 * self.inter)
        self.w_d = r(self.inter, self.hidden)
        self.w_pad = r(4096, 4096)
        self.pad_rows: dict[int, int] = {}
        self._pad_in: torch.Tensor | None = None

    def layer(self, l: int, x, table: torch.Tensor, slot_blocks, slot_offs, ctx: int, hooks) -> torch.Tensor:
        m = x.shape[0]
        qkv = x @ self.w_qkv
        q = qkv[:, :self.qh * self.hd].view(m, self.qh, self.hd)
        k = qkv[:, self.qh * self.hd:(self.qh + self.kvh) * self.hd].view(m, self.kvh, self.hd)
        v = qkv[:, (self.qh + self.kvh) * self.hd:].view(m, self.kvh, self.hd)
        cache = self.views[l]                                    # [B, H, N, 2*D]: K and V side by side
        cache[slot_blocks, :, slot_offs, :self.hd] = k           # vLLM's KV update op runs before the hooks
        cache[slot_blocks, :, slot_offs, self.hd:] = v
        if hooks is not None:
            hooks.wait_for_layer_load(l)
        kv = cache[table].permute(1, 0, 2, 3).reshape(self.kvh, -1, 2 * self.hd)[:, :ctx]
        rep = self.qh // self.kvh
        kk = kv[..., :self.hd].repeat_interleave(rep, 0)[None]
        vv = kv[..., self.hd:].repeat_interleave(rep, 0)[None]
        qq = q.transpose(0, 1)[None]
        if m == ctx:
            a = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        else:
            mask = torch.arange(ctx, device=self.dev)[None, :] <= (ctx - m + torch.arange(m, device=self.dev))[:, None]
            a = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        x = x + a[0].transpose(0, 1).reshape(m, -1) @ self.w_o
        if hooks is not None:
            hooks.save_kv_layer(l)
        h = x @ self.w_gu
        x = x + (F.silu(h[:, :self.inter]) * h[:, self.inter:]) @ self.w_d
        p = self.pad_rows.get(m, 0)
        while p > 0:  # the calibrated extra cost, a matmul chain on all SMs (its result is multiplied by 0)
            rows = min(p, self._pad_in.shape[0])
            x = x + (self._pad_in[:rows] @ self.w_pad)[:1, :self.hidden] * 0
            p -= rows
        return x

    def forward(self, x, table_ids: list[int], ctx: int, hooks=None) -> torch.Tensor:
        m = x.shape[0]
        table = torch.tensor(table_ids, device=self.dev)
        pos = torch.arange(ctx - m, ctx, device=self.dev)
        slot_blocks, slot_offs = table[pos // self.bs], pos % self.bs
        for l in range(len(self.views)):
            x = self.layer(l, x, table, slot_blocks, slot_offs, ctx, hooks)
        return x

    def calibrate(self, m: int, ctx: int, table_ids: list[int], target_s: float) -> float:
        """Choose the pad matmul's rows for an m-token forward so that it costs about `target_s`."""
        x = torch.randn(m, self.hidden, device=self.dev, dtype=torch.bfloat16)
        self.pad_rows[m] = 0
        natural = timed(lambda: self.forward(x, table_ids, ctx), self.dev, 3)
        if self._pad_in is None:
            self._pad_in = torch.randn(32768 if self.dev != "cpu" else 512, 4096, device=self.dev, dtype=torch.bfloat16)
        probe = self._pad_in.shape[0]
        t = timed(lambda: self._pad_in[:probe] @ self.w_pad, self.dev, 5)
        per_row = t / probe
        deficit = (target_s - natural) / len(self.views)
        self.pad_rows[m] = max(0, int(deficit / per_row)) if deficit > 0 else 0
        return natural


def timed(fn, dev: str, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return median(ts)


class Hooks:
    """What vLLM's attention decorator calls, routed to a layer-wise load and/or store."""

    def __init__(self, load=None, store=None):
        self.load, self.store = load, store

    def wait_for_layer_load(self, layer: int) -> None:
        if self.load is not None:
            self.load.wait_layer(layer)

    def save_kv_layer(self, layer: int) -> None:
        if self.store is not None:
            self.store.save_layer(layer)


# ---- A + B: TTFT and per-layer offload ----------------------------------------------------------------------

def ttft_part(args, desc: dict, lines: list[str], rows: list[dict]) -> None:
    dev = args.device
    lay_name = desc["layout"]
    raw, views, layout = build(desc, dev)
    model = StandIn(desc, views, dev, args.quick)
    bs = desc["block_size"]
    prompt, new = args.prompt_blocks * bs, 128 if not args.quick else 32
    prefix_blocks = (prompt - new) // bs
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(desc["num_blocks"] - 1, generator=g)[:2 * args.prompt_blocks] + 1  # block 0: null block
    g1 = perm[:args.prompt_blocks].tolist()                    # the prompt's blocks when computed (G1 copy)
    g2 = perm[args.prompt_blocks:].tolist()                    # a second set of blocks a G2 hit onboards into
    g2_table = g2[:prefix_blocks] + g1[prefix_blocks:]        # onboarded prefix + the new tokens' blocks
    slots = list(range(prefix_blocks))
    x_full = torch.randn(prompt, model.hidden, device=dev, dtype=torch.bfloat16, generator=None)
    x_new = x_full[-new:].clone()
    out: dict = {"layout": lay_name, "prompt_tokens": prompt, "new_tokens": new, "prefix_blocks": prefix_blocks,
                 "block_bytes": layout.block_bytes, "prefix_bytes": prefix_blocks * layout.block_bytes}

    out["natural_prefill_s"] = model.calibrate(prompt, prompt, g1, TARGET_PREFILL_S if not args.quick else 0)
    model.forward(x_full, g1, prompt)                          # compute the prompt's KV into the G1 blocks
    out["natural_suffix_s"] = model.calibrate(new, prompt, g1, TARGET_SUFFIX_S if not args.quick else 0)
    out["pad_rows"] = dict(model.pad_rows)
    model.forward(x_full, g1, prompt)                          # rewrite the prompt's KV (calibration wrote the suffix)
    sync(dev)

    hosts = {"block-major": host_tier(layout, prefix_blocks, True, dev),
             "layer-major": host_tier(layout, prefix_blocks, False, dev)}
    if dev == "cpu":
        for h in hosts.values():
            copy_g1_to_g2(layout, h, g1[:prefix_blocks], slots)
    engine = TransferEngine(layout, hosts["block-major"], None)
    if dev != "cpu":
        engine.submit_offload(OffloadJob("fill", stores=[BlockMove(i, b, s) for i, (b, s) in enumerate(zip(g1, slots))]))
        engine.wait()
        eng_lm = TransferEngine(layout, hosts["layer-major"], None)
        eng_lm.submit_offload(OffloadJob("fill", stores=[BlockMove(i, b, s) for i, (b, s) in enumerate(zip(g1, slots))]))
        eng_lm.wait()
        eng_lm.close()
    copiers = {k: layerwise_copier(layout, h, dev) for k, h in hosts.items()}
    old = args.old.LayerwiseCopier(layout, hosts["layer-major"]) if args.old is not None and dev != "cpu" else None
    idx1 = torch.tensor(g1[:prefix_blocks], device=dev)

    def poison():
        idx = torch.tensor(g2[:prefix_blocks], device=dev)
        for seg in layout.segments:
            seg.index_fill_(0, idx, -1)

    ref = {}
    enqueue_s: dict[str, list[float]] = {k: [] for k in copiers}

    def g1_hit():
        ref["g1"] = model.forward(x_new, g1, prompt)

    def lw(kind):
        def go():
            t = time.perf_counter()
            if dev == "cpu":
                copy_g2_to_g1(layout, hosts[kind], g2[:prefix_blocks], slots)
                load = None
            else:
                load = copiers[kind].start_load(g2[:prefix_blocks], slots)
            enqueue_s[kind].append(time.perf_counter() - t)
            ref[kind] = model.forward(x_new, g2_table, prompt, Hooks(load=load))
        return go

    def whole():
        engine.submit_onboard(OnboardJob("load", loads=[BlockMove(i, b, s, Tier.G2) for i, (b, s) in
                                                        enumerate(zip(g2[:prefix_blocks], slots))]))
        engine.wait()
        ref["whole"] = model.forward(x_new, g2_table, prompt)

    def full():
        ref["full"] = model.forward(x_full, g1, prompt)

    cands = [("g1_hit", g1_hit, None), ("g2_layerwise_block_major", lw("block-major"), poison),
             ("g2_layerwise_layer_major", lw("layer-major"), poison), ("g2_whole_request", whole, poison)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in cands}
    times["recompute"] = []
    exact: dict[str, bool] = {}
    for rep in range(args.ttft_repeats + 1):
        for name, fn, setup in cands:
            if setup is not None:
                setup()
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            if rep:
                times[name].append(time.perf_counter() - t)
            key = {"g1_hit": "g1", "g2_layerwise_block_major": "block-major", "g2_layerwise_layer_major": "layer-major",
                   "g2_whole_request": "whole"}[name]
            if name == "g1_hit" and "g1_first" not in ref:
                ref["g1_first"] = ref["g1"].clone()
            if name != "g1_hit":
                idx2 = torch.tensor(g2[:prefix_blocks], device=dev)
                same = all(bits_equal(seg[idx2], seg[idx1]) for seg in layout.segments)
                exact[name] = exact.get(name, True) and same
                diff = (ref[key].float() - ref["g1"].float()).abs().max().item()
                out.setdefault("output_max_abs_diff_vs_g1", {})[name] = max(
                    diff, out.get("output_max_abs_diff_vs_g1", {}).get(name, 0.0))
                out.setdefault("output_bitwise_equal_g1", {})[name] = bits_equal(ref[key], ref["g1"]) and \
                    out.get("output_bitwise_equal_g1", {}).get(name, True)
        if rep % 3 == 0:  # recompute is slow: every third round
            sync(dev)
            t = time.perf_counter()
            full()
            sync(dev)
            if rep:
                times["recompute"].append(time.perf_counter() - t)
    out["g1_hit_bitwise_repeatable"] = bits_equal(ref["g1"], ref["g1_first"])  # determinism control
    med = {k: median(v) for k, v in times.items() if v}
    out.update({f"{k}_s": v for k, v in med.items()})
    out["byte_exact"] = exact
    out["start_load_host_s"] = {k: median(v) for k, v in enqueue_s.items() if v}
    log(lines, f"-- layout {lay_name}: {prompt} prompt tokens, {prefix_blocks} prefix blocks "
               f"({out['prefix_bytes'] / 1e9:.2f} GB), stand-in natural prefill {out['natural_prefill_s']:.3f} s, "
               f"natural suffix {out['natural_suffix_s']:.4f} s, pad rows {out['pad_rows']}")
    for k, v in med.items():
        extra = "" if k in ("g1_hit", "recompute") else \
            f"  vs G1 hit {v / med['g1_hit']:.3f}  recompute/this {med.get('recompute', float('nan')) / v:6.2f}x" \
            f"  pages {'exact' if exact.get(k) else 'NOT EXACT'}, output max|diff| vs G1 " \
            f"{out['output_max_abs_diff_vs_g1'][k]:.3g}"
        log(lines, f"   {k:<28}{v:9.4f} s{extra}")
    log(lines, f"   G1-hit output bitwise repeatable: {out['g1_hit_bitwise_repeatable']}; G2 outputs bitwise equal "
               f"to G1's: {out['output_bitwise_equal_g1']}")
    log(lines, f"   start_load host time: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in out['start_load_host_s'].items()))

    # B: prefill with per-layer offload on vs off (stores all blocks of the prompt).
    store_slots = list(range(prefix_blocks))
    store_ids = g1[:prefix_blocks]
    b: dict[str, list[float]] = {"off_forward": [], "whole_after_total": []}
    for k in copiers:
        b[f"on_{k}_forward"], b[f"on_{k}_total"] = [], []

    def fwd_only():
        sync(dev)
        t = time.perf_counter()
        full()
        sync(dev)
        return time.perf_counter() - t

    for rep in range(args.offload_repeats + 1):
        t_off = fwd_only()
        # whole-request store after the forward (today's path): forward end -> host holds the blocks
        sync(dev)
        t = time.perf_counter()
        full()
        engine.submit_offload(OffloadJob("s", stores=[BlockMove(i, bb, s) for i, (bb, s) in enumerate(zip(store_ids, store_slots))]))
        engine.wait()
        sync(dev)
        t_whole = time.perf_counter() - t
        res = {}
        for k, cp in copiers.items():
            if cp is None:
                continue
            sync(dev)
            t = time.perf_counter()
            store = cp.start_store(store_ids, store_slots)
            ref["full"] = model.forward(x_full, g1, prompt, Hooks(store=store))
            store.finish()
            torch.cuda.current_stream().synchronize()
            t_fwd = time.perf_counter() - t
            store.synchronize()
            res[k] = (t_fwd, time.perf_counter() - t)
        if rep:
            b["off_forward"].append(t_off)
            b["whole_after_total"].append(t_whole)
            for k, (tf, tt) in res.items():
                b[f"on_{k}_forward"].append(tf)
                b[f"on_{k}_total"].append(tt)
    # the per-layer stores alone must write exactly the engine's pages into the host slots
    idx = torch.tensor(store_ids, device=dev)
    for k, h in hosts.items():
        if copiers[k] is None:
            continue
        h.tensor.zero_()
        store = copiers[k].start_store(store_ids, store_slots)
        model.forward(x_full, g1, prompt, Hooks(store=store))
        store.finish().synchronize()
        exact[f"store_{k}"] = all(bits_equal(h.segment(j)[:prefix_blocks].to(dev), seg[idx])
                                  for j, seg in enumerate(layout.segments))
    bm = {k: median(v) for k, v in b.items() if v}
    out["offload"] = bm
    out["byte_exact"] = exact
    log(lines, f"   prefill forward, per-layer offload off {bm['off_forward']:.4f} s; store after forward "
               f"(TransferEngine) done at {bm['whole_after_total']:.4f} s")
    for k in copiers:
        if f"on_{k}_forward" in bm:
            log(lines, f"   per-layer offload on ({k} host): forward {bm[f'on_{k}_forward']:.4f} s "
                       f"(on/off {bm[f'on_{k}_forward'] / bm['off_forward']:.3f}), host holds the blocks at "
                       f"{bm[f'on_{k}_total']:.4f} s  {'exact' if exact.get(f'store_{k}') else 'NOT EXACT'}")
    rows.append({"part": "ttft", **out})
    engine.close()
    for cp in list(copiers.values()) + [old]:
        if cp is not None:
            cp.close()
    del raw, views, layout, model, hosts, copiers, engine
    if dev != "cpu":
        torch.cuda.empty_cache()


# ---- C: transfers vs raw memcpy -----------------------------------------------------------------------------

def interleaved(fns: dict, repeats: int, setup=None) -> dict[str, float]:
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if setup is not None:
                setup(k)
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: median(v) for k, v in ts.items()}


def raw_engine(layout, gpu: torch.Tensor, pinned: torch.Tensor) -> TransferEngine:
    """A TransferEngine (CUDA) whose G1<->G2 jobs move `gpu` <-> `pinned` in one raw memcpy instead of kvbm's
    copy: what the job hand-off alone costs (also used by scripts/gpu_copy_probe.py)."""
    engine = TransferEngine(layout, host_tier(layout, 1, False, "cuda"), None)

    class _RawDone:
        def __init__(self, event):
            self.event = event

        def query(self):
            return self.event.query()

        def wait_blocking(self):
            self.event.synchronize()

    def raw_start(to_host):
        def go(ids, slots_, ready=None):
            stream = torch.cuda.current_stream()
            if ready is not None:
                stream.wait_event(ready)
            (pinned.copy_(gpu, non_blocking=True) if to_host else gpu.copy_(pinned, non_blocking=True))
            return _RawDone(stream.record_event())
        return go

    def raw_job(to_host):
        def go(ids, slots_, ready=None):
            raw_start(to_host)(ids, slots_, ready).wait_blocking()
        return go
    engine.cuda.offload, engine.cuda.onboard = raw_job(True), raw_job(False)
    # the engine starts G1<->G2 jobs on the submitting thread (TransferEngine._start_direct): so does this
    engine.cuda.start_offload, engine.cuda.start_onboard = raw_start(True), raw_start(False)
    return engine


def transfer_part(args, desc: dict, lines: list[str], rows: list[dict]) -> None:
    """kvbm's G1<->G2 paths against raw pinned memcpy of the same bytes, interleaved in one run. The paths
    kvbm uses on CUDA (its host tier is layer-major: HostTier.for_layout): layer-wise (the worker's
    LayerwiseCopier) and whole-request (CudaCopier, and the same through a TransferEngine job, which adds the
    hand-off to and from the engine's thread). References, not kvbm paths: raw memcpy run as a TransferEngine
    job (the hand-off alone), and a block-major host tier (chunked 2D path, layer-wise)."""
    dev = args.device
    raw, views, layout = build(desc, dev)
    n = desc["num_blocks"] // 2
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(desc["num_blocks"], generator=g).tolist()
    src, dst = perm[:n], perm[n:2 * n]                    # scattered engine pages
    slots = list(range(n))
    nbytes = n * layout.block_bytes
    hosts = {"block-major": host_tier(layout, n, True, dev), "layer-major": host_tier(layout, n, False, dev)}
    engine = TransferEngine(layout, hosts["block-major"], None)
    engine_lm = TransferEngine(layout, hosts["layer-major"], None) if dev != "cpu" else None
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    gpu.random_()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev != "cpu")
    copiers = {k: layerwise_copier(layout, h, dev) for k, h in hosts.items()}
    old = args.old.LayerwiseCopier(layout, hosts["layer-major"]) if args.old is not None and dev != "cpu" else None
    stores = [BlockMove(i, b, s) for i, (b, s) in enumerate(zip(src, slots))]
    loads = [BlockMove(i, b, s, Tier.G2) for i, (b, s) in enumerate(zip(dst, slots))]
    engine_raw = engine_thread = None
    if dev != "cpu":  # the hand-off before 2026-12-05b: every job enqueued by the kind's thread, not the caller
        engine_thread = TransferEngine(layout, hosts["layer-major"], None)
        engine_thread._directable = lambda kind, job: False
    if dev != "cpu":  # the same job hand-off with a raw memcpy in place of kvbm's copy
        engine_raw = raw_engine(layout, gpu, pinned)

    def raw_d2h():
        pinned.copy_(gpu, non_blocking=True)
        sync(dev)

    def raw_h2d():
        gpu.copy_(pinned, non_blocking=True)
        sync(dev)

    def job_off(eng):
        def go():
            eng.submit_offload(OffloadJob("o", stores=stores))
            eng.wait()
        return go

    def job_on(eng):
        def go():
            eng.submit_onboard(OnboardJob("i", loads=loads))
            eng.wait()
        return go

    def lw_store(k):
        def go():
            copiers[k].start_store(src, slots).finish().synchronize()
        return go

    def lw_load(k):
        def go():
            copiers[k].start_load(dst, slots).synchronize()
        return go

    def cc_off():
        engine_lm.cuda.offload(src, slots)

    def cc_on():
        engine_lm.cuda.onboard(dst, slots)

    d2h = {"raw pinned D2H": raw_d2h}
    h2d = {"raw pinned H2D": raw_h2d}
    if dev != "cpu":
        d2h.update({"G1->G2 layer-wise": lw_store("layer-major"), "G1->G2 whole request, CudaCopier": cc_off,
                    "G1->G2 whole request, TransferEngine job": job_off(engine_lm),
                    "ref: raw D2H as a TransferEngine job": job_off(engine_raw),
                    "ref: G1->G2 TE job, thread hand-off (before)": job_off(engine_thread),
                    "ref: G1->G2 TE, block-major host": job_off(engine),
                    "ref: G1->G2 layer-wise, block-major host": lw_store("block-major")})
        if old is not None:  # the copier before this change (--old), timed beside it
            d2h["ref: G1->G2 layer-wise, --old copier"] = lambda: old.start_store(src, slots).finish().synchronize()
        h2d.update({"G2->G1 layer-wise": lw_load("layer-major"), "G2->G1 whole request, CudaCopier": cc_on,
                    "G2->G1 whole request, TransferEngine job": job_on(engine_lm),
                    "ref: raw H2D as a TransferEngine job": job_on(engine_raw),
                    "ref: G2->G1 TE job, thread hand-off (before)": job_on(engine_thread),
                    "ref: G2->G1 TE, block-major host": job_on(engine),
                    "ref: G2->G1 layer-wise, block-major host": lw_load("block-major")})
    else:
        d2h["G1->G2 TransferEngine (CPU copy)"] = job_off(engine)
        h2d["G2->G1 TransferEngine (CPU copy)"] = job_on(engine)
    res = {**interleaved(d2h, args.repeats), **interleaved(h2d, args.repeats)}
    # byte-exact: every path leaves the source pages in the destination blocks (the host tier zeroed first,
    # the destination pages poisoned: a path that moved nothing fails)
    exact = {}
    idx_src, idx_dst = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)

    def check(name, store, load, host):
        host.tensor.fill_(0)
        for seg in layout.segments:
            seg.index_fill_(0, idx_dst, -1)
        store()
        load()
        exact[name] = all(bits_equal(seg[idx_src], seg[idx_dst]) for seg in layout.segments)

    check("TE block-major host", job_off(engine), job_on(engine), hosts["block-major"])
    if dev != "cpu":
        check("layer-wise", lw_store("layer-major"), lw_load("layer-major"), hosts["layer-major"])
        check("CudaCopier", cc_off, cc_on, hosts["layer-major"])
        check("TransferEngine job", job_off(engine_lm), job_on(engine_lm), hosts["layer-major"])
        check("layer-wise block-major host", lw_store("block-major"), lw_load("block-major"), hosts["block-major"])
    lay = desc["layout"]
    for name, t in res.items():
        ref = res["raw pinned D2H"] if name in d2h else res["raw pinned H2D"]
        ratio = ref / t
        rows.append({"part": "transfer", "layout": lay, "block_size": desc["block_size"], "path": name,
                     "nbytes": nbytes, "gbps": nbytes / t / 1e9, "ratio_vs_raw": ratio})
        log(lines, f"{lay:<6}{desc['block_size']:>4}{layout.block_bytes // 1024:>8} {name:<46}{nbytes / t / 1e9:8.2f}"
                   f"{ratio:8.3f}")
    log(lines, f"{'':<6}{'':>4}{'':>8} byte-exact: {exact}")
    rows.append({"part": "transfer_exact", "layout": lay, "block_size": desc["block_size"], **exact})
    for eng in (engine, engine_lm, engine_raw, engine_thread):
        if eng is not None:
            eng.close()
    for cp in list(copiers.values()) + [old]:
        if cp is not None:
            cp.close()
    del raw, views, layout, hosts, copiers, old, engine, engine_lm, engine_raw, engine_thread, gpu, pinned
    if dev != "cpu":
        torch.cuda.empty_cache()


# ---- A2: the same TTFT through kvbm's own leader and worker, called as the connector calls them -------------

class WorkerHooks:
    """The connector's per-layer hooks (wait_for_layer_load / save_kv_layer), by layer name, on a KvbmWorker."""

    def __init__(self, worker, names: list[str]):
        self.worker, self.names = worker, names

    def wait_for_layer_load(self, layer: int) -> None:
        self.worker.wait_layer(self.names[layer])

    def save_kv_layer(self, layer: int) -> None:
        self.worker.save_layer(self.names[layer])


def hooks_part(args, desc: dict, lines: list[str], rows: list[dict]) -> None:
    """KvbmLeader + KvbmWorker (the objects the vLLM connector drives; vllm itself is not on the device) on the
    replayed vLLM cache: a fill request stores the prefix per layer during its prefill (save_kv_layer), then
    each G2-hit request is looked up (get_num_new_matched_tokens must answer a synchronous, layer-wise load),
    allocated, planned, and run in the same step: start_load_kv, the forward with wait_for_layer_load /
    save_kv_layer per layer, wait_for_save, get_finished."""
    from kvbm.config import KvbmConfig
    from kvbm.leader import KvbmLeader
    from kvbm.mechanism.layerwise import MIN_LAYERWISE_BLOCKS
    from kvbm.policy import AdmitAll, TierManager
    from kvbm.worker import KvbmWorker

    dev = args.device
    raw, views, layout = build(desc, dev)
    names = list(views)
    model = StandIn(desc, views, dev, args.quick)
    bs = desc["block_size"]
    prompt, new = args.prompt_blocks * bs, 128 if not args.quick else 32
    prefix_blocks = (prompt - new) // bs
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(desc["num_blocks"] - 1, generator=g)[:2 * args.prompt_blocks] + 1
    g1, g2 = perm[:args.prompt_blocks].tolist(), perm[args.prompt_blocks:].tolist()
    g2_table = g2[:prefix_blocks] + g1[prefix_blocks:]
    x_full = torch.randn(prompt, model.hidden, device=dev, dtype=torch.bfloat16)
    x_new = x_full[-new:].clone()
    model.calibrate(prompt, prompt, g1, TARGET_PREFILL_S if not args.quick else 0)
    model.calibrate(new, prompt, g1, TARGET_SUFFIX_S if not args.quick else 0)
    host_slots = 3 * prefix_blocks
    worker = KvbmWorker(KvbmConfig.from_env({}), load_wait_s=0.0)
    worker.register(layout, host_slots, 0, layout.fingerprint(model="standin", block_size=bs), layer_names=names)
    leader = KvbmLeader(TierManager(host_slots, 0, AdmitAll()), bs, layout.block_bytes)
    leader.layerwise_min_blocks = MIN_LAYERWISE_BLOCKS if worker.layerwise_enabled else None
    leader.check_handshake({0: worker.handshake(bs)})
    hooks = WorkerHooks(worker, names)
    out: dict = {"part": "hooks", "layout": desc["layout"], "prefix_blocks": prefix_blocks,
                 "layerwise": worker.layerwise_enabled}

    def step(plan, x, table, ctx):
        """One engine step: start_load_kv, the forward with the layer hooks, wait_for_save; then get_finished
        until the step's jobs are reported (outside the timed region)."""
        worker.fence(plan)
        worker.start_loads(plan)
        y = model.forward(x, table, ctx, hooks)
        worker.start_stores(plan)
        return y

    def settle():
        sync(dev)
        for _ in range(2000):
            leader.on_report(worker.poll().report)
            if not leader.jobs_in_flight:
                return
            time.sleep(0.001)
        raise RuntimeError("kvbm jobs never finished")

    ids = iter(range(10 ** 9))

    def run_request(hashes, table, x, ctx, computed_expect=None):
        rid = f"r{next(ids)}"
        n = leader.num_matched_tokens(rid, hashes, 0, ctx)
        is_async = leader.load_is_async(rid)
        leader.on_alloc(rid, hashes, table, n)
        leader.on_scheduled(rid, table, ctx, replace=True)
        plan = leader.build_step()
        return rid, n, is_async, plan

    # fill: the prompt's prefill stores its prefix blocks per layer (hashes 0..prefix_blocks-1)
    base = [("p", i) for i in range(prefix_blocks)]
    rid, n, _, plan = run_request(base, g1, x_full, prompt)
    assert n == 0 and plan.stores and not plan.stores[0].cascades
    step(plan, x_full, g1, prompt)
    settle()
    leader.request_finished(rid)
    assert leader.manager.match(base) and len(leader.manager.match(base)) == prefix_blocks, "the fill did not store"
    # the reference: the G1 hit (pages computed by the fill's prefill)
    g1_out = model.forward(x_new, g1, prompt)
    idx1 = torch.tensor(g1[:prefix_blocks], device=dev)
    idx2 = torch.tensor(g2[:prefix_blocks], device=dev)

    t_g1, t_g2, t_rec, exact, out_equal, sync_answers = [], [], [], True, True, set()
    for rep in range(args.ttft_repeats + 1):
        sync(dev)
        t = time.perf_counter()
        y1 = model.forward(x_new, g1, prompt)
        sync(dev)
        if rep:
            t_g1.append(time.perf_counter() - t)
        for seg in layout.segments:  # poison the blocks the G2 hit loads into
            seg.index_fill_(0, idx2, -1)
        rid, n, is_async, plan = run_request(base + [("s", rep, i) for i in range(args.prompt_blocks - prefix_blocks)],
                                             g2_table, x_new, prompt)
        sync_answers.add((n, is_async, bool(plan.loads and plan.loads[0].layerwise)))
        # the engine computes only the new tokens: num_computed = n (the loaded prefix)
        sync(dev)
        t = time.perf_counter()
        if is_async:  # the whole-request path: the request runs in a later step, once its load is reported
            worker.start_loads(plan)
            settle()
            plan = leader.build_step()
        y2 = step(plan, x_new, g2_table, prompt)
        sync(dev)
        if rep:
            t_g2.append(time.perf_counter() - t)
        settle()
        leader.request_finished(rid)
        exact &= all(bits_equal(seg[idx2], seg[idx1]) for seg in layout.segments)
        out_equal &= bits_equal(y2, y1) and bits_equal(y1, g1_out)
        if rep % 3 == 1:
            sync(dev)
            t = time.perf_counter()
            model.forward(x_full, g1, prompt)
            sync(dev)
            if rep:
                t_rec.append(time.perf_counter() - t)
    # offload per layer on / off: prefill forwards storing fresh blocks (no cascades: the host tier has room)
    on, off = [], []
    for rep in range(args.offload_repeats + 1):
        sync(dev)
        t = time.perf_counter()
        model.forward(x_full, g1, prompt)
        sync(dev)
        if rep:
            off.append(time.perf_counter() - t)
        rid, n, _, plan = run_request([("o", rep, i) for i in range(prefix_blocks)], g1, x_full, prompt)
        sync(dev)
        t = time.perf_counter()
        step(plan, x_full, g1, prompt)
        sync(dev)
        if rep:
            on.append(time.perf_counter() - t)
        settle()
        leader.request_finished(rid)
        for h in [("o", rep, i) for i in range(prefix_blocks)]:
            leader.manager.host.remove(h)  # room for the next round (no eviction: no cascade)
    med = {"g1_hit_s": median(t_g1), "g2_hit_hooks_s": median(t_g2), "recompute_s": median(t_rec),
           "prefill_offload_off_s": median(off), "prefill_offload_on_s": median(on)}
    out.update(med)
    out.update({"g2_over_g1": med["g2_hit_hooks_s"] / med["g1_hit_s"], "recompute_over_g2": med["recompute_s"] / med["g2_hit_hooks_s"],
                "offload_on_over_off": med["prefill_offload_on_s"] / med["prefill_offload_off_s"],
                "pages_exact": exact, "output_bitwise_equal_g1": out_equal,
                "lookup_answers": sorted(map(str, sync_answers)),
                "leader_stats": {"onboard_bytes": leader.stats.onboard_bytes, "offload_bytes": leader.stats.offload_bytes}})
    rows.append(out)
    log(lines, f"-- through KvbmLeader/KvbmWorker hooks, layout {desc['layout']}: layer-wise {worker.layerwise_enabled}, "
               f"lookup answers (tokens, async, layerwise spec) {sorted(sync_answers)}")
    log(lines, f"   G1 hit {med['g1_hit_s']:.4f} s, G2 hit {med['g2_hit_hooks_s']:.4f} s ({out['g2_over_g1']:.3f}x G1), "
               f"recompute {med['recompute_s']:.4f} s ({out['recompute_over_g2']:.2f}x over G2)")
    log(lines, f"   prefill with per-layer offload {med['prefill_offload_on_s']:.4f} s vs without {med['prefill_offload_off_s']:.4f} s "
               f"({out['offload_on_over_off']:.4f}); pages {'exact' if exact else 'NOT EXACT'}, "
               f"outputs bitwise equal to the G1 hit: {out_equal}")
    worker.close()
    del raw, views, layout, model
    if dev != "cpu":
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test of this script)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ttft,hooks,transfer")
    ap.add_argument("--old", type=Path, help="a previous kvbm/mechanism/layerwise.py: part C also times its store")
    args = ap.parse_args()
    if args.old is not None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("layerwise_old", args.old)
        args.old = sys.modules["layerwise_old"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(args.old)
    args.block_sizes = [16, 32, 64, 128] if not args.quick else [16, 32]
    args.repeats = 15 if not args.quick else 2
    args.ttft_repeats = 7 if not args.quick else 2
    args.offload_repeats = 3 if not args.quick else 1
    args.prompt_blocks = 1258 if not args.quick else 12
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    descs = descriptions(args)
    lines: list[str] = []
    rows: list[dict] = []
    env = {"torch": torch.__version__, "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device != "cpu" else "cpu"}
    log(lines, f"environment: {json.dumps(env)}")
    layouts = sorted({d["layout"] for n, d in descs.items() if n.startswith("ttft-")}, key=lambda s: s != "LBNHC")
    start = time.perf_counter()

    def save():
        (args.out / "gpu_layerwise.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
        (args.out / "gpu_layerwise.txt").write_text("\n".join(lines) + "\n")

    if "ttft" not in skip:
        log(lines, "== A/B. TTFT and per-layer offload, seed shape (medians)")
        for lay in layouts:
            t0 = time.perf_counter()
            try:
                ttft_part(args, descs[f"ttft-{lay}-bs16"], lines, rows)
            except Exception as exc:  # noqa: BLE001 - keep the other parts
                log(lines, f"ttft {lay} FAILED: {exc!r}")
                traceback.print_exc()
            print(f"[ttft {lay}: {time.perf_counter() - t0:.1f} s]", flush=True)
            save()
    if "hooks" not in skip:
        log(lines, "")
        log(lines, "== A2. TTFT and per-layer offload through kvbm's leader and worker (the connector's calls), medians")
        for lay in layouts:
            t0 = time.perf_counter()
            try:
                hooks_part(args, descs[f"ttft-{lay}-bs16"], lines, rows)
            except Exception as exc:  # noqa: BLE001
                log(lines, f"hooks {lay} FAILED: {exc!r}")
                traceback.print_exc()
            print(f"[hooks {lay}: {time.perf_counter() - t0:.1f} s]", flush=True)
            save()
    if "transfer" not in skip:
        log(lines, "")
        log(lines, f"== C. transfers vs raw pinned memcpy, 1 GiB, scattered engine pages, median of {args.repeats}")
        log(lines, f"{'layout':<6}{'bs':>4}{'KiB/blk':>8} {'path':<46}{'GB/s':>8}{'vs raw':>8}")
        for lay in layouts:
            for bs in args.block_sizes:
                t0 = time.perf_counter()
                try:
                    transfer_part(args, descs[f"transfer-{lay}-bs{bs}"], lines, rows)
                except Exception as exc:  # noqa: BLE001
                    log(lines, f"transfer {lay} bs {bs} FAILED: {exc!r}")
                    traceback.print_exc()
                print(f"[transfer {lay} bs {bs}: {time.perf_counter() - t0:.1f} s]", flush=True)
                save()
    print(f"[total {time.perf_counter() - start:.1f} s]")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
