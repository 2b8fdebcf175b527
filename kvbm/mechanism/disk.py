"""The disk tier (G3): one preallocated file per worker, whole-block slots with a verified trailer.

A slot holds one block's segments back to back, then a 64-byte trailer, padded to 4096 bytes:
  magic "KVBM" | version | xxh3-64 checksum of the data | 16-byte block identity | 16-byte layout fingerprint
The fingerprint names the model, dtype, geometry and block size that computed the block, so changed KV can
never be served; a checksum or identity mismatch is a load failure (the engine recomputes), never data.

Operations:
  DiskTier.create(dir, num_slots, block_bytes, fingerprint, rank, direct, zerofill, io)
  staging(n)                 an aligned (n, slot_words) buffer for whole slots
  accepts(pieces)            whether buffers can be used in place (O_DIRECT alignment)
  write_blocks(slots, hashes, pieces)  write each block from its pieces (pwritev), trailer sealed here
  read_blocks(slots, hashes, pieces)   read each slot into its pieces; the indices that verify
  close()                    close and remove the file
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from kvbm.errors import StorageError
from kvbm.mechanism import fileio, trailer
from kvbm.mechanism.trailer import MAGIC, TRAILER, VERSION, block_identity  # noqa: F401 (re-exported)

log = logging.getLogger("kvbm.disk")

TRAILER_BYTES = 64  # the trailer (TRAILER.size bytes) and its padding in a slot


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

    @property
    def tail_bytes(self) -> int:
        """Bytes after a block's data in its slot: the trailer and its padding."""
        return self.slot_bytes - self.block_bytes

    def accepts(self, pieces: Sequence) -> bool:
        """True when these buffers can be read or written in place (always, unless O_DIRECT needs alignment)."""
        if not self.direct:
            return True
        if self.block_bytes % fileio.ALIGN:
            return False
        for piece in pieces:
            arr = np.asarray(piece)
            if arr.ctypes.data % fileio.ALIGN or arr.nbytes % fileio.ALIGN:
                return False
        return True

    def _trailer(self, pieces: Sequence, block_hash: Hashable) -> np.ndarray:
        return np.frombuffer(trailer.pack(pieces, block_hash, self.fingerprint), dtype=np.uint8)

    def _vectors(self, slots: Sequence[int], pieces: Sequence[Sequence], tails: np.ndarray) -> list:
        """(offset, buffers) per run of consecutive slots: each block's pieces, then its trailer page."""
        items = []
        for i, j in fileio.slot_runs(slots):
            bufs = []
            for k in range(i, j):
                bufs.extend(pieces[k])
                bufs.append(tails[k])
            items.append((slots[i] * self.slot_bytes, bufs))
        return items

    def write_blocks(self, slots: Sequence[int], hashes: Sequence[Hashable], pieces: Sequence[Sequence],
                     in_place: bool | None = None) -> None:
        """Write each block (its pieces back to back, block_bytes in all) to its slot, with a sealed trailer.

        In place (pwritev straight from the pieces) when allowed, else through an aligned staging copy;
        `in_place` skips the alignment check when the caller knows the answer.
        """
        n = len(slots)
        if in_place is None:
            in_place = all(self.accepts(p) for p in pieces)
        if in_place:
            tails = fileio.aligned_empty(n * self.tail_bytes).reshape(n, self.tail_bytes)
            tails[:, TRAILER.size:] = 0
            for i, h in enumerate(hashes):
                tails[i, :TRAILER.size] = self._trailer(pieces[i], h)
            items = self._vectors(slots, pieces, tails)
        else:
            stage = self.staging(n)
            for i, h in enumerate(hashes):
                off = 0
                for piece in pieces[i]:
                    data = np.frombuffer(piece, dtype=np.uint8)
                    stage[i, off:off + data.size] = data
                    off += data.size
                stage[i, self.block_bytes:self.block_bytes + TRAILER.size] = self._trailer(pieces[i], h)
                stage[i, self.block_bytes + TRAILER.size:] = 0
            items = [(slots[i] * self.slot_bytes, stage[i:j].reshape(-1)) for i, j in fileio.slot_runs(slots)]
        self.io.write(self.fd, items)

    def read_slots(self, slots: Sequence[int], buf: np.ndarray) -> None:
        """Read whole slots into rows of the aligned staging `buf`, unverified (StorageError on failure)."""
        self.io.read(self.fd, [(slots[i] * self.slot_bytes, buf[i:j].reshape(-1)) for i, j in fileio.slot_runs(slots)])

    def verify(self, slots: Sequence[int], hashes: Sequence[Hashable], data: Sequence[Sequence],
               tails: np.ndarray) -> list[int]:
        """Indices whose trailer (in `tails` rows), identity, fingerprint and checksum over `data` match."""
        good = []
        for i, h in enumerate(hashes):
            magic, version, checksum, ident, fp = TRAILER.unpack_from(tails[i], 0)
            if magic != MAGIC or version != VERSION:
                log.warning("disk block in slot %d has no valid trailer; dropping it", slots[i])
            elif fp != self.fingerprint or ident != block_identity(h):
                log.warning("disk block in slot %d belongs to another block or model; dropping it", slots[i])
            elif self._checksum(data[i]) != checksum:
                log.warning("disk block in slot %d failed its checksum; dropping it (will be recomputed)", slots[i])
            else:
                good.append(i)
        return good

    def read_verified(self, slots: Sequence[int], hashes: Sequence[Hashable], buf: np.ndarray) -> list[int]:
        """Read slots into staging rows of `buf` and verify them; returns the rows that verify."""
        self.read_slots(slots, buf)
        n = len(slots)
        return self.verify(slots, hashes, [[buf[i, :self.block_bytes]] for i in range(n)], buf[:n, self.block_bytes:])

    def read_blocks(self, slots: Sequence[int], hashes: Sequence[Hashable], pieces: Sequence[Sequence],
                    in_place: bool | None = None) -> list[int]:
        """Read each slot into its block's pieces; returns the indices whose trailer and checksum verify.

        Read in place, the pieces of a block that fails verification hold unverified bytes that the caller
        must never use; through staging (unaligned pieces), failed blocks leave their pieces untouched.
        """
        n = len(slots)
        if in_place is None:
            in_place = all(self.accepts(p) for p in pieces)
        if not in_place:
            stage = self.staging(n)
            good = self.read_verified(slots, hashes, stage)
            for i in good:
                off = 0
                for piece in pieces[i]:
                    dst = np.frombuffer(piece, dtype=np.uint8)
                    dst[:] = stage[i, off:off + dst.size]
                    off += dst.size
            return good
        tails = fileio.aligned_empty(n * self.tail_bytes).reshape(n, self.tail_bytes)
        self.io.read(self.fd, self._vectors(slots, pieces, tails))
        return self.verify(slots, hashes, pieces, tails)

    @staticmethod
    def _checksum(pieces: Sequence) -> int:
        return trailer.checksum(pieces)

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
