"""NixlDiskIO (NIXL POSIX backend): byte-exact round trips on real files, same file format as PosixDiskIO,
registration paths, concurrency, and failures that must surface as StorageError."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from kvbm.errors import StorageError
from kvbm.mechanism.fileio import ALIGN, PosixDiskIO, aligned_empty, open_cache_file, preallocate
from kvbm.mechanism.nixl_io import NixlDiskIO, load_nixl, nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="NIXL's Python API (nixl / nixl_cu13) is not installed")

SLOT = 64 * 1024
NUM_SLOTS = 64
DIRECT = pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])


@pytest.fixture
def nixl_io():
    io = NixlDiskIO()
    yield io
    io.close()


@pytest.fixture
def posix_io():
    io = PosixDiskIO()
    yield io
    io.close()


def cache_file(tmp_path, direct: bool, nbytes: int = NUM_SLOTS * SLOT, name: str = "cache.kvbm") -> int:
    fd = open_cache_file(tmp_path / name, direct)
    preallocate(fd, nbytes, zerofill=False)
    return fd


def random_slots(n: int, seed: int) -> np.ndarray:
    buf = aligned_empty(n * SLOT)
    buf[:] = np.random.default_rng(seed).integers(0, 256, buf.size, dtype=np.uint8)
    return buf.reshape(n, SLOT)


def scattered(n: int, seed: int) -> list[int]:
    """n distinct slot numbers out of NUM_SLOTS, in random order."""
    return [int(s) for s in np.random.default_rng(seed).permutation(NUM_SLOTS)[:n]]


def test_load_nixl_finds_the_installed_module():
    mod = load_nixl()
    assert mod is not None and mod.__name__ in ("nixl", "nixl_cu13", "nixl_cu12")
    assert NixlDiskIO.name == "nixl" and PosixDiskIO.name == "posix"


@DIRECT
@pytest.mark.parametrize("queue", [None, {}, {"use_uring": "true"}, {"use_posix_aio": "true"}],
                         ids=["default", "linux_aio", "io_uring", "posix_aio"])
def test_round_trip_many_scattered_slots_in_one_batch(tmp_path, direct, queue):
    nixl_io = NixlDiskIO(backend_params=queue)
    fd = cache_file(tmp_path, direct)
    try:
        src = random_slots(40, seed=1)
        slots = scattered(40, seed=2)
        nixl_io.write(fd, [(s * SLOT, src[i]) for i, s in enumerate(slots)])
        back = aligned_empty(src.nbytes).reshape(src.shape)
        back[:] = 0
        # read back in another order, into unregistered buffers (registered for the call only)
        order = list(reversed(range(40)))
        nixl_io.read(fd, [(slots[i] * SLOT, back[i]) for i in order])
        assert np.array_equal(back, src)
        assert not nixl_io._regions.by_key  # temporary registrations were released
    finally:
        nixl_io.close()
        os.close(fd)


@DIRECT
def test_list_items_write_pieces_back_to_back(tmp_path, nixl_io, posix_io, direct):
    """An item may be a list of buffers laid back to back in the file (scattered pages, no staging copy)."""
    fd = cache_file(tmp_path, direct)
    try:
        pieces = random_slots(6, seed=3).reshape(-1, SLOT // 4)  # 24 pieces of 16 KiB, aligned
        order = [5, 0, 17, 9, 23, 2, 11, 4]  # pieces picked out of order: scattered in memory
        nixl_io.write(fd, [(3 * SLOT, [pieces[i] for i in order[:4]]), (10 * SLOT, [pieces[i] for i in order[4:]])])
        back = aligned_empty(8 * SLOT // 4)
        posix_io.read(fd, [(3 * SLOT, back[:SLOT]), (10 * SLOT, back[SLOT:])])
        assert np.array_equal(back.reshape(8, -1), pieces[order])
        again = [aligned_empty(SLOT // 4) for _ in range(8)]
        nixl_io.read(fd, [(3 * SLOT, [memoryview(a) for a in again[:4]]), (10 * SLOT, again[4:])])
        assert all(np.array_equal(a, pieces[i]) for a, i in zip(again, order))
    finally:
        os.close(fd)


@DIRECT
def test_same_file_format_as_posix_both_ways(tmp_path, nixl_io, posix_io, direct):
    fd = cache_file(tmp_path, direct)
    try:
        a, b = random_slots(16, seed=4), random_slots(16, seed=5)
        slots_a, slots_b = scattered(32, seed=6)[:16], scattered(32, seed=6)[16:]
        nixl_io.write(fd, [(s * SLOT, a[i]) for i, s in enumerate(slots_a)])
        posix_io.write(fd, [(s * SLOT, b[i]) for i, s in enumerate(slots_b)])
        got_a = aligned_empty(a.nbytes).reshape(a.shape)
        got_b = aligned_empty(b.nbytes).reshape(b.shape)
        posix_io.read(fd, [(s * SLOT, got_a[i]) for i, s in enumerate(slots_a)])
        nixl_io.read(fd, [(s * SLOT, got_b[i]) for i, s in enumerate(slots_b)])
        assert np.array_equal(got_a, a) and np.array_equal(got_b, b)
    finally:
        os.close(fd)


def test_falls_back_to_linux_aio_where_io_uring_cannot_start(monkeypatch):
    agent_class = load_nixl().nixl_agent
    real = agent_class.create_backend

    def refuse_uring(self, backend, params={}):
        if params.get("use_uring") == "true":
            raise RuntimeError("io_uring_setup: Operation not permitted")
        return real(self, backend, params)

    monkeypatch.setattr(agent_class, "create_backend", refuse_uring)
    io = NixlDiskIO()
    try:
        assert io.backend_params == {}
    finally:
        io.close()
    with NixlDiskIO(backend_params={"use_aio": "true"}) as explicit:  # explicit parameters are used as given
        assert explicit.backend_params == {"use_aio": "true"}


def test_registered_staging_buffer_and_mixed_batches(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=True)
    try:
        stage = random_slots(8, seed=7)
        nixl_io.register_buffer(stage)
        nixl_io.register_buffer(stage)  # idempotent
        assert len(nixl_io._regions.by_key) == 1
        loose = random_slots(2, seed=8)  # not registered: registered around the call
        nixl_io.write(fd, [(0, stage[:4].reshape(-1)), (20 * SLOT, loose[0]), (30 * SLOT, stage[6]),
                           (31 * SLOT, loose[1])])
        back = aligned_empty(8 * SLOT).reshape(8, SLOT)
        nixl_io.register_buffer(back)
        nixl_io.read(fd, [(0, back[:4].reshape(-1)), (20 * SLOT, back[4]), (30 * SLOT, back[5]), (31 * SLOT, back[6])])
        assert np.array_equal(back[:4], stage[:4]) and np.array_equal(back[4], loose[0])
        assert np.array_equal(back[5], stage[6]) and np.array_equal(back[6], loose[1])
        assert len(nixl_io._regions.by_key) == 2
        nixl_io.unregister_buffer(back)
        assert len(nixl_io._regions.by_key) == 1
    finally:
        os.close(fd)


def test_large_buffer_is_cut_into_chunks_and_batches_into_several_requests(tmp_path):
    io = NixlDiskIO(chunk_bytes=3 * SLOT + 100, max_descs=5)  # chunk rounds down to a multiple of ALIGN
    fd = cache_file(tmp_path, direct=True)
    try:
        src = random_slots(NUM_SLOTS, seed=9).reshape(-1)
        io.write(fd, [(0, src)])
        back = aligned_empty(src.nbytes)
        io.read(fd, [(0, back)])
        assert np.array_equal(back, src)
    finally:
        io.close()
        os.close(fd)


def test_disk_tier_blocks_round_trip_through_nixl(tmp_path):
    from kvbm.mechanism.disk import DiskTier

    block_bytes = 3 * ALIGN
    disk = DiskTier.create(tmp_path, 8, block_bytes, b"f" * 16, direct=True, io=NixlDiskIO())
    try:
        blocks = random_slots(1, seed=10).reshape(-1)[:4 * block_bytes].reshape(4, 3, ALIGN)
        disk.write_blocks([6, 1, 2, 3], ["a", "b", "c", "d"], [list(b) for b in blocks])
        out = aligned_empty(blocks.nbytes).reshape(blocks.shape)
        good = disk.read_blocks([6, 1, 2, 3], ["a", "b", "c", "d"], [list(b) for b in out])
        assert good == [0, 1, 2, 3] and np.array_equal(out, blocks)
    finally:
        disk.close()


def test_concurrent_calls_from_several_threads(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=True)
    errors = []

    def worker(k: int) -> None:
        try:
            src = random_slots(8, seed=100 + k)
            slots = list(range(k * 8, k * 8 + 8))
            back = aligned_empty(src.nbytes).reshape(src.shape)
            for _ in range(10):
                nixl_io.write(fd, [(s * SLOT, src[i]) for i, s in enumerate(slots)])
                back[:] = 0
                nixl_io.read(fd, [(s * SLOT, back[i]) for i, s in enumerate(slots)])
                assert np.array_equal(back, src)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    os.close(fd)
    assert not errors and not any(t.is_alive() for t in threads)


def test_read_beyond_end_of_truncated_file_is_a_storage_error(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=True)
    try:
        nixl_io.write(fd, [(0, random_slots(1, seed=11)[0])])
        os.ftruncate(fd, 4 * SLOT)
        buf = aligned_empty(SLOT)
        with pytest.raises(StorageError, match="read via NIXL failed.*truncated"):
            nixl_io.read(fd, [(0, buf), (10 * SLOT, aligned_empty(SLOT))])
        nixl_io.read(fd, [(0, buf)])  # still usable afterwards
    finally:
        os.close(fd)


def test_closed_fd_is_a_storage_error(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=False)
    nixl_io.write(fd, [(0, random_slots(1, seed=12)[0])])  # registers the fd
    os.close(fd)
    with pytest.raises(StorageError, match="write via NIXL failed.*fd"):
        nixl_io.write(fd, [(0, random_slots(1, seed=12)[0])])
    with pytest.raises(StorageError, match="read via NIXL failed"):
        nixl_io.read(fd, [(0, aligned_empty(SLOT))])


def test_error_reported_by_nixl_itself_is_a_storage_error(tmp_path, nixl_io):
    """A write to a read-only fd passes the up-front checks and fails inside NIXL's backend (EBADF)."""
    cache_file(tmp_path, direct=False)
    fd = os.open(tmp_path / "cache.kvbm", os.O_RDONLY)
    try:
        with pytest.raises(StorageError, match="disk cache write via NIXL failed: NIXL_ERR"):
            nixl_io.write(fd, [(0, random_slots(2, seed=13).reshape(-1))])
        back = aligned_empty(SLOT)
        nixl_io.read(fd, [(0, back)])  # the agent recovers: the next request works
    finally:
        os.close(fd)


def test_misaligned_buffer_with_o_direct_is_a_storage_error(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=True)
    try:
        raw = aligned_empty(2 * SLOT)
        with pytest.raises(StorageError, match="O_DIRECT"):
            nixl_io.write(fd, [(0, raw[1:SLOT + 1])])
        with pytest.raises(StorageError, match="O_DIRECT"):
            nixl_io.write(fd, [(100, raw[:SLOT])])
    finally:
        os.close(fd)


def test_read_into_read_only_buffer_is_refused(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=False)
    try:
        with pytest.raises(StorageError, match="read-only"):
            nixl_io.read(fd, [(0, bytes(SLOT))])
    finally:
        os.close(fd)


def test_close_is_idempotent_and_use_after_close_fails(tmp_path):
    io = NixlDiskIO()
    fd = cache_file(tmp_path, direct=True)
    try:
        io.register_buffer(aligned_empty(SLOT))
        io.write(fd, [(0, random_slots(1, seed=14)[0])])
        io.close()
        io.close()
        with pytest.raises(StorageError, match="after close"):
            io.write(fd, [(0, random_slots(1, seed=14)[0])])
    finally:
        os.close(fd)


def test_empty_batch_is_a_no_op(tmp_path, nixl_io):
    fd = cache_file(tmp_path, direct=True)
    try:
        nixl_io.write(fd, [])
        nixl_io.read(fd, [])
    finally:
        os.close(fd)
