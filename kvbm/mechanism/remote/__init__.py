"""The shared tier (G4): KV blocks in a store several engine instances share (Redis, Redis Cluster, a directory).

Mechanism only (bytes and I/O): no vLLM, no policy. The leader decides what to look up, load and store; the
worker moves the bytes through a BlockStore, staging through G2.

Operations:
  open_store(url, fingerprint, secret, ...)  the backend for the URL's scheme, probed; None (one warning naming
                                             DYN_KVBM_REMOTE_URL) when the URL is bad or the store unreachable
  BlockStore                                 the abstract interface (base.py); RedisStore, FileStore
  redacted(url)                              the URL without its password, for every log line and message
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from kvbm.mechanism.remote.base import OVERHEAD, BlockStore, StoreStats, fingerprint_of, store_key
from kvbm.mechanism.remote.urls import redacted, scrub

log = logging.getLogger("kvbm.remote")

URL_VAR = "DYN_KVBM_REMOTE_URL"
URL_FORMS = "redis://[user:password@]host:port/db, rediss://... (TLS) or file:///shared/dir"

__all__ = ["BlockStore", "OVERHEAD", "StoreStats", "fingerprint_of", "open_store", "redacted", "store_key",
           "URL_VAR"]


def make_store(url: str, fingerprint: bytes, secret: bytes | str | None = None, *, block_bytes: int | None = None,
               cache_bytes: int | None = None, timeout: float = 1.0, workers: int = 2, **options) -> BlockStore:
    """The backend for `url`'s scheme, not probed; ValueError for an unknown scheme or malformed URL."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in ("redis", "rediss"):
        from kvbm.mechanism.remote.redis_store import RedisStore

        return RedisStore(url, fingerprint, secret=secret, block_bytes=block_bytes, timeout=timeout,
                          workers=workers, **options)
    if scheme == "file":
        from kvbm.mechanism.remote.file_store import FileStore

        return FileStore(url, fingerprint, secret=secret, block_bytes=block_bytes, cache_bytes=cache_bytes,
                         workers=workers, **options)
    raise ValueError(f"unknown scheme {scheme + '://' if scheme else '(none)'}")


def open_store(url: str | None, fingerprint: bytes, secret: bytes | str | None = None, *,
               block_bytes: int | None = None, cache_bytes: int | None = None, timeout: float = 1.0,
               workers: int = 2, var: str = URL_VAR, keep_if_unreachable: bool = False,
               **options) -> BlockStore | None:
    """Open and probe the shared store at `url`; None, after one warning naming `var`, when it cannot be used.

    block_bytes: the exact data size of a block (other sizes are misses); cache_bytes: the file:// size cap
    (DYN_KVBM_REMOTE_CACHE_GB x 10^9); timeout: seconds any one store operation may wait on the network.
    keep_if_unreachable: a well-formed store that does not answer now is returned anyway (after the same one
    warning), unreachable and backing off, so that it is used once it comes up; a bad URL or refused
    credentials still give None.
    """
    if not url:
        return None
    shown = redacted(url)
    try:
        store = make_store(url, fingerprint, secret, block_bytes=block_bytes, cache_bytes=cache_bytes,
                           timeout=timeout, workers=workers, **options)
    except ImportError as exc:
        log.warning("%s=%r needs the redis client (pip install redis): %s; serving goes on without the shared "
                    "tier (G4)", var, shown, exc)
        return None
    except (ValueError, OSError) as exc:
        log.warning("%s=%r cannot be used (%s); set it to %s. Serving goes on without the shared tier (G4)",
                    var, shown, scrub(str(exc), url), URL_FORMS)
        return None
    try:
        store._ping()
    except ValueError as exc:  # redis-py parses host and port on first use
        store.close()
        log.warning("%s=%r cannot be used (%s); set it to %s. Serving goes on without the shared tier (G4)",
                    var, shown, scrub(str(exc), url), URL_FORMS)
        return None
    except Exception as exc:
        why = scrub(f"{type(exc).__name__}: {exc}", url)
        refused = "auth" in type(exc).__name__.lower() or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc)
        if keep_if_unreachable and not refused:
            store._start_down()
            log.warning("%s=%r is unreachable (%s); serving goes on without the shared tier (G4) until it answers",
                        var, shown, why)
            return store
        store.close()
        log.warning("%s=%r is unreachable (%s); serving goes on without the shared tier (G4)", var, shown, why)
        return None
    if cache_bytes and store.scheme == "redis":
        log.info("DYN_KVBM_REMOTE_CACHE_GB does not apply to Redis: its memory is the server's maxmemory")
    if not store.secret:
        log.info("shared tier %s: DYN_KVBM_REMOTE_SECRET is not set, so values in it are trusted as they are "
                 "(anyone who can write to it can plant KV)", shown)
    else:
        log.info("shared tier %s: every value is authenticated with DYN_KVBM_REMOTE_SECRET (HMAC-SHA256)", shown)
    return store
