"""Mechanism: byte-exact round trips G1 -> G2 -> G3 -> G1 on real files, both engine layouts, faults."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kvbm.errors import StorageError
from kvbm.mechanism import BlockMove, DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, SlotCopy, TransferEngine
from kvbm.mechanism import fileio
from kvbm.policy import Tier

NUM_BLOCKS, LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 24, 3, 16, 2, 32


def vllm_cpu_caches(num_blocks=NUM_BLOCKS):
    """Per-layer views over one shared int8 buffer, as vLLM 0.32's CPU backend hands them: (blocks, 2, bs, H*D)."""
    page = 2 * BLOCK_SIZE * HEADS * HEAD_DIM
    buf = torch.zeros(LAYERS * num_blocks * page * 2, dtype=torch.int8)
    per_layer = buf.view(torch.bfloat16).view(LAYERS, num_blocks, 2, BLOCK_SIZE, HEADS * HEAD_DIM)
    return {f"model.layers.{i}.self_attn.attn": per_layer[i] for i in range(LAYERS)}


def flash_attn_caches(num_blocks=NUM_BLOCKS):
    """FlashAttention's layout: per layer (2, blocks, bs, H, D), K and V apart (two segments per layer)."""
    buf = torch.zeros(LAYERS * 2 * num_blocks * BLOCK_SIZE * HEADS * HEAD_DIM, dtype=torch.bfloat16)
    per_layer = buf.view(LAYERS, 2, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    return {f"layer{i}": per_layer[i] for i in range(LAYERS)}


def fill_random(caches, seed):
    g = torch.Generator().manual_seed(seed)
    for t in caches.values():
        t.view(torch.int16).copy_(torch.randint(-2**15, 2**15 - 1, t.shape, generator=g, dtype=torch.int16))


def block_bytes_of(layout, block_id):
    return b"".join(seg[block_id].numpy().tobytes() for seg in layout.segments)


@pytest.fixture(params=["vllm_cpu", "flash_attn"])
def layout(request):
    caches = vllm_cpu_caches() if request.param == "vllm_cpu" else flash_attn_caches()
    block_dim = KVLayout.infer_block_dim(next(iter(caches.values())), NUM_BLOCKS)
    fill_random(caches, seed=1)
    return KVLayout.from_layers(caches, block_dim=block_dim)


def test_layout_describes_both_engine_layouts():
    cpu = KVLayout.from_layers(vllm_cpu_caches(), block_dim=0)
    fa = KVLayout.from_layers(flash_attn_caches(), block_dim=1)
    page = 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    assert (cpu.num_segments, cpu.segment_bytes) == (LAYERS, page)
    assert (fa.num_segments, fa.segment_bytes) == (2 * LAYERS, page // 2)
    assert cpu.block_bytes == fa.block_bytes == LAYERS * page
    assert cpu.word == torch.int64
    assert cpu.fingerprint(model="m", block_size=16) != fa.fingerprint(model="m", block_size=16)


def test_layout_rejects_pages_split_inside_a_block():
    t = torch.zeros(8, NUM_BLOCKS, 4).transpose(0, 1)  # block dim 0 but the rest is strided
    with pytest.raises(ValueError, match="not contiguous within a block"):
        KVLayout.from_layers([t], block_dim=0)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_round_trip_g1_g2_g3_g1_is_byte_exact(layout, tmp_path, direct):
    host = HostTier(num_slots=6, num_segments=layout.num_segments, segment_words=layout.segment_words,
                    word=layout.word)
    disk = DiskTier.create(tmp_path, 16, layout.block_bytes, layout.fingerprint(model="t"), direct=direct)
    engine = TransferEngine(layout, host, disk)
    src_blocks = [5, 3, 17, 0, 11, 12]
    original = {b: block_bytes_of(layout, b) for b in src_blocks}
    # G1 -> G2 into scattered slots, then G2 -> G3 (the eviction cascade) into scattered disk slots.
    engine.submit_offload(OffloadJob("store", stores=[BlockMove(f"h{b}", b, s) for b, s in
                                                      zip(src_blocks, [4, 5, 0, 1, 2, 3])]))
    engine.wait()
    engine.submit_offload(OffloadJob("cascade", cascades=[SlotCopy(f"h{b}", s, d) for b, s, d in
                                                          zip(src_blocks, [4, 5, 0, 1, 2, 3], [9, 10, 2, 3, 15, 7])]))
    engine.wait()
    results = {r.job_id: r for r in engine.get_finished()}
    assert results["store"].ok and results["store"].blocks["g1_g2"] == 6
    assert results["cascade"].ok and results["cascade"].blocks["g2_g3"] == 6
    # Overwrite the whole engine cache and the host tier, then onboard into *other* blocks.
    for seg in layout.segments:
        seg.zero_()
    host.tensor.fill_(-1)
    targets = [20, 1, 2, 8, 9, 23]
    loads = [BlockMove(f"h{b}", t, d, Tier.G3) for b, t, d in zip(src_blocks, targets, [9, 10, 2, 3, 15, 7])]
    engine.submit_onboard(OnboardJob("load", loads=loads))
    engine.wait()
    (result,) = engine.get_finished()
    assert result.ok and result.blocks["g3_g1"] == 6
    for b, t in zip(src_blocks, targets):
        assert block_bytes_of(layout, t) == original[b]
    path = disk.path
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    engine.close()
    assert not path.exists(), "the cache file is removed on clean shutdown"


def test_onboard_from_host_into_other_blocks(layout):
    host = HostTier(num_slots=8, num_segments=layout.num_segments, segment_words=layout.segment_words,
                    word=layout.word)
    engine = TransferEngine(layout, host)
    original = {b: block_bytes_of(layout, b) for b in range(NUM_BLOCKS)}
    engine.submit_offload(OffloadJob(1, stores=[BlockMove(b, b, slot) for slot, b in enumerate([7, 2, 9, 4])]))
    engine.wait()
    for seg in layout.segments:
        seg.zero_()
    engine.submit_onboard(OnboardJob(2, loads=[BlockMove(b, t, slot) for slot, (b, t) in
                                               enumerate([(7, 10), (2, 11), (9, 3), (4, 0)])]))
    engine.wait()
    assert all(r.ok for r in engine.get_finished())
    for b, t in [(7, 10), (2, 11), (9, 3), (4, 0)]:
        assert block_bytes_of(layout, t) == original[b]
    engine.close()


def _offload_to_disk(layout, engine, blocks, disk_slots):
    engine.submit_offload(OffloadJob("s", stores=[BlockMove(b, b, i) for i, b in enumerate(blocks)]))
    engine.wait()
    engine.submit_offload(OffloadJob("c", cascades=[SlotCopy(b, i, d) for i, (b, d) in enumerate(zip(blocks, disk_slots))]))
    engine.wait()
    return engine.get_finished()


def test_corrupt_disk_block_is_a_load_failure_never_data(layout, tmp_path):
    host = HostTier(4, layout.num_segments, layout.segment_words, layout.word)
    disk = DiskTier.create(tmp_path, 4, layout.block_bytes, b"f" * 16, direct=False)
    engine = TransferEngine(layout, host, disk)
    _offload_to_disk(layout, engine, [1, 2, 3], [0, 1, 2])
    original = block_bytes_of(layout, 2)
    with open(disk.path, "r+b") as f:  # flip one byte inside block 2's data on disk
        f.seek(1 * disk.slot_bytes + 100)
        byte = f.read(1)
        f.seek(1 * disk.slot_bytes + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    for seg in layout.segments:
        seg.fill_(0)
    engine.submit_onboard(OnboardJob("l", loads=[BlockMove(b, b, d, Tier.G3) for b, d in [(1, 0), (2, 1), (3, 2)]]))
    engine.wait()
    (r,) = engine.get_finished()
    assert r.failed_hashes == {2} and r.failed_block_ids == {2}
    assert block_bytes_of(layout, 2) == bytes(len(original)), "corrupt bytes never reach the engine"
    assert block_bytes_of(layout, 1) != bytes(len(original))
    # A block asked for under another identity (wrong hash) fails too.
    engine.submit_onboard(OnboardJob("x", loads=[BlockMove("not-this-block", 5, 0, Tier.G3)]))
    engine.wait()
    assert engine.get_finished()[0].failed_block_ids == {5}
    engine.close()


def test_refused_disk_writes_fail_the_cascade_and_serving_goes_on(layout, tmp_path):
    """The kernel refuses the writes (the cache fd swapped for a read-only one): blocks fail, nothing is read back."""
    host = HostTier(4, layout.num_segments, layout.segment_words, layout.word)
    disk = DiskTier.create(tmp_path, 4, layout.block_bytes, b"f" * 16, direct=False)
    engine = TransferEngine(layout, host, disk)
    ro = os.open(disk.path, os.O_RDONLY)
    os.dup2(ro, disk.fd)
    os.close(ro)
    results = _offload_to_disk(layout, engine, [1, 2], [0, 1])
    by_id = {r.job_id: r for r in results}
    assert by_id["s"].ok and by_id["c"].failed_hashes == {1, 2} and "failed" in by_id["c"].error
    # G2 still serves: the host copy onboards fine.
    engine.submit_onboard(OnboardJob("h", loads=[BlockMove(1, 7, 0)]))
    engine.wait()
    assert engine.get_finished()[0].ok and block_bytes_of(layout, 7) == block_bytes_of(layout, 1)
    # Reading the never-written slot verifies nothing: a failure, not zeros handed over.
    engine.submit_onboard(OnboardJob("d", loads=[BlockMove(1, 8, 0, Tier.G3)]))
    engine.wait()
    assert engine.get_finished()[0].failed_block_ids == {8}
    engine.close()


def _mount(fstype, target: Path, opts=None):
    target.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", fstype] + (["-o", opts] if opts else []) + ["none", str(target)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount {fstype} here (needs root); this fault is covered on machines that can")
    return target


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = _mount("tmpfs", tmp_path / "small", "size=1m")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def ramfs(tmp_path):
    mnt = _mount("ramfs", tmp_path / "ramfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_refuses_the_cache_with_one_clear_error(small_tmpfs, layout):
    with pytest.raises(StorageError, match="no space .* lower DYN_KVBM_DISK_CACHE_GB"):
        DiskTier.create(small_tmpfs, 256, layout.block_bytes, b"f" * 16, direct=False)
    assert not list(small_tmpfs.iterdir()), "a refused cache file leaves nothing behind"


def test_o_direct_refused_names_the_switch(ramfs, layout):
    with pytest.raises(StorageError, match="DYN_KVBM_DISK_DISABLE_O_DIRECT=true"):
        DiskTier.create(ramfs, 2, layout.block_bytes, b"f" * 16, direct=True)
    disk = DiskTier.create(ramfs, 2, layout.block_bytes, b"f" * 16, direct=False)  # buffered works there
    disk.close()


def test_stale_files_of_dead_processes_are_removed_at_start(tmp_path, layout):
    proc = subprocess.run(["true"])
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    name = fileio.cache_file_name(0).replace(f"pid{os.getpid()}", f"pid{dead.pid}")
    stale = tmp_path / name
    stale.write_bytes(b"x")
    live = tmp_path / fileio.cache_file_name(1)  # ours: alive
    live.write_bytes(b"y")
    assert fileio.stale_cache_files(tmp_path) == [stale]
    disk = DiskTier.create(tmp_path, 1, layout.block_bytes, b"f" * 16, direct=False)
    assert not stale.exists() and live.exists()
    disk.close()
    assert proc.returncode == 0


def test_zero_fill_fallback_allocates_when_asked(tmp_path, layout):
    fd = fileio.open_cache_file(tmp_path / "z", direct=False)
    try:
        assert fileio.preallocate(fd, 3 * 4096, zerofill=True) == "fallocate"  # ext4/tmpfs support it
    finally:
        os.close(fd)
    data = np.fromfile(tmp_path / "z", dtype=np.uint8)
    assert data.size == 3 * 4096 and not data.any()
