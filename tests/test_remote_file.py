"""The shared tier (G4) on a shared directory (file://): real files, several processes writing at once."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm.mechanism.remote import OVERHEAD, open_store
from kvbm.mechanism.remote.file_store import FileStore

BLOCK = 64 << 10
VALUE = BLOCK + OVERHEAD
FP = bytes(range(16))
FP_OTHER = bytes(range(1, 17))


def block_of(h: bytes) -> np.ndarray:
    """The data every writer stores for block `h` (content addressed: same hash, same bytes)."""
    return np.random.default_rng(int.from_bytes(h[-4:], "little")).integers(0, 256, BLOCK, dtype=np.uint8)


def hashes(lo: int, hi: int) -> list[bytes]:
    return [b"blk" + i.to_bytes(4, "little") for i in range(lo, hi)]


def store_of(root: Path, secret=None, fp: bytes = FP, **kw) -> FileStore:
    store = open_store(f"file://{root}", fp, secret, block_bytes=BLOCK, **kw)
    assert store is not None
    return store


def test_round_trip_byte_exact_published_read_only(tmp_path):
    hs = hashes(0, 100)
    with store_of(tmp_path) as store:
        assert all(store.put_many([(h, block_of(h)) for h in hs]).result())
        got = store.get_many(hs + [b"absent"]).result()
        assert got[-1] is None and all(bytes(g) == block_of(h).tobytes() for g, h in zip(got, hs))
        assert store.contains_many(hs[:3] + [b"absent"]).result() == [True, True, True, False]
        files = sorted((tmp_path / FP.hex()).iterdir())
        assert len(files) == 100 and all(f.suffix == ".kvbm" and f.stat().st_size == VALUE for f in files)
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o444 for f in files)  # read-only once published
        assert store.put_many([(hs[0], block_of(hs[0]))]).result() == [True]  # already there: not rewritten
        assert store.stats()["bytes_written"] == 100 * BLOCK


def test_forged_corrupt_and_foreign_files_are_misses(tmp_path):
    hs = hashes(0, 4)
    with store_of(tmp_path, secret="k") as store, store_of(tmp_path, secret="k", fp=FP_OTHER) as foreign:
        store.put_many([(h, block_of(h)) for h in hs]).result()
        assert all(g is not None for g in store.get_many(hs).result())  # control
        paths = [store.path(store.key(h)) for h in hs]
        with store_of(tmp_path) as attacker:  # no secret: its well-formed value replaces block 0's file
            paths[0].unlink()
            attacker.put_many([(hs[0], np.zeros(BLOCK, np.uint8))]).result()
        os.chmod(paths[1], 0o644)
        with open(paths[1], "r+b") as f:  # flip one data byte
            f.seek(500)
            b = f.read(1)
            f.seek(500)
            f.write(bytes([b[0] ^ 1]))
        os.truncate(paths[2], VALUE - 1)
        foreign_path = foreign.path(foreign.key(hs[3]))
        foreign_path.write_bytes(paths[3].read_bytes())  # the same block under another model's folder
        got = store.get_many(hs).result()
        assert got[:3] == [None, None, None] and bytes(got[3]) == block_of(hs[3]).tobytes()
        assert foreign.get_many([hs[3]]).result() == [None]
        assert store.stats()["rejected"] == 3 and foreign.stats()["rejected"] == 1


def _writer(root: str, lo: int, hi: int, cap: int, seed: int) -> None:
    store = FileStore(f"file://{root}", FP, block_bytes=BLOCK, cache_bytes=cap, scan_interval_s=0.05)
    hs = hashes(lo, hi)
    rng = np.random.default_rng(seed)
    rng.shuffle(hs)
    for i in range(0, len(hs), 8):
        chunk = hs[i:i + 8]
        assert all(store.put_many([(h, block_of(h)) for h in chunk]).result())
    store.close()
    os._exit(0 if store.stats()["put_failures"] == 0 else 3)


def _reader(root: str, n: int, seconds: float, out) -> None:
    """Read every block as fast as it can; count values of the wrong size or content (torn or mixed)."""
    bad = hits = 0
    deadline = time.monotonic() + seconds
    hs = hashes(0, n)
    while time.monotonic() < deadline:
        for h in hs:
            try:
                raw = (Path(root) / FP.hex() / _name(h)).read_bytes()
            except FileNotFoundError:
                continue
            hits += 1
            if len(raw) != VALUE or raw[:BLOCK] != block_of(h).tobytes():
                bad += 1
    out.put((hits, bad))


def _name(h: bytes) -> str:
    from kvbm.mechanism.trailer import block_identity

    return block_identity(h).hex() + ".kvbm"


def _naive_writer(root: str, n: int) -> None:
    """Negative control: writes each block in place under its final name, in two halves."""
    folder = Path(root) / FP.hex()
    folder.mkdir(parents=True, exist_ok=True)
    for h in hashes(0, n):
        with open(folder / _name(h), "wb") as f:
            data = block_of(h).tobytes() + bytes(OVERHEAD)
            f.write(data[:BLOCK // 2])
            f.flush()
            time.sleep(0.002)
            f.write(data[BLOCK // 2:])
    os._exit(0)


def test_concurrent_writers_no_torn_reads_and_size_cap(tmp_path):
    ctx = mp.get_context("fork")
    cap = 40 * VALUE  # 2.6 MB: 3 writers of 100 overlapping blocks each must evict
    q = ctx.Queue()
    reader = ctx.Process(target=_reader, args=(str(tmp_path), 200, 2.0, q))
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), lo, lo + 100, cap, lo)) for lo in (0, 50, 100)]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
        assert w.exitcode == 0
    hits, bad = q.get(timeout=30)
    reader.join(10)
    assert hits > 0 and bad == 0
    with store_of(tmp_path) as store:  # no cap of its own: measures what the writers left
        files, used = store.usage()
        assert 0 < files < 200 and used <= cap + 3 * 8 * VALUE  # each writer may overshoot by one batch
        assert not list((tmp_path / FP.hex()).glob(".*.tmp"))
        got = store.get_many(hashes(0, 200)).result()
        assert 0 < sum(g is not None for g in got) == files
        assert all(g is None or bytes(g) == block_of(h).tobytes() for g, h in zip(got, hashes(0, 200)))


def test_negative_control_in_place_writer_tears_reads(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    reader = ctx.Process(target=_reader, args=(str(tmp_path), 100, 1.5, q))
    writer = ctx.Process(target=_naive_writer, args=(str(tmp_path), 100))
    reader.start()
    time.sleep(0.05)
    writer.start()
    writer.join(30)
    hits, bad = q.get(timeout=30)
    reader.join(10)
    assert bad > 0  # the reader's check does see torn files when a writer does not publish atomically


def test_cap_removes_least_recently_used_and_stale_temporaries(tmp_path):
    hs = hashes(0, 10)
    with store_of(tmp_path, cache_bytes=10 * VALUE, scan_interval_s=3600) as store:
        store.put_many([(h, block_of(h)) for h in hs]).result()
        now = time.time()
        for i, h in enumerate(hs):  # block i was published i seconds after block 0
            os.utime(store.path(store.key(h)), (now - 100 + i, now - 100 + i))
        store.get_many([hs[0]]).result()  # a hit makes block 0 the most recent
        stale = store.folder / ".dead-writer.tmp"
        stale.write_bytes(b"x")
        os.utime(stale, (now - 3600, now - 3600))
        store.put_many([(h, block_of(h)) for h in hashes(10, 12)]).result()  # over the cap: scan now
        present = store.contains_many(hs).result()
        assert present[0] and not present[1] and not present[2] and all(present[4:])
        assert not stale.exists() and store.stats()["evictions"] >= 2
        assert store.usage()[1] <= 10 * VALUE


def test_unusable_directory_is_one_warning_and_none(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="kvbm.remote"):
        assert open_store(f"file://{blocker}/kvbm", FP) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "DYN_KVBM_REMOTE_URL" in lines[0]
    assert store_of(tmp_path / "fine") is not None  # control
