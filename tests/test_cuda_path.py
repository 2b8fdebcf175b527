"""The CUDA path of the transfer engine (kvbm.mechanism.cuda_copy).

On CPU (CI): the module imports, its planning (chunks, host-slot runs, 2D copy offsets) and the flat row view
are checked against direct indexing. On a GPU (the device machine): byte-exact G1 -> G2 -> G3 -> G1 round
trips with CUDA caches laid out as vLLM's FlashAttention backend lays them out (one strided view per layer
over one buffer), onboarded into other blocks; the submit-time stream event; corrupt disk blocks.
"""

import os
import random
import time

import numpy as np
import pytest
import torch

from kvbm.errors import KvbmError
from kvbm.mechanism import BlockMove, DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, SlotCopy, TransferEngine
from kvbm.mechanism import cuda_copy, fileio
from kvbm.mechanism.cuda_copy import Chunk, FlatRows, Run, host_copies, plan_chunks
from kvbm.policy import Tier

LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 16, 2, 32

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False); runs on the device machine")


def flash_attn_caches(num_blocks, device="cpu", one_buffer=True):
    """FlashAttention's layout, per layer (2, blocks, bs, H, D); one buffer (as vLLM) or one tensor per layer."""
    shape = (2, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    if one_buffer:
        buf = torch.zeros((LAYERS,) + shape, dtype=torch.bfloat16, device=device)
        return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(LAYERS)}
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=torch.bfloat16, device=device)
            for i in range(LAYERS)}


def vllm_cpu_caches(num_blocks):
    buf = torch.zeros(LAYERS * num_blocks * 2 * BLOCK_SIZE * HEADS * HEAD_DIM, dtype=torch.bfloat16)
    per_layer = buf.view(LAYERS, num_blocks, 2, BLOCK_SIZE, HEADS * HEAD_DIM)
    return [per_layer[i] for i in range(LAYERS)]


def randomize(caches, seed):
    g = torch.Generator().manual_seed(seed)
    for t in caches.values():
        t.view(torch.int16).copy_(torch.randint(-2**15, 2**15 - 1, t.shape, generator=g, dtype=torch.int16))


# ---- CPU: planning ------------------------------------------------------------------------------------------

def test_plan_chunks_sorts_by_slot_and_packs_runs():
    chunks = plan_chunks([10, 11, 12, 13, 14], [5, 6, 7, 9, 0], max_blocks=3)
    assert chunks == [Chunk((14, 10, 11), (Run(0, 0, 1), Run(5, 1, 2))),
                      Chunk((12, 13), (Run(7, 0, 1), Run(9, 1, 1)))]
    assert plan_chunks([], [], 4) == []
    one = plan_chunks(list(range(100)), list(range(100, 200)), 1000)
    assert len(one) == 1 and one[0].runs == (Run(100, 0, 100),)
    with pytest.raises(ValueError):
        plan_chunks([1], [1], 0)


@pytest.mark.parametrize("seed", range(5))
def test_plan_chunks_covers_every_block_once(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    ids, slots = rng.sample(range(200), n), rng.sample(range(80), n)
    chunks = plan_chunks(ids, slots, rng.randint(1, 9))
    by_slot = dict(zip(slots, ids))
    seen = []
    for chunk in chunks:
        rows = 0
        for run in chunk.runs:
            assert run.row == rows
            for k in range(run.count):
                assert chunk.block_ids[run.row + k] == by_slot[run.slot + k]
                seen.append(run.slot + k)
            rows += run.count
        assert rows == len(chunk.block_ids)
    assert sorted(seen) == sorted(slots)


@pytest.mark.parametrize("seed", range(3))
def test_host_copies_move_what_direct_indexing_moves(seed):
    """Emulate each 2D copy with numpy: staging (S, n, seg) <-> host (S, num_slots, seg), both directions."""
    rng = np.random.default_rng(seed)
    num_segments, num_slots, seg = 4, 30, 16
    slots = rng.permutation(num_slots)[:12].tolist()
    for chunk in plan_chunks(list(range(12)), slots, 5):
        n = len(chunk.block_ids)
        staging = rng.integers(0, 255, num_segments * n * seg, dtype=np.uint8)
        host = np.zeros(num_segments * num_slots * seg, dtype=np.uint8)
        for c in host_copies(chunk, num_segments, num_slots, seg):
            for h in range(c.height):
                hs, ss = c.host_offset + h * c.host_pitch, c.staging_offset + h * c.staging_pitch
                host[hs:hs + c.width] = staging[ss:ss + c.width]
        h3, s3 = host.reshape(num_segments, num_slots, seg), staging.reshape(num_segments, n, seg)
        for run in chunk.runs:
            assert (h3[:, run.slot:run.slot + run.count] == s3[:, run.row:run.row + run.count]).all()
        back = np.zeros_like(staging)
        for c in host_copies(chunk, num_segments, num_slots, seg):  # the reverse direction, same descriptors
            for h in range(c.height):
                hs, ss = c.host_offset + h * c.host_pitch, c.staging_offset + h * c.staging_pitch
                back[ss:ss + c.width] = host[hs:hs + c.width]
        assert (back == staging).all()


@pytest.mark.parametrize("kind", ["flash_attn", "vllm_cpu"])
def test_flat_rows_gather_and_scatter_match_per_segment(kind):
    num_blocks = 12
    if kind == "flash_attn":
        caches = flash_attn_caches(num_blocks)
        randomize(caches, 3)
        layout = KVLayout.from_layers(caches, block_dim=1)
    else:
        layers = vllm_cpu_caches(num_blocks)
        for t in layers:
            t.view(torch.int16).random_()
        layout = KVLayout.from_layers(layers, block_dim=0)
    flat = FlatRows.of(layout)
    assert flat is not None
    ids = torch.tensor([7, 2, 9, 0])
    seg_major = torch.index_select(flat.rows, 0, flat.index(ids, True)).view(layout.num_segments, 4, -1)
    expected = torch.stack([seg[ids] for seg in layout.segments])
    assert torch.equal(seg_major, expected)
    block_major = torch.index_select(flat.rows, 0, flat.index(ids, False)).view(4, layout.num_segments, -1)
    assert torch.equal(block_major, expected.transpose(0, 1))
    new = torch.randint(-2**40, 2**40, expected.shape, dtype=expected.dtype)
    flat.rows.index_copy_(0, flat.index(ids, True), new.reshape(-1, layout.segment_words))
    assert torch.equal(torch.stack([seg[ids] for seg in layout.segments]), new)


def test_flat_rows_refuse_layers_apart():
    layout = KVLayout.from_layers(flash_attn_caches(6, one_buffer=False), block_dim=1)
    assert FlatRows.of(layout) is None


def test_block_major_host_tier_round_trip_on_cpu(tmp_path):
    """A block-major host tier (HostTier offers it; for_layout gives segment-major everywhere): slots whole,
    G2 -> G3 from one piece per block."""
    caches = flash_attn_caches(10)
    randomize(caches, 7)
    layout = KVLayout.from_layers(caches, block_dim=1)
    host = HostTier(6, layout.num_segments, layout.segment_words, layout.word, pin=False, block_major=True)
    assert host.tensor.shape == (6, layout.num_segments, layout.segment_words)
    assert not HostTier.for_layout(layout, 6, pin=False).block_major  # CPU caches stay segment-major
    disk = DiskTier.create(tmp_path, 6, layout.block_bytes, layout.fingerprint(model="t"),
                           direct=fileio.probe_o_direct(tmp_path) is None)
    engine = TransferEngine(layout, host, disk)
    assert len(engine.pieces.host(2)) == 1
    saved = {b: block_bytes(layout, b) for b in range(10)}
    engine.submit_offload(OffloadJob("s", stores=[BlockMove(b, b, 5 - b) for b in range(6)]))
    engine.submit_offload(OffloadJob("c", cascades=[SlotCopy(b, 5 - b, b) for b in range(6)]))
    engine.wait()
    for b in range(6):
        assert torch.equal(host.read_slot(5 - b), saved[b])
        assert torch.equal(host.segment(1)[5 - b], saved[b][1])
    randomize(caches, 8)
    engine.submit_onboard(OnboardJob("l", loads=[BlockMove(b, 9 - b, 5 - b, Tier.G2) for b in range(3)]
                                     + [BlockMove(b, 9 - b, b, Tier.G3) for b in range(3, 6)]))
    engine.wait()
    assert all(r.ok for r in engine.get_finished())
    for b in range(6):
        assert torch.equal(block_bytes(layout, 9 - b), saved[b])
    engine.close()


def test_other_devices_are_refused():
    caches = {"l0": torch.empty((2, 4, BLOCK_SIZE, HEADS, HEAD_DIM), device="meta")}
    layout = KVLayout.from_layers(caches, block_dim=1)
    with pytest.raises(KvbmError, match="CPU or CUDA"):
        TransferEngine(layout, None)
    assert callable(cuda_copy.mark)


# ---- GPU: byte-exact round trips ----------------------------------------------------------------------------

def block_bytes(layout, block_id) -> torch.Tensor:
    return torch.stack([seg[block_id] for seg in layout.segments]).cpu()


@needs_cuda
@pytest.mark.parametrize("variant", ["block_major", "segment_major_layerwise", "segment_major_2d",
                                     "segment_major_per_segment", "layers_apart"])
def test_round_trip_through_g2_and_g3_into_other_blocks(tmp_path, variant):
    num_blocks, n = 48, 16
    caches = flash_attn_caches(num_blocks, "cuda", one_buffer=variant != "layers_apart")
    randomize(caches, 11)  # "vLLM" wrote KV
    layout = KVLayout.from_layers(caches, block_dim=1)
    if variant.startswith("segment_major"):
        host = HostTier(40, layout.num_segments, layout.segment_words, layout.word)
    else:
        host = HostTier(40, layout.num_segments, layout.segment_words, layout.word, block_major=True)
    assert host.pinned and host.block_major == (not variant.startswith("segment_major"))
    direct = fileio.probe_o_direct(tmp_path) is None
    disk = DiskTier.create(tmp_path, 32, layout.block_bytes, layout.fingerprint(model="t"), direct=direct)
    # Three blocks per GPU chunk: several chunks, both staging buffers in turn.
    engine = TransferEngine(layout, host, disk, chunk_bytes=5 * disk.slot_bytes, gpu_chunk_bytes=3 * layout.block_bytes)
    if variant == "segment_major_per_segment":
        engine.cuda.copy_per_segment()
    if variant == "segment_major_2d":
        engine.cuda.use_chunked()
    assert engine.cuda.uses_layerwise == (variant == "segment_major_layerwise")
    assert engine.cuda.uses_2d == (variant in ("segment_major_2d", "segment_major_layerwise"))
    assert (engine.cuda.flat is None) == (variant == "layers_apart")

    rng = random.Random(5)
    perm = rng.sample(range(num_blocks), num_blocks)
    src, dst = perm[:n], perm[n:2 * n]
    slots = list(range(8)) + rng.sample(range(10, 40), n - 8)  # one run, then scattered slots
    saved = {b: block_bytes(layout, b) for b in src}
    engine.submit_offload(OffloadJob("store-a", stores=[BlockMove(("h", b), b, s) for b, s in zip(src[:8], slots[:8])]))
    engine.submit_offload(OffloadJob("store-b", stores=[BlockMove(("h", b), b, s) for b, s in zip(src[8:], slots[8:])]))
    engine.submit_offload(OffloadJob("cascade", cascades=[SlotCopy(("h", b), s, i) for i, (b, s) in enumerate(zip(src, slots))]))
    assert engine.wait(60)
    for b, s in zip(src, slots):
        assert torch.equal(host.read_slot(s), saved[b]), f"host slot {s} differs from engine block {b}"

    randomize(caches, 12)  # the engine reuses every block
    before = {b: block_bytes(layout, b) for b in range(num_blocks)}
    loads = [BlockMove(("h", b), d, s, Tier.G2) for b, d, s in zip(src[:8], dst[:8], slots[:8])]
    loads += [BlockMove(("h", src[i]), dst[i], i, Tier.G3) for i in range(8, n)]
    engine.submit_onboard(OnboardJob("load", loads=loads))
    assert engine.wait(60)
    results = {r.job_id: r for r in engine.get_finished()}
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert results["load"].blocks == {"g2_g1": 8, "g3_g1": 8}
    for b, d in zip(src, dst):
        assert torch.equal(block_bytes(layout, d), saved[b]), f"block {d} (from {b}) differs"
    for b in set(range(num_blocks)) - set(dst):
        assert torch.equal(block_bytes(layout, b), before[b]), f"block {b} was written but not loaded"
    engine.close()


@needs_cuda
def test_corrupt_disk_block_fails_alone_and_leaves_its_page(tmp_path):
    caches = flash_attn_caches(16, "cuda")
    randomize(caches, 21)
    layout = KVLayout.from_layers(caches, block_dim=1)
    host = HostTier.for_layout(layout, 8)
    disk = DiskTier.create(tmp_path, 8, layout.block_bytes, layout.fingerprint(model="t"),
                           direct=fileio.probe_o_direct(tmp_path) is None)
    engine = TransferEngine(layout, host, disk, gpu_chunk_bytes=2 * layout.block_bytes)
    engine.submit_offload(OffloadJob("s", stores=[BlockMove(b, b, b) for b in range(8)],))
    engine.wait()
    engine.submit_offload(OffloadJob("c", cascades=[SlotCopy(b, b, b) for b in range(8)]))
    engine.wait()
    saved = {b: block_bytes(layout, b) for b in range(8)}
    fd = os.open(disk.path, os.O_WRONLY)
    os.pwrite(fd, b"\xff" * 64, 3 * disk.slot_bytes + 100)
    os.close(fd)
    randomize(caches, 22)
    page = block_bytes(layout, 11)
    engine.submit_onboard(OnboardJob("l", loads=[BlockMove(b, 8 + b, b, Tier.G3) for b in range(8)]))
    engine.wait()
    (result,) = engine.get_finished()[-1:]
    assert result.failed_block_ids == {11} and result.failed_hashes == {3}
    assert torch.equal(block_bytes(layout, 11), page)  # never unverified bytes in an engine page
    for b in set(range(8)) - {3}:
        assert torch.equal(block_bytes(layout, 8 + b), saved[b])
    engine.close()


@needs_cuda
def test_host_jobs_start_on_the_submitting_thread_in_order_and_report_once(tmp_path):
    """G1<->G2 jobs are enqueued by the submitting thread (no wake-up of the kind's thread before the copy
    engine starts) and reported exactly once, whether wait() or the kind's thread sees them finish first;
    a host load submitted behind a queued disk load into the same block still lands after it."""
    num_blocks = 16
    caches = flash_attn_caches(num_blocks, "cuda")
    randomize(caches, 21)
    layout = KVLayout.from_layers(caches, block_dim=1)
    host = HostTier.for_layout(layout, 8)
    disk = DiskTier.create(tmp_path, 8, layout.block_bytes, layout.fingerprint(model="t"),
                           direct=fileio.probe_o_direct(tmp_path) is None)
    engine = TransferEngine(layout, host, disk)
    assert engine.cuda.uses_layerwise
    a, b = block_bytes(layout, 0), block_bytes(layout, 1)
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(200_000_000)  # a "forward" still running: the store waits for it on the GPU
        engine.submit_offload(OffloadJob("s", stores=[BlockMove("a", 0, 0), BlockMove("b", 1, 1)]))
    assert [d.result.job_id for d in engine._direct] == ["s"], "the store was not started on this thread"
    engine.wait()  # reported by this thread: no result lost, none twice
    assert torch.equal(host.read_slot(0), a) and torch.equal(host.read_slot(1), b)
    engine.submit_offload(OffloadJob("c", cascades=[SlotCopy("a", 0, 0)]))  # slot 0 -> disk slot 0
    assert engine.wait(60)
    engine.submit_offload(OffloadJob("s2", stores=[BlockMove("b2", 1, 2)]))
    time.sleep(0.5)  # reported by the offload thread
    assert engine.wait(0)
    done = engine.get_finished()
    assert sorted(r.job_id for r in done) == ["c", "s", "s2"] and all(r.ok for r in done), done
    assert {r.job_id: r.blocks for r in done}["s"] == {"g1_g2": 2, "g2_g3": 0}

    # block 5 is loaded twice: from disk (a, queued on the load thread) then from host slot 1 (b); the host
    # load must not overtake the disk load
    with torch.cuda.stream(torch.cuda.Stream()):
        engine.submit_onboard(OnboardJob("d", loads=[BlockMove("a", 5, 0, Tier.G3)]))
        engine.submit_onboard(OnboardJob("h", loads=[BlockMove("b", 5, 1, Tier.G2)]))
    assert engine.wait(60)
    assert torch.equal(block_bytes(layout, 5), b), "a host load overtook the disk load queued before it"
    assert not torch.equal(a, b)
    done = engine.get_finished()
    assert sorted(r.job_id for r in done) == ["d", "h"] and all(r.ok for r in done), done
    assert not engine._direct and engine.wait(0)
    engine.close()


@needs_cuda
def test_offload_waits_for_the_forward_on_the_submitting_stream():
    """Pages written by a kernel still queued on the compute stream are read only after it ran."""
    caches = flash_attn_caches(8, "cuda")
    layout = KVLayout.from_layers(caches, block_dim=1)
    host = HostTier.for_layout(layout, 8)
    engine = TransferEngine(layout, host, None)
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(400_000_000)  # a long "forward" (about 0.2 s) ...
        for t in caches.values():
            t.fill_(3.0)  # ... that writes the pages
        engine.submit_offload(OffloadJob("s", stores=[BlockMove(b, b, b) for b in range(8)]))
    engine.wait()
    assert engine.get_finished()[0].ok
    threes = torch.full((layout.num_segments, BLOCK_SIZE * HEADS * HEAD_DIM), 3.0, dtype=torch.bfloat16)
    for slot in range(8):
        assert torch.equal(host.read_slot(slot).view(torch.bfloat16), threes)
    engine.close()
