"""The leader's view of the shared tier (G4): which blocks the store holds, asked in batches, never waited on.

The leader (vLLM's scheduler process) holds no bytes: it only asks whether blocks exist. One store client per
tensor-parallel rank fingerprint (every rank must hold its shard for a block to be usable); a lookup is one
pipelined EXISTS batch per rank, and its answer is the blocks every rank holds. The integration builds it from
the fingerprints the workers report at start-up and hands it to the leader, which never imports this layer.

Operations:
  RemoteIndex.open(url, fingerprints, secret)   clients for the ranks' fingerprints (not probed: no warning here,
                                                the workers already said whether the store answers)
  lookup(hashes) -> Future[list[bool]]          per block: held by every rank's store (a hint)
  available                                     False while a store is known down (a background probe, at most
                                                once a second, finds it back)
  close()
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Hashable, Sequence

from kvbm.mechanism.remote import make_store
from kvbm.mechanism.remote.base import BlockStore


class RemoteIndex:
    """Batched, asynchronous existence checks against the shared tier. Lives in the leader's process."""

    def __init__(self, stores: Sequence[BlockStore], probe_every_s: float = 1.0):
        self.stores = list(stores)
        self.probe_every_s = probe_every_s
        self._last_probe = 0.0
        self._probing = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, fingerprints: Sequence[bytes], secret: bytes | str | None = None,
             timeout: float = 1.0) -> "RemoteIndex":
        """One client per rank fingerprint; ValueError for a URL no backend takes."""
        return cls([make_store(url, fp, secret, timeout=timeout, workers=1) for fp in fingerprints])

    def lookup(self, hashes: Sequence[Hashable]) -> "Future[list[bool]]":
        """Which blocks every rank's store holds now (one batch per rank, on the stores' threads)."""
        futures = [store.contains_many(hashes) for store in self.stores]
        if len(futures) == 1:
            return futures[0]
        out: Future = Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        def one_done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            answers = [f.result() for f in futures]
            out.set_result([all(col) for col in zip(*answers)])

        for f in futures:
            f.add_done_callback(one_done)
        return out

    @property
    def available(self) -> bool:
        """True unless a store is known down; then probe it in the background (at most once a second)."""
        if all(store.reachable for store in self.stores):
            return True
        now = time.monotonic()
        with self._lock:
            if self._probing or now - self._last_probe < self.probe_every_s:
                return False
            self._probing, self._last_probe = True, now

        def probe():
            try:
                for store in self.stores:
                    if not store.reachable:
                        store.ping()
            finally:
                self._probing = False

        threading.Thread(target=probe, name="kvbm-g4-probe", daemon=True).start()
        return False

    def stats(self) -> dict[str, int]:
        """The first rank's store counters (lookups, lookup hits, errors, reconnects)."""
        return self.stores[0].stats() if self.stores else {}

    def close(self) -> None:
        """Release the clients."""
        for store in self.stores:
            store.close()
