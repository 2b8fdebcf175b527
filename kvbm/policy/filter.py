"""The disk offload filter: protects SSDs from blocks that are written once and never read again.

A block's frequency starts at 1, doubles on each cache hit and decays by 1 per decay period; it may go
from host memory to disk only when its frequency is >= 2 (Dynamo KVBM's rule). Pure Python.

Operations: record_hit(h), frequency(h), admits(h)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from kvbm.policy.types import BlockHash


class FrequencyFilter:
    """Frequency-based admission to the disk tier. Lives in the leader (scheduler process)."""

    def __init__(self, min_frequency: int = 2, decay_period_s: float = 60.0, max_entries: int = 1 << 20,
                 clock: Callable[[], float] = time.monotonic):
        self.min_frequency = min_frequency
        self.decay_period_s = decay_period_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[BlockHash, tuple[int, float]] = OrderedDict()  # hash -> (freq, since)

    def frequency(self, block_hash: BlockHash) -> int:
        """The block's current frequency: 1 when never hit (or decayed), doubled per hit, minus decay."""
        entry = self._entries.get(block_hash)
        if entry is None:
            return 1
        freq, since = entry
        steps = int((self._clock() - since) / self.decay_period_s) if self.decay_period_s > 0 else 0
        return max(1, freq - steps)

    def record_hit(self, block_hash: BlockHash) -> None:
        """A cache hit on the block (any tier): its frequency doubles."""
        freq = self.frequency(block_hash) * 2
        self._entries[block_hash] = (freq, self._clock())
        self._entries.move_to_end(block_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def admits(self, block_hash: BlockHash) -> bool:
        """True when the block may be written to disk."""
        return self.frequency(block_hash) >= self.min_frequency


class AdmitAll:
    """The filter turned off (DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER=true): every block may go to disk."""

    def record_hit(self, block_hash: BlockHash) -> None:
        """Nothing to record."""

    def admits(self, block_hash: BlockHash) -> bool:
        """Always True."""
        return True
