"""The shared-tier (G4) store interface: one abstract class, one file per backend (Redis, shared directory).

A store holds whole KV blocks of one fingerprint (model, dtype, layout, block size, tensor-parallel size and
rank) keyed by the engine's block hash. Every operation is batched and non-blocking: it returns a
concurrent.futures.Future that the store's own threads complete, and it never raises into the caller: a store
that is down, slow, full or holding a bad value gives misses and failed puts, counted in `stats()`.

A value is the block's bytes, then the disk tier's trailer (magic, version, xxh3-64, block identity,
fingerprint), then a 32-byte tag: HMAC-SHA256 of (key, data, trailer) under DYN_KVBM_REMOTE_SECRET, or zeros
without a secret. A value whose size, trailer, identity, fingerprint, checksum or (with a secret) MAC does not
match is a miss, never data.

Operations (BlockStore):
  contains_many(hashes)  -> Future[list[bool]]              which blocks the store has now (one pipeline)
  get_many(hashes)       -> Future[list[memoryview | None]] each block's verified bytes, or None (a miss)
  put_many(items)        -> Future[list[bool]]              store (hash, pieces) items; True where stored
  reachable              the last known health (never blocks); ping(): probe now
  stats()                counters: lookups, hits, misses, rejected, puts, put_failures, errors, bytes, ...
  close()                stop the threads and release connections

A backend implements five hooks that run on the store's threads and may raise: _exists, _get, _put (per-item
results), _ping, _close. A raised exception means the store is unreachable: the batch becomes misses, the store
backs off (0.1 s doubling to 5 s, no busy loop) and the next operation after the backoff tries again.
"""

from __future__ import annotations

import abc
import hmac
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Hashable, Sequence

from kvbm.mechanism import trailer
from kvbm.mechanism.trailer import TRAILER

log = logging.getLogger("kvbm.remote")

TAG_BYTES = 32
OVERHEAD = TRAILER.size + TAG_BYTES  # bytes a value carries beyond the block's data
_ZERO_TAG = bytes(TAG_BYTES)
KEY_PREFIX = "kvbm"


def store_key(fingerprint: bytes, block_hash: Hashable) -> str:
    """The store key of a block: kvbm:<fingerprint hex>:<block identity hex>."""
    return f"{KEY_PREFIX}:{fingerprint.hex()}:{trailer.block_identity(block_hash).hex()}"


def fingerprint_of(*, model: str, dtype: str, layout: str, block_size: int, tp_size: int, tp_rank: int) -> bytes:
    """16 bytes naming what computed a block, for callers without a KVLayout (which has fingerprint())."""
    import xxhash

    return xxhash.xxh3_128_digest(f"{model}|{dtype}|{layout}|{block_size}|tp{tp_rank}/{tp_size}".encode())


def _as_bytes_view(buf: Any) -> memoryview:
    view = memoryview(buf)
    if not view.contiguous:
        raise ValueError("a block piece must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


@dataclass
class StoreStats:
    """Counters of one store (a snapshot from stats())."""

    lookups: int = 0          # blocks asked by contains_many
    lookup_hits: int = 0      # of which the store had
    gets: int = 0             # blocks asked by get_many
    hits: int = 0             # verified values returned
    misses: int = 0           # absent, evicted, unreachable or rejected
    rejected: int = 0         # present but bad size / trailer / identity / fingerprint / checksum / MAC
    puts: int = 0             # blocks written (a block already in the store is not written again)
    put_failures: int = 0     # blocks not stored (full store, error, unreachable)
    errors: int = 0           # batches that failed on the store (connection, timeout, I/O)
    skipped: int = 0          # blocks not even tried: the store was backing off
    bytes_read: int = 0       # verified data bytes returned
    bytes_written: int = 0    # data bytes stored
    reconnects: int = 0       # times the store came back after being unreachable
    evictions: int = 0        # blocks this process removed to keep a size cap (file://)


class BlockStore(abc.ABC):
    """A shared KV block store of one fingerprint. Thread-safe; operations never raise (see module docstring)."""

    scheme: str = ""

    def __init__(self, url: str, fingerprint: bytes, *, secret: bytes | str | None = None,
                 block_bytes: int | None = None, workers: int = 2, backoff_s: tuple[float, float] = (0.1, 5.0)):
        if len(fingerprint) != 16:
            raise ValueError("a store fingerprint is 16 bytes (KVLayout.fingerprint())")
        self.url = url
        self.fingerprint = bytes(fingerprint)
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.block_bytes = block_bytes
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=f"kvbm-g4-{self.scheme}")
        self._lock = threading.Lock()
        self._stats = StoreStats()
        self._backoff_min, self._backoff_max = backoff_s
        self._backoff = self._backoff_min
        self._down_until = 0.0
        self._reachable = True
        self._puts_paused_until = 0.0
        self._closed = False

    # ------------------------------------------------------------------ public, non-blocking API

    def contains_many(self, hashes: Sequence[Hashable]) -> "Future[list[bool]]":
        """Which of these blocks the store holds now (a hint: a value may still be evicted before get_many)."""
        hashes = list(hashes)
        keys = [self.key(h) for h in hashes]

        def run() -> list[bool]:
            found = self._guarded(lambda: self._exists(keys), len(keys))
            found = [bool(x) for x in found] if found is not None else [False] * len(keys)
            self._count(lookups=len(keys), lookup_hits=sum(found))
            return found

        return self._submit(run, [False] * len(keys))

    def get_many(self, hashes: Sequence[Hashable]) -> "Future[list[memoryview | None]]":
        """Each block's data (a bytes-like view, block_bytes long) when present and verified, else None."""
        hashes = list(hashes)
        keys = [self.key(h) for h in hashes]

        def run() -> list[memoryview | None]:
            raw = self._guarded(lambda: self._get(keys), len(keys))
            if raw is None:
                self._count(gets=len(keys), misses=len(keys))
                return [None] * len(keys)
            out: list[memoryview | None] = []
            rejected = nbytes = 0
            for key, h, value in zip(keys, hashes, raw):
                data = None if value is None else self.open_value(key, h, value)
                if value is not None and data is None:
                    rejected += 1
                out.append(data)
                nbytes += 0 if data is None else len(data)
            hits = sum(d is not None for d in out)
            self._count(gets=len(keys), hits=hits, misses=len(keys) - hits, rejected=rejected, bytes_read=nbytes)
            return out

        return self._submit(run, [None] * len(keys))

    def put_many(self, items: Sequence[tuple[Hashable, Any]]) -> "Future[list[bool]]":
        """Store (block_hash, data) items; data is one buffer or a sequence of buffers taken back to back
        (numpy arrays, bytes, memoryviews; a torch tensor as tensor.numpy()). True where stored.

        The buffers must stay unchanged until the future is done."""
        items = list(items)

        def run() -> list[bool]:
            if time.monotonic() < self._puts_paused_until:
                self._count(put_failures=len(items), skipped=len(items))
                return [False] * len(items)
            keys, values, sizes = [], [], []
            for h, data in items:
                pieces = [data] if not isinstance(data, (list, tuple)) else list(data)
                pieces = [_as_bytes_view(p) for p in pieces]
                key = self.key(h)
                keys.append(key)
                values.append(pieces + [self.seal(key, h, pieces)])
                sizes.append(sum(p.nbytes for p in pieces))
            result = self._guarded(lambda: self._put(keys, values), len(keys))
            result = list(result) if result is not None else [False] * len(keys)
            done = [r is not False for r in result]  # None: already stored, nothing sent
            if result and not any(done):
                self._puts_paused_until = time.monotonic() + 1.0  # full store: do not resend blocks it refuses
            self._count(puts=sum(r is True for r in result), put_failures=len(done) - sum(done),
                        bytes_written=sum(s for s, r in zip(sizes, result) if r is True))
            return done

        return self._submit(run, [False] * len(items))

    @property
    def reachable(self) -> bool:
        """Whether the last operation reached the store (never blocks)."""
        return self._reachable

    def ping(self) -> bool:
        """Probe the store now (blocking, bounded by the store's timeout); updates `reachable`."""
        return self._guarded(lambda: (self._ping(), True)[1], 0, force=True) is not None

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (StoreStats fields)."""
        with self._lock:
            return asdict(self._stats)

    def describe(self) -> str:
        """The store's URL with its password masked."""
        from kvbm.mechanism.remote.urls import redacted

        return redacted(self.url)

    def close(self) -> None:
        """Wait for operations in flight, then release the backend."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        try:
            self._close()
        except Exception as exc:  # closing a dead connection
            log.debug("closing %s: %s", self.describe(), exc)

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ values

    def key(self, block_hash: Hashable) -> str:
        """The store key of a block of this store's fingerprint."""
        return store_key(self.fingerprint, block_hash)

    def _tag(self, key: str, parts: Sequence) -> bytes:
        mac = hmac.new(self.secret, key.encode(), "sha256")
        for p in parts:
            mac.update(p)
        return mac.digest()

    def seal(self, key: str, block_hash: Hashable, pieces: Sequence) -> bytes:
        """The trailer and tag that follow a block's data in its value."""
        tail = trailer.pack(pieces, block_hash, self.fingerprint)
        tag = self._tag(key, [*pieces, tail]) if self.secret else _ZERO_TAG
        return tail + tag

    def open_value(self, key: str, block_hash: Hashable, value) -> memoryview | None:
        """The verified data of a stored value, or None (logged at debug: bad values are a miss)."""
        view = memoryview(value)
        n = len(view) - OVERHEAD
        if n < 0 or (self.block_bytes is not None and n != self.block_bytes):
            return self._reject(key, f"size {len(view)} bytes")
        data, tail, tag = view[:n], view[n:n + TRAILER.size], view[n + TRAILER.size:]
        if self.secret and not hmac.compare_digest(self._tag(key, [view[:n + TRAILER.size]]), tag):
            return self._reject(key, "MAC mismatch (written without DYN_KVBM_REMOTE_SECRET, or altered)")
        why = trailer.check(tail, block_hash, self.fingerprint, trailer.checksum([data]))
        if why is not None:
            return self._reject(key, why)
        return data

    def _reject(self, key: str, why: str) -> None:
        log.debug("shared tier %s: value of %s rejected: %s", self.describe(), key, why)
        return None

    # ------------------------------------------------------------------ health, threads, counters

    def _submit(self, fn: Callable[[], Any], fallback: Any) -> Future:
        if self._closed:
            done: Future = Future()
            done.set_result(fallback)
            return done
        try:
            return self._pool.submit(self._never_raise, fn, fallback)
        except RuntimeError:  # closed meanwhile
            done = Future()
            done.set_result(fallback)
            return done

    def _never_raise(self, fn: Callable[[], Any], fallback: Any) -> Any:
        try:
            return fn()
        except Exception:
            log.exception("shared tier %s: unexpected error (counted as a miss)", self.describe())
            self._count(errors=1)
            return fallback

    def _guarded(self, op: Callable[[], Any], n: int, *, force: bool = False) -> Any:
        """Run a backend hook; None when the store is backing off or the hook raised (then back off)."""
        now = time.monotonic()
        if not force and now < self._down_until:
            self._count(skipped=n)
            return None
        try:
            result = op()
        except Exception as exc:
            self._failed(exc)
            return None
        if not self._reachable:
            with self._lock:
                was_down, self._reachable = not self._reachable, True
                self._backoff = self._backoff_min
                self._down_until = 0.0
                if was_down:
                    self._stats.reconnects += 1
            log.warning("shared tier %s is reachable again", self.describe())
        return result

    def _start_down(self) -> None:
        """Begin unreachable and backing off (opened while the store was down), without a second warning."""
        with self._lock:
            self._reachable = False
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff_max, self._backoff * 2)

    def _failed(self, exc: BaseException) -> None:
        from kvbm.mechanism.remote.urls import scrub

        with self._lock:
            first = self._reachable
            self._reachable = False
            self._stats.errors += 1
            delay = self._backoff * (0.5 + random.random() / 2)
            self._down_until = time.monotonic() + delay
            self._backoff = min(self._backoff_max, self._backoff * 2)
        if first:
            log.warning("shared tier %s unreachable (%s); serving goes on without it, retrying with backoff",
                        self.describe(), scrub(f"{type(exc).__name__}: {exc}", self.url))
        else:
            log.debug("shared tier %s still unreachable: %s", self.describe(), scrub(str(exc), self.url))
        try:
            self._on_failure(exc)
        except Exception:
            pass

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + d)

    # ------------------------------------------------------------------ backend hooks (store threads)

    @abc.abstractmethod
    def _exists(self, keys: list[str]) -> list[bool]:
        """Whether each key is present, in one round trip where the store allows."""

    @abc.abstractmethod
    def _get(self, keys: list[str]) -> list[Any]:
        """Each key's raw value (bytes-like) or None."""

    @abc.abstractmethod
    def _put(self, keys: list[str], values: list[list[memoryview | bytes]]) -> list[bool | None]:
        """Store each value (its buffers back to back): True stored, None already there (nothing sent), False
        failed; raises only when the store is unreachable."""

    @abc.abstractmethod
    def _ping(self) -> None:
        """Raise unless the store answers now."""

    def _on_failure(self, exc: BaseException) -> None:
        """Called after a hook raised (drop connections, for example)."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release connections and files."""
