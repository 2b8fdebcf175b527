"""KV events: blocks entering and leaving kvbm's tiers, as plain data, for a KV-aware router.

The policy records an event where a block's presence in a tier changes for everyone who could match it:
stored when a store is committed (every rank reported it), removed when the block is evicted, found corrupt or
its tier is lost. Only kvbm.integrations turns them into an engine's event classes (vLLM's BlockStored /
BlockRemoved, with a medium per tier). Nothing is recorded unless a log is attached (the engine asked for
events), and the log is bounded: when nobody drains it, the oldest events go first and are counted.

A shared tier (G4) records its own events through the same log (`manager.events`, when not None):
`stored("G4", hashes)` once a block's value is in the store, `removed("G4", hashes)` when kvbm learns it is
gone; the vLLM integration publishes them with medium STORAGE, locality REMOTE.

Operations:
  TierEventLog.stored(tier, hashes) / removed(tier, hashes)   record (tier: "G2", "G3", "G4" or a Tier)
  TierEventLog.take()                                         the events since the last take, oldest first
  TierEventLog.dropped                                        blocks whose events were dropped (log full)
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable

log = logging.getLogger("kvbm.events")

DEFAULT_MAX_BLOCKS = 200_000  # about 50 engine steps of a busy engine; vLLM drains the log every step


class EventKind(enum.Enum):
    """What happened to the blocks."""

    STORED = "stored"
    REMOVED = "removed"


@dataclass(frozen=True)
class TierEvent:
    """Blocks (the engine's block hashes, in order) that entered or left one tier."""

    kind: EventKind
    tier: str  # "G2" host memory, "G3" local disk, "G4" shared store
    block_hashes: tuple[Hashable, ...]


def tier_name(tier) -> str:
    """"G2" for Tier.G2 or "G2"."""
    return str(getattr(tier, "value", tier))


class TierEventLog:
    """A bounded log of TierEvents. Consecutive events of one kind and tier are merged (order is kept)."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS):
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self.dropped = 0
        self._events: deque[tuple[EventKind, str, list]] = deque()
        self._num_blocks = 0

    def __len__(self) -> int:
        """Blocks recorded and not yet taken."""
        return self._num_blocks

    def stored(self, tier, block_hashes: Iterable[Hashable]) -> None:
        """These blocks are now in `tier` (their store was committed)."""
        self._record(EventKind.STORED, tier_name(tier), block_hashes)

    def removed(self, tier, block_hashes: Iterable[Hashable]) -> None:
        """These blocks are no longer in `tier`."""
        self._record(EventKind.REMOVED, tier_name(tier), block_hashes)

    def _record(self, kind: EventKind, tier: str, block_hashes: Iterable[Hashable]) -> None:
        hashes = list(block_hashes)
        if not hashes:
            return
        last = self._events[-1] if self._events else None
        if last is not None and last[0] is kind and last[1] == tier:
            last[2].extend(hashes)
        else:
            self._events.append((kind, tier, hashes))
        self._num_blocks += len(hashes)
        while self._num_blocks > self.max_blocks:
            self._drop_oldest(self._num_blocks - self.max_blocks)

    def _drop_oldest(self, excess: int) -> None:
        kind, tier, hashes = self._events[0]
        n = min(excess, len(hashes))
        del hashes[:n]
        if not hashes:
            self._events.popleft()
        self._num_blocks -= n
        if not self.dropped:
            log.warning("kvbm: the KV event log is full (%d blocks): nobody takes the events; dropping the oldest",
                        self.max_blocks)
        self.dropped += n

    def take(self) -> list[TierEvent]:
        """Every event recorded since the last take, oldest first; the log is then empty."""
        out = [TierEvent(kind, tier, tuple(hashes)) for kind, tier, hashes in self._events]
        self._events.clear()
        self._num_blocks = 0
        return out
