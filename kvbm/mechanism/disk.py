"""The disk tier (G3): one preallocated file per worker, whole-block slots with a verified trailer.

A slot holds one block's segments back to back, then a 64-byte trailer, padded to 4096 bytes:
  magic "KVBM" | version | xxh3-64 checksum of the data | 16-byte block identity | 16-byte layout fingerprint
The fingerprint names the model, dtype, geometry and block size that computed the block, so changed KV can
never be served; a checksum or identity mismatch is a load failure (the engine recomputes), never data.

Operations:
  DiskTier.create(dir, num_slots, block_bytes, fingerprint, rank, direct, zerofill, io)
  staging(n)                 an aligned (n, slot_words) buffer for whole slots
  seal / write_sealed / write   fill trailers, write the slots (StorageError on failure)
  read_raw / verify / read      read the slots; the indices whose trailer and checksum verify
  close()                    close and remove the file
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import xxhash

from kvbm.errors import StorageError
from kvbm.mechanism import fileio

log = logging.getLogger("kvbm.disk")

TRAILER = struct.Struct("<4sIQ16s16s")  # magic, version, checksum, block identity, fingerprint
TRAILER_BYTES = 64
MAGIC = b"KVBM"
VERSION = 1


def block_identity(block_hash: Hashable) -> bytes:
    """16 bytes identifying a block hash of any type (vLLM's are bytes)."""
    raw = block_hash if isinstance(block_hash, bytes) else repr(block_hash).encode()
    return xxhash.xxh3_128_digest(raw)


class DiskTier:
    """G3 storage: one cache file of fixed slots. Lives in each worker process."""

    def __init__(self, path: Path, fd: int, num_slots: int, block_bytes: int, fingerprint: bytes, direct: bool,
                 io, allocation: str):
        self.path = path
        self.fd = fd
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        self.slot_bytes = fileio.round_up(block_bytes + TRAILER_BYTES)
        self.fingerprint = fingerprint
        self.direct = direct
        self.io = io
        self.allocation = allocation

    @classmethod
    def create(cls, directory: Path, num_slots: int, block_bytes: int, fingerprint: bytes, *, rank: int = 0,
               direct: bool = True, zerofill: bool = False, io=None) -> "DiskTier":
        """Create and preallocate this worker's cache file in `directory`, after removing stale files."""
        if num_slots <= 0:
            raise StorageError("the disk tier needs at least one slot; raise DYN_KVBM_DISK_CACHE_GB")
        directory = Path(directory)
        for stale in fileio.remove_stale_cache_files(directory):
            log.info("removed stale KVBM disk cache file %s", stale)
        path = directory / fileio.cache_file_name(rank)
        slot_bytes = fileio.round_up(block_bytes + TRAILER_BYTES)
        fd = fileio.open_cache_file(path, direct)
        try:
            allocation = fileio.preallocate(fd, num_slots * slot_bytes, zerofill, path)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        io = io if io is not None else fileio.PosixDiskIO()
        log.info("KVBM disk cache %s: %d slots x %d bytes (%s, %s)", path, num_slots, slot_bytes, allocation,
                 "O_DIRECT" if direct else "buffered")
        return cls(path, fd, num_slots, block_bytes, fingerprint, direct, io, allocation)

    @property
    def nbytes(self) -> int:
        """Bytes reserved on disk."""
        return self.num_slots * self.slot_bytes

    def staging(self, n: int) -> np.ndarray:
        """An aligned uint8 buffer of `n` whole slots, shape (n, slot_bytes)."""
        return fileio.aligned_empty(n * self.slot_bytes).reshape(n, self.slot_bytes)

    def _trailer(self, data: np.ndarray, block_hash: Hashable) -> bytes:
        checksum = xxhash.xxh3_64_intdigest(data)
        return TRAILER.pack(MAGIC, VERSION, checksum, block_identity(block_hash), self.fingerprint)

    def seal(self, hashes: Sequence[Hashable], buf: np.ndarray) -> None:
        """Fill the trailer of each row of `buf` (data in its first block_bytes) for the block hashes."""
        for i, h in enumerate(hashes):
            row = buf[i]
            row[self.block_bytes:self.block_bytes + TRAILER.size] = np.frombuffer(
                self._trailer(row[:self.block_bytes], h), dtype=np.uint8)

    def write_sealed(self, slots: Sequence[int], buf: np.ndarray) -> None:
        """Write sealed rows of `buf` to `slots` (StorageError on failure)."""
        self.io.write(self.fd, self._items(slots, buf))

    def write(self, slots: Sequence[int], hashes: Sequence[Hashable], buf: np.ndarray) -> None:
        """Seal and write rows of `buf` to `slots`."""
        self.seal(hashes, buf)
        self.write_sealed(slots, buf)

    def read_raw(self, slots: Sequence[int], buf: np.ndarray) -> None:
        """Read `slots` into rows of `buf`, unverified (StorageError on failure)."""
        self.io.read(self.fd, self._items(slots, buf))

    def verify(self, slots: Sequence[int], hashes: Sequence[Hashable], buf: np.ndarray) -> list[int]:
        """Row indices of `buf` whose trailer, identity, fingerprint and checksum match; others are dropped."""
        good = []
        for i, h in enumerate(hashes):
            row = buf[i]
            magic, version, checksum, ident, fp = TRAILER.unpack_from(row, self.block_bytes)
            if magic != MAGIC or version != VERSION:
                log.warning("disk block in slot %d has no valid trailer; dropping it", slots[i])
            elif fp != self.fingerprint or ident != block_identity(h):
                log.warning("disk block in slot %d belongs to another block or model; dropping it", slots[i])
            elif xxhash.xxh3_64_intdigest(row[:self.block_bytes]) != checksum:
                log.warning("disk block in slot %d failed its checksum; dropping it (will be recomputed)", slots[i])
            else:
                good.append(i)
        return good

    def read(self, slots: Sequence[int], hashes: Sequence[Hashable], buf: np.ndarray) -> list[int]:
        """Read and verify `slots` into rows of `buf`; returns the row indices that verify."""
        self.read_raw(slots, buf)
        return self.verify(slots, hashes, buf)

    def _items(self, slots: Sequence[int], buf: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(offset, buffer) per run of consecutive slots, so a run is one I/O."""
        items = []
        i = 0
        n = len(slots)
        while i < n:
            j = i + 1
            while j < n and slots[j] == slots[j - 1] + 1:
                j += 1
            items.append((slots[i] * self.slot_bytes, buf[i:j].reshape(-1)))
            i = j
        return items

    def close(self) -> None:
        """Close and remove the cache file (clean shutdown)."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
            self.path.unlink(missing_ok=True)
        close = getattr(self.io, "close", None)
        if close is not None:
            close()
