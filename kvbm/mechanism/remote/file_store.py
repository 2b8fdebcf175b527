"""Shared tier on a shared directory (NFS, Lustre, GPFS, or a local disk several engines use): file:///path.

Layout: <root>/<fingerprint hex>/<block identity hex>.kvbm, one content-addressed file per block holding the
same value a Redis key would (data, trailer, tag; see base.py). A writer publishes a block atomically: it
writes a temporary file in the same folder (.<name>.<pid>.<random>.tmp), optionally fsyncs it, makes it
read-only and renames it into place, so a reader sees no file or the whole file, never a torn one; a block
already published is not written again. Files are never modified once published; a reader that opened a
file keeps reading it whole even if a writer removes it meanwhile (POSIX unlink semantics).

Size cap (DYN_KVBM_REMOTE_CACHE_GB): every writer keeps an estimate of the directory's size (its last scan
plus what it wrote since); when the estimate passes the cap, or `scan_interval_s` after its last scan, it
rescans the whole root and removes the oldest files (by mtime; a hit refreshes a file's mtime, so this is
least recently used) down to 90% of the cap. With several writers the directory may exceed the cap by what
the others wrote since this writer's last scan. Temporary files older than 10 minutes (a crashed writer's)
are removed by the same scan.

Operations: FileStore(url, fingerprint, cache_bytes=None, fsync=False, ...), then the BlockStore API;
enforce_cap() runs a scan now; usage() -> (files, bytes) under the root.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kvbm.mechanism.remote.base import BlockStore

log = logging.getLogger("kvbm.remote")

SUFFIX = ".kvbm"
STALE_TMP_S = 600.0
LOW_WATER = 0.9


def root_of(url: str) -> Path:
    """The directory of a file:// URL (file:///mnt/shared/kvbm -> /mnt/shared/kvbm)."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise ValueError(f"{url!r} is not a file:///absolute/path URL")
    return Path(unquote(parts.path))


class FileStore(BlockStore):
    """A BlockStore of one file per block in a shared directory."""

    scheme = "file"

    def __init__(self, url: str, fingerprint: bytes, *, secret: bytes | str | None = None,
                 block_bytes: int | None = None, workers: int = 2, cache_bytes: int | None = None,
                 fsync: bool = False, touch_on_hit: bool = True, scan_interval_s: float = 5.0,
                 backoff_s: tuple[float, float] = (0.1, 5.0)):
        super().__init__(url, fingerprint, secret=secret, block_bytes=block_bytes, workers=workers,
                         backoff_s=backoff_s)
        self.root = root_of(url)
        self.folder = self.root / self.fingerprint.hex()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes or None
        self.fsync = fsync
        self.touch_on_hit = touch_on_hit
        self.scan_interval_s = scan_interval_s
        self._scan_lock = threading.Lock()
        self._estimate = 0
        self._last_scan = 0.0
        if self.cache_bytes:
            self.enforce_cap()

    def path(self, key: str) -> Path:
        """The file of a store key."""
        return self.folder / (key.rsplit(":", 1)[1] + SUFFIX)

    # ------------------------------------------------------------------ hooks

    def _exists(self, keys: list[str]) -> list[bool]:
        return [os.path.exists(self.path(k)) for k in keys]

    def _get(self, keys: list[str]) -> list:
        out = []
        for k in keys:
            path = self.path(k)
            try:
                with open(path, "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    buf = bytearray(size)
                    view, got = memoryview(buf), 0
                    while got < size:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
                out.append(buf if got == size else None)
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError as exc:
                log.debug("shared tier %s: reading %s: %s", self.describe(), path.name, exc)
                out.append(None)
                continue
            if self.touch_on_hit:
                try:
                    os.utime(path)
                except OSError:
                    pass
        return out

    def _put(self, keys: list[str], values: list[list]) -> list[bool | None]:
        done = []
        written = 0
        for k, pieces in zip(keys, values):
            path = self.path(k)
            if os.path.exists(path):  # content-addressed and read-only once published
                done.append(None)
                continue
            ok, n = self._publish(path, pieces)
            done.append(ok)
            written += n
        if written:
            self._estimate += written
            if self.cache_bytes and (self._estimate > self.cache_bytes
                                     or time.monotonic() - self._last_scan > self.scan_interval_s):
                self.enforce_cap()
        return done

    def _publish(self, path: Path, pieces: list) -> tuple[bool, int]:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(48):012x}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the fingerprint folder was removed (by an operator): make it again
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            log.debug("shared tier %s: cannot create %s: %s", self.describe(), tmp.name, exc)
            return False, 0
        total = 0
        try:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view:
                    n = os.write(fd, view)
                    total += n
                    view = view[n:]
            if self.fsync:
                os.fsync(fd)
            os.fchmod(fd, 0o444)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
            return True, total
        except OSError as exc:
            log.debug("shared tier %s: cannot write %s: %s", self.describe(), path.name, exc)
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False, 0

    def _ping(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{self.folder} is not writable by this user")

    def _close(self) -> None:
        pass

    # ------------------------------------------------------------------ size cap

    def _entries(self) -> tuple[list[tuple[float, int, str]], int]:
        entries, now = [], time.time()
        stale = 0
        try:
            folders = [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return [], 0
        for folder in folders:
            try:
                it = list(os.scandir(folder))
            except OSError:
                continue
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                    entries.append((st.st_mtime, st.st_size, e.path))
                elif e.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_S:
                    try:
                        os.unlink(e.path)
                        stale += 1
                    except OSError:
                        pass
        return entries, stale

    def usage(self) -> tuple[int, int]:
        """(files, bytes) of published blocks under the root, every fingerprint."""
        entries, _ = self._entries()
        return len(entries), sum(e[1] for e in entries)

    def enforce_cap(self) -> int:
        """Scan the root and remove the oldest files down to 90% of the cap; returns how many it removed."""
        if not self.cache_bytes:
            return 0
        with self._scan_lock:
            entries, _ = self._entries()
            total = sum(e[1] for e in entries)
            removed = 0
            if total > self.cache_bytes:
                entries.sort()
                target = int(self.cache_bytes * LOW_WATER)
                for _, size, path in entries:
                    if total <= target:
                        break
                    try:
                        os.unlink(path)
                        removed += 1
                    except FileNotFoundError:  # another writer removed it
                        pass
                    except OSError:
                        continue
                    total -= size
            self._estimate = total
            self._last_scan = time.monotonic()
            self._count(evictions=removed)
            return removed
