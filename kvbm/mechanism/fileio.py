"""OS-level file operations of the disk tier (G3): aligned buffers, O_DIRECT, preallocation, slot I/O.

Operations:
  aligned_empty(nbytes)            a uint8 numpy array whose address and length are ALIGN-aligned
  round_up(n, align)               n rounded up to a multiple of align
  slot_runs(slots)                 index ranges of consecutive slot numbers
  open_cache_file(path, direct)    create a 0600 file, with O_DIRECT when asked (StorageError when refused)
  preallocate(fd, nbytes, zerofill)  fallocate, or write zeros when fallocate is unsupported and allowed
  probe_o_direct(dir) / probe_fallocate(dir)   whether the filesystem accepts them (for doctor and start-up)
  cache_file_name(rank) / stale_cache_files(dir) / remove_stale_cache_files(dir)
  PosixDiskIO                      batched positional reads/writes of whole slots on a thread pool
"""

from __future__ import annotations

import errno
import os
import re
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from kvbm.errors import StorageError

ALIGN = 4096
# Same prefix as Dynamo's KVBM so the seed's troubleshooting commands (ls/rm dynamo-kvbm-disk-cache-*) work.
CACHE_FILE_PREFIX = "dynamo-kvbm-disk-cache-"
_NAME_RE = re.compile(re.escape(CACHE_FILE_PREFIX) + r"(?P<host>[^-]+)-pid(?P<pid>\d+)-r(?P<rank>\d+)-[0-9a-f]+\.kvbm$")

SlotIO = tuple[int, np.ndarray]  # (file offset in bytes, uint8 buffer of whole slots)


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """[i, j) index ranges of `slots` whose values are consecutive (each range is one contiguous copy or I/O)."""
    runs, i, n = [], 0, len(slots)
    while i < n:
        j = i + 1
        while j < n and slots[j] == slots[j - 1] + 1:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def round_up(n: int, align: int = ALIGN) -> int:
    """`n` rounded up to a multiple of `align`."""
    return (n + align - 1) // align * align


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """A writable uint8 array of `nbytes` whose start address is a multiple of `align` (for O_DIRECT)."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes]


def cache_file_name(rank: int) -> str:
    """A visible, named cache file: prefix, host, pid and rank, so `ls` and `du` show whose it is."""
    host = socket.gethostname().replace("-", "_") or "host"
    return f"{CACHE_FILE_PREFIX}{host}-pid{os.getpid()}-r{rank}-{uuid.uuid4().hex[:8]}.kvbm"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_cache_files(directory: Path) -> list[Path]:
    """Cache files in `directory` left by processes of this host that are no longer running."""
    host = socket.gethostname().replace("-", "_") or "host"
    stale = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return []
    for path in entries:
        match = _NAME_RE.match(path.name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            stale.append(path)
    return sorted(stale)


def remove_stale_cache_files(directory: Path) -> list[Path]:
    """Remove the stale cache files of `directory`; returns the ones removed."""
    removed = []
    for path in stale_cache_files(directory):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def open_cache_file(path: Path, direct: bool) -> int:
    """Create `path` (mode 0600, must not exist) for reading and writing; O_DIRECT when `direct`."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if direct:
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            raise StorageError(
                f"{path.parent} refuses O_DIRECT (EINVAL; tmpfs and some network filesystems do); "
                "set DYN_KVBM_DISK_DISABLE_O_DIRECT=true or use a directory on a local disk"
            ) from None
        raise StorageError(f"cannot create disk cache file {path}: {exc.strerror}; check DYN_KVBM_DISK_CACHE_DIR") from None


def preallocate(fd: int, nbytes: int, zerofill: bool, path: Path | None = None) -> str:
    """Reserve `nbytes` for `fd`: fallocate, else zero-fill when allowed. Returns "fallocate" or "zerofill"."""
    where = path or f"fd {fd}"
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return "fallocate"
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError(
                f"no space for a {nbytes / 1e9:.2f} GB disk cache at {where}; free space or lower DYN_KVBM_DISK_CACHE_GB"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            raise StorageError(f"cannot preallocate the disk cache at {where}: {exc.strerror}") from None
        if not zerofill:
            raise StorageError(
                f"fallocate() is not supported for {where} ({exc.strerror}); "
                "set DYN_KVBM_DISK_ZEROFILL_FALLBACK=true to write zeros instead"
            ) from None
    chunk = aligned_empty(min(nbytes, 64 << 20) or ALIGN)
    chunk[:] = 0
    offset = 0
    try:
        while offset < nbytes:
            n = min(len(chunk), nbytes - offset)
            written = os.pwrite(fd, chunk[:round_up(n)] if n % ALIGN else chunk[:n], offset)
            offset += min(written, n)
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        raise StorageError(f"zero-filling the disk cache at {where} failed: {exc.strerror}") from None
    return "zerofill"


def probe_o_direct(directory: Path) -> str | None:
    """None when `directory` accepts an aligned O_DIRECT write and read, else the reason it does not."""
    path = Path(directory) / f".kvbm-odirect-probe-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        buf = aligned_empty(ALIGN)
        buf[:] = 7
        os.pwrite(fd, buf, 0)
        back = aligned_empty(ALIGN)
        os.preadv(fd, [back], 0)
        return None if bytes(back) == bytes(buf) else "O_DIRECT read returned other bytes"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def probe_fallocate(directory: Path) -> str | None:
    """None when `directory`'s filesystem supports fallocate(), else the reason."""
    path = Path(directory) / f".kvbm-fallocate-probe-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class PosixDiskIO:
    """Positional, vectored reads and writes spread over a small thread pool (lives in a worker).

    An item is (file offset, buffers): one uint8 array, or a list of buffers written/read back to back
    (pwritev/preadv, so pieces scattered in memory need no staging copy). With O_DIRECT every buffer must
    be ALIGN-aligned in address and length.
    """

    name = "posix"

    def __init__(self, num_threads: int = 4, chunk_bytes: int = 8 << 20):
        self.chunk_bytes = chunk_bytes  # a large single buffer is split so several requests are in flight
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="kvbm-disk")

    def write(self, fd: int, items: Sequence[SlotIO]) -> None:
        """Write every item; raises StorageError naming the first failure."""
        self._run(fd, items, write=True)

    def read(self, fd: int, items: Sequence[SlotIO]) -> None:
        """Read into every item; raises StorageError naming the first failure."""
        self._run(fd, items, write=False)

    def _run(self, fd: int, items: Sequence[SlotIO], write: bool) -> None:
        if not items:
            return
        fn = _pwritev_all if write else _preadv_all
        futures = []
        for off, bufs in items:
            if isinstance(bufs, np.ndarray):
                flat = bufs.reshape(-1)
                for start in range(0, len(flat), self.chunk_bytes):
                    futures.append(self._pool.submit(fn, fd, [flat[start:start + self.chunk_bytes]], off + start))
            else:
                for start in range(0, len(bufs), IOV_MAX):
                    part = bufs[start:start + IOV_MAX]
                    futures.append(self._pool.submit(fn, fd, part, off))
                    off += sum(memoryview(b).nbytes for b in part)
        errors = [f.exception() for f in futures]
        for exc in errors:
            if exc is not None:
                if isinstance(exc, StorageError):
                    raise exc
                raise StorageError(f"disk cache {'write' if write else 'read'} failed: {exc}") from None

    def close(self) -> None:
        """Stop the thread pool."""
        self._pool.shutdown(wait=True)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The part of `views` left after the first `n` bytes."""
    while views and n >= views[0].nbytes:
        n -= views[0].nbytes
        views = views[1:]
    if views and n:
        views = [views[0][n:]] + views[1:]
    return views


def _vectored_all(op, what: str, fd: int, bufs: Sequence, offset: int) -> None:
    """Repeat os.pwritev/os.preadv until every byte of `bufs` has moved (short transfers are legal)."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = op(fd, views, offset)
        if n <= 0:
            raise StorageError(f"short {what} at offset {offset}" + (" (file truncated?)" if what == "read" else ""))
        offset += n
        views = _advance(views, n)


def _pwritev_all(fd: int, bufs: Sequence, offset: int) -> None:
    _vectored_all(os.pwritev, "write", fd, bufs, offset)


def _preadv_all(fd: int, bufs: Sequence, offset: int) -> None:
    _vectored_all(os.preadv, "read", fd, bufs, offset)


def filesystem_of(directory: Path) -> tuple[str, str, str]:
    """(filesystem type, source device, mount point) of the mount holding `directory`, from mountinfo."""
    target = os.path.realpath(directory)
    best = ("unknown", "unknown", "/")
    best_len = -1
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split(" ")
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        after = line.split(" - ", 1)[1].split(" ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= best_len:
            best, best_len = (after[0], after[1] if len(after) > 1 else "", mount_point), len(mount_point)
    return best


def is_rotational(directory: Path) -> bool | None:
    """Whether the block device under `directory` spins (True), is solid state (False), or None when unknown
    (memory or network filesystems, overlay, no sysfs)."""
    st_dev = os.stat(directory).st_dev
    device = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    if not device.exists():
        return None
    device = device.resolve()
    for candidate in (device / "queue" / "rotational", device.parent / "queue" / "rotational"):
        try:
            return candidate.read_text().strip() == "1"
        except OSError:
            continue
    return None
