"""Layer-wise onboarding and offload (kvbm.mechanism.layerwise).

On CPU: the per-request decision, the unit planning and the per-layer copy descriptors (emulated with numpy
against direct indexing, both host layouts); the copier refuses CPU caches. On a GPU (the device machine):
byte-exact per-layer loads and stores on caches replayed from vLLM 0.32's own layout code
(tests/data/vllm032_layouts.json), ordered by CUDA events against a compute stream.
"""

import random

import numpy as np
import pytest
import torch

from kvbm.errors import TransferError
from kvbm.mechanism import HostTier, KVLayout
from kvbm.mechanism.cuda_copy import Run
from kvbm.mechanism.engine_views import load_descriptions, replay
from kvbm.mechanism import layerwise
from kvbm.mechanism.layerwise import (LayerwiseCopier, Unit, choose_onboard_path, gather_rows, layer_copies,
                                      plan_units)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False); runs on the device machine")


# ---- CPU: decisions and planning ----------------------------------------------------------------------------

def test_choose_onboard_path():
    assert choose_onboard_path(1250, from_disk=False, cuda=True) == "layerwise"
    assert choose_onboard_path(1250, from_disk=True, cuda=True) == "async"      # disk: far slower than a forward
    assert choose_onboard_path(1250, from_disk=False, cuda=False) == "async"    # CPU engines: no streams
    assert choose_onboard_path(2, from_disk=False, cuda=True) == "async"        # short prefix
    assert choose_onboard_path(1250, from_disk=False, cuda=True, enabled=False) == "async"
    assert choose_onboard_path(1250, from_disk=False, cuda=True, max_blocks=1000) == "async"
    assert choose_onboard_path(4, from_disk=False, cuda=True, min_blocks=4) == "layerwise"


@pytest.mark.parametrize("seed", range(6))
def test_plan_units_cover_every_block_once_in_slot_order(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 70)
    ids, slots = rng.sample(range(300), n), rng.sample(range(120), n)
    max_rows = rng.randint(1, 20)
    ordered, units = plan_units(ids, slots, max_rows)
    by_slot = dict(zip(slots, ids))
    assert list(ordered) == [by_slot[s] for s in sorted(slots)]
    row0 = 0
    seen = []
    for u in units:
        assert u.row0 == row0 and 1 <= u.rows <= max_rows
        rows = 0
        for r in u.runs:
            assert r.row == rows
            for k in range(r.count):
                assert ordered[u.row0 + r.row + k] == by_slot[r.slot + k]
                seen.append(r.slot + k)
            rows += r.count
        assert rows == u.rows
        row0 += u.rows
    assert row0 == n and sorted(seen) == sorted(slots)
    assert plan_units([], [], 3) == ((), [])
    with pytest.raises(ValueError):
        plan_units([1], [1], 0)


@pytest.mark.parametrize("max_rows", [1, 3, 4, 7, 20, 100])
def test_plan_units_cut_consecutive_slots_at_unit_edges(max_rows):
    """Slots already in order (the common case, planned without a sort): one run per unit, cut where a unit
    ends; a gap in the slots starts a new run."""
    ids = list(range(50, 30, -1))
    ordered, units = plan_units(ids, list(range(10, 30)), max_rows)
    assert list(ordered) == ids
    assert [u.rows for u in units] == [min(max_rows, 20 - r) for r in range(0, 20, max_rows)]
    assert [u.runs for u in units] == [(Run(10 + u.row0, 0, u.rows),) for u in units]
    _, units = plan_units([7, 8, 9, 10], [0, 1, 5, 6], max_rows)
    runs = [(u.row0 + r.row, r.slot, r.count) for u in units for r in u.runs]
    want = {1: [(0, 0, 1), (1, 1, 1), (2, 5, 1), (3, 6, 1)], 3: [(0, 0, 2), (2, 5, 1), (3, 6, 1)]}
    assert runs == want.get(max_rows, [(0, 0, 2), (2, 5, 2)])


def _apply(copies, src, dst, to_host):
    for c in copies:
        for h in range(c.height):
            hs, ss = c.host_offset + h * c.host_pitch, c.staging_offset + h * c.staging_pitch
            if to_host:
                dst[hs:hs + c.width] = src[ss:ss + c.width]
            else:
                dst[ss:ss + c.width] = src[hs:hs + c.width]


@pytest.mark.parametrize("block_major", [True, False], ids=["block_major_host", "layer_major_host"])
@pytest.mark.parametrize("spl", [1, 2], ids=["one_segment_per_layer", "k_and_v_segments"])
def test_layer_copies_move_one_layer_of_one_unit(block_major, spl):
    rng = np.random.default_rng(spl + 2 * block_major)
    layers, num_slots, seg = 3, 40, 8
    num_segments = layers * spl
    slots = rng.permutation(num_slots)[:17].tolist()
    host = rng.integers(0, 255, num_slots * num_segments * seg, dtype=np.uint8)
    h3 = host.reshape(num_slots, num_segments, seg) if block_major else host.reshape(num_segments, num_slots, seg)
    slot_of = lambda s, j: h3[s, j] if block_major else h3[j, s]  # noqa: E731
    _, units = plan_units(list(range(17)), slots, 5)
    sorted_slots = sorted(slots)
    for layer in range(layers):
        for u in units:
            copies = layer_copies(u, layer * spl, spl, num_segments, num_slots, seg, block_major)
            assert len(copies) == len(u.runs)
            staging = np.zeros(u.rows * spl * seg, dtype=np.uint8)
            _apply(copies, host, staging, to_host=False)
            st = staging.reshape(u.rows, spl, seg) if block_major else staging.reshape(spl, u.rows, seg)
            for i in range(u.rows):
                s = sorted_slots[u.row0 + i]
                for j in range(spl):
                    got = st[i, j] if block_major else st[j, i]
                    assert (got == slot_of(s, layer * spl + j)).all()
            back = np.zeros_like(host)
            _apply(copies, staging, back, to_host=True)  # the store direction writes exactly those bytes
            b3 = back.reshape(h3.shape)
            for i in range(u.rows):
                s = sorted_slots[u.row0 + i]
                for j in range(spl):
                    idx = (s, layer * spl + j) if block_major else (layer * spl + j, s)
                    assert (b3[idx] == h3[idx]).all()


def test_layer_copies_are_plain_for_a_layer_major_host():
    unit = Unit(0, 6, (Run(10, 0, 4), Run(20, 4, 2)))
    copies = layer_copies(unit, 3, 1, 36, 100, 65536, block_major=False)
    assert [c.height for c in copies] == [1, 1] and copies[0].width == 4 * 65536
    copies = layer_copies(unit, 3, 1, 36, 100, 65536, block_major=True)
    assert [c.height for c in copies] == [4, 2] and copies[0].host_pitch == 36 * 65536


@pytest.mark.parametrize("block_major", [True, False], ids=["block_major_host", "layer_major_host"])
@pytest.mark.parametrize("max_rows", [4, 100], ids=["several_units", "one_unit"])
def test_gather_rows_put_each_layer_and_unit_in_staging_order(block_major, max_rows):
    """The rows a store gathers (a load scatters) of (layer, unit): at layer * spl * n + unit.row0 * spl, in the
    staging buffer's order, (rows, spl) or (spl, rows); each is the flat row of that segment of that block."""
    rng = np.random.default_rng(max_rows + block_major)
    layers, spl, stride = 5, 2, 37
    base = rng.integers(0, 1000, (layers, spl)).astype(np.int64)
    ids, units = layerwise._plan(rng.permutation(200)[:15].tolist(), rng.permutation(60)[:15].tolist(), max_rows)
    assert (len(units) > 1) == (max_rows == 4)
    n = len(ids)
    out = np.full(layers * spl * n + 3, -1, dtype=np.int64)  # a longer buffer: only the first rows are written
    gather_rows(base, ids, stride, units, block_major, out[:layers * spl * n])
    for layer in range(layers):
        for u in units:
            start = layer * spl * n + u.row0 * spl
            got = out[start:start + u.rows * spl].reshape((u.rows, spl) if block_major else (spl, u.rows))
            for i in range(u.rows):
                for j in range(spl):
                    want = base[layer, j] + ids[u.row0 + i] * stride
                    assert (got[i, j] if block_major else got[j, i]) == want
    assert (out[layers * spl * n:] == -1).all()


def test_copier_refuses_cpu_caches():
    _, views = replay(load_descriptions()["test-LBNHC"], "cpu")
    layout = KVLayout.from_layers(views, 0)
    host = HostTier.for_layout(layout, 4, pin=False)
    with pytest.raises(TransferError, match="CUDA"):
        LayerwiseCopier(layout, host)


# ---- GPU: byte-exact and ordered ----------------------------------------------------------------------------

def gpu_cache(name):
    raw, views = replay(load_descriptions()[name], "cuda")
    raw.random_(-128, 127)
    return raw, KVLayout.from_layers(views, 0)


def pages(layout, ids):
    idx = torch.tensor(ids, device=layout.device)
    return torch.stack([seg[idx] for seg in layout.segments])


@needs_cuda
@pytest.mark.parametrize("name", ["test-LBNHC", "test-BLHNC", "test-LBHNC"])
@pytest.mark.parametrize("block_major", [True, False], ids=["block_major_host", "layer_major_host"])
def test_layerwise_store_then_load_into_other_blocks(name, block_major):
    raw, layout = gpu_cache(name)
    host = HostTier(24, layout.num_segments, layout.segment_words, layout.word, block_major=block_major)
    # three blocks per staging unit: several units per layer, the ring reused many times
    cp = LayerwiseCopier(layout, host, staging_bytes=3 * layout.segment_bytes, num_buffers=2)
    rng = random.Random(7)
    perm = rng.sample(range(1, 40), 26)
    src, dst = perm[:13], perm[13:]
    slots = [0, 1, 2, 3, 9, 10, 11, 20, 21, 5, 6, 15, 23]
    saved = pages(layout, src).clone()
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        store = cp.start_store(src, slots)
        for layer in range(cp.num_layers):
            store.save_layer(layer)
        store.finish().synchronize()
    raw.random_(-128, 127)  # the engine reuses every block
    before = pages(layout, range(40)).clone()
    out = []
    with torch.cuda.stream(compute):
        load = cp.start_load(dst, slots)
        for layer in range(cp.num_layers):
            load.wait_layer(layer)  # then "attention" reads the layer's pages on the compute stream
            out.append(layout.segments[layer][torch.tensor(dst, device="cuda")].clone())
    compute.synchronize()
    assert load.query()
    assert torch.equal(torch.stack(out), saved)
    assert torch.equal(pages(layout, dst), saved)
    others = [b for b in range(40) if b not in dst]
    assert torch.equal(pages(layout, others), before[:, others])
    cp.close()


@needs_cuda
def test_layer_stores_wait_for_the_kernel_that_wrote_the_layer():
    """A layer written by a slow kernel on the compute stream is copied out only after that kernel ran."""
    raw, layout = gpu_cache("test-BLHNC")
    host = HostTier.for_layout(layout, 8)
    cp = LayerwiseCopier(layout, host)
    ids = [4, 5, 6, 7, 30, 31, 32, 33]
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        store = cp.start_store(ids, list(range(8)))
        for layer in range(cp.num_layers):
            torch.cuda._sleep(50_000_000)  # a long "attention" ...
            layout.segments[layer].fill_(layer + 1)  # ... that wrote this layer's pages
            store.save_layer(layer)
        store.finish()
    store.synchronize()
    for layer in range(cp.num_layers):
        seg = host.segment(layer)
        assert bool((seg[:8] == layer + 1).all()), f"layer {layer} was copied before the forward wrote it"
    cp.close()


@needs_cuda
@pytest.mark.parametrize("name", ["test-LBNHC", "test-BLHNC"])
def test_kept_index_buffers_serve_overlapping_and_successive_stores(name):
    """The gather rows live in kept pinned/device buffers: two stores open at once (one step's requests) each
    keep their own, a buffer is reused only once its gathers are queued, and whole-request stores
    (store_all) and loads in a row reuse them; every store lands byte-exact."""
    raw, layout = gpu_cache(name)
    host = HostTier.for_layout(layout, 24)
    cp = LayerwiseCopier(layout, host, staging_bytes=3 * layout.segment_bytes, num_buffers=2)
    a_ids, b_ids = [3, 9, 14, 22, 5], [30, 31, 2, 17, 8, 11]
    a_slots, b_slots = [0, 1, 2, 3, 4], [10, 11, 12, 13, 14, 15]
    want_a, want_b = pages(layout, a_ids).clone(), pages(layout, b_ids).clone()
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        sa, sb = cp.start_store(a_ids, a_slots), cp.start_store(b_ids, b_slots)
        assert sa.index_buf is not sb.index_buf
        for layer in range(cp.num_layers):
            sa.save_layer(layer)
            sb.save_layer(layer)
        sa.finish(), sb.finish()
    sa.synchronize(), sb.synchronize()
    assert sa.index_buf is None and sb.index_buf is None  # both handed back
    raw.random_(-128, 127)
    for ids, slots, want in ((a_ids, a_slots, want_a), (b_ids, b_slots, want_b)):
        cp.start_load(ids, slots).synchronize()
        assert torch.equal(pages(layout, ids), want)
    for rep in range(3):  # successive whole-request stores of different blocks reuse one buffer
        ids = [(7 * rep + 5 * i) % 40 for i in range(8)]
        want = pages(layout, ids).clone()
        cp.store_all(ids, list(range(16, 24))).synchronize()
        raw.random_(-128, 127)
        cp.start_load(ids, list(range(16, 24))).synchronize()
        assert torch.equal(pages(layout, ids), want), f"round {rep}"
    assert 1 <= len(cp._index_pool["store"]) <= 2 and len(cp._index_pool["load"]) == 1
    cp.close()


@needs_cuda
def test_finish_saves_layers_no_hook_saved_and_wait_all():
    """A step replayed by a full CUDA graph calls no layer hook: finish() stores every layer, wait_all() loads."""
    raw, layout = gpu_cache("test-LBNHC")
    host = HostTier.for_layout(layout, 6)
    cp = LayerwiseCopier(layout, host)
    saved = pages(layout, [1, 2, 3]).clone()
    cp.start_store([1, 2, 3], [0, 1, 2]).finish().synchronize()
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        load = cp.start_load([10, 11, 12], [0, 1, 2])
        load.wait_all()
        got = pages(layout, [10, 11, 12]).clone()
    compute.synchronize()
    assert torch.equal(got, saved)
    empty = cp.start_load([], [])
    empty.wait_layer(0)
    assert cp.start_store([], []).finish().query()
    cp.close()


def test_piecewise_cuda_graphs_are_required_only_while_layerwise_kvbm_is_on(monkeypatch):
    """Full CUDA graphs replay a step without calling the layer hooks: vLLM must use PIECEWISE when kvbm's
    layer-wise transfers may run (KVBM active, DYN_KVBM_LAYERWISE on), and need not otherwise."""
    pytest.importorskip("vllm")  # the device machine has no vllm
    from kvbm.integrations.vllm.connector import KvbmConnector

    monkeypatch.delenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", raising=False)
    monkeypatch.delenv("DYN_KVBM_LAYERWISE", raising=False)
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "8")
    assert KvbmConnector.requires_piecewise_for_cudagraph({}) is True
    monkeypatch.setenv("DYN_KVBM_LAYERWISE", "false")
    assert KvbmConnector.requires_piecewise_for_cudagraph({}) is False
    monkeypatch.delenv("DYN_KVBM_LAYERWISE")
    monkeypatch.delenv("DYN_KVBM_CPU_CACHE_GB")
    assert KvbmConnector.requires_piecewise_for_cudagraph({}) is False  # KVBM inactive: pass-through


@needs_cuda
@pytest.mark.parametrize("tail", [1, None], ids=["sleep_then_spin", "spin_only"])
def test_wait_blocking_returns_after_the_last_layer(monkeypatch, tail):
    """A whole-request wait sleeps on an event some layers before the end, then spins on the last one; it
    returns only once every layer is in place, also when the copies wait behind a long kernel."""
    raw, layout = gpu_cache("test-LBNHC")
    if tail is not None:
        monkeypatch.setattr(layerwise, "SPIN_TAIL_BYTES", tail)  # nap after the last layer but one
    host = HostTier.for_layout(layout, 8)
    cp = LayerwiseCopier(layout, host)
    saved = pages(layout, [1, 2, 3]).clone()
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(100_000_000)  # the forward that wrote the pages is still running
        store = cp.start_store([1, 2, 3], [0, 1, 2]).finish()
    assert (store.nap is not None) == (tail is not None)
    store.wait_blocking()
    assert store.query()
    assert torch.equal(torch.stack([host.segment(s)[:3] for s in range(layout.num_segments)]), saved.cpu())
    with torch.cuda.stream(compute):
        torch.cuda._sleep(100_000_000)  # earlier kernels still read the destination pages
        load = cp.start_load([10, 11, 12], [0, 1, 2])
    assert (load.nap is not None) == (tail is not None)
    load.wait_blocking()
    assert load.query() and all(e.query() for e in load.events)
    assert torch.equal(pages(layout, [10, 11, 12]), saved)
    cp.close()
