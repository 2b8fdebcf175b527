"""One tier's pool of fixed slots: hash -> slot, recency, pins, eviction. Pure Python, no bytes.

Operations:
  lookup(h) / __contains__     the slot of a stored (ready) block, or None
  can_allocate(n) / allocate(h)  check-then-commit: a new pending, pinned slot, evicting the least recent block
  commit(h) / abort(h)         a pending block becomes ready (and unpinned), or is dropped
  pin(h) / unpin(h)            a pinned block is never evicted (in-flight loads and stores)
  touch(h)                     mark most recently used
  remove(h)                    drop a ready, unpinned block (e.g. found corrupt)
  ready_hashes()               every ready block (pinned or not)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvbm.errors import KvbmError
from kvbm.policy.types import BlockHash, Tier


class PoolFullError(KvbmError):
    """allocate() was called when can_allocate() said no: every slot is pinned."""


@dataclass(frozen=True)
class Allocation:
    """Result of allocate(): the new block's slot, and the block evicted to free it (if any)."""

    block_hash: BlockHash
    slot: int
    evicted: BlockHash | None


class BlockPool:
    """Fixed-size slot pool of one tier. Lives in the leader (vLLM's scheduler process).

    A block is either pending (allocated, bytes in flight, pinned, not matchable) or ready. Ready blocks
    with no pins are evictable, in least-recently-used order.
    """

    def __init__(self, tier: Tier, num_slots: int):
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.tier = tier
        self.num_slots = num_slots
        # Slots never used are handed out by a counter (0, 1, 2, ...), so a pool of any size costs nothing
        # until it fills; slots given back go on the _free list and are reused first.
        self._fresh = 0
        self._free: list[int] = []
        self._slot: dict[BlockHash, int] = {}
        self._pending: set[BlockHash] = set()
        self._pins: dict[BlockHash, int] = {}
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()  # ready and unpinned, oldest first

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._slot and block_hash not in self._pending

    @property
    def num_free(self) -> int:
        """Slots holding no block."""
        return len(self._free) + self.num_slots - self._fresh

    @property
    def num_evictable(self) -> int:
        """Ready blocks with no pins."""
        return len(self._lru)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The slot of a ready block, else None. No side effects."""
        if block_hash in self._pending:
            return None
        return self._slot.get(block_hash)

    def holds(self, block_hash: BlockHash) -> bool:
        """True when the block is present, ready or pending."""
        return block_hash in self._slot

    def can_allocate(self, n: int = 1) -> bool:
        """True when `n` new blocks fit, counting evictable blocks."""
        return self.num_free + len(self._lru) >= n

    def allocate(self, block_hash: BlockHash) -> Allocation:
        """A pending, pinned slot for a new block; evicts the least recent ready block when none is free."""
        if block_hash in self._slot:
            raise KeyError(f"block {block_hash!r} is already in {self.tier.value}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        elif self._fresh < self.num_slots:
            slot, self._fresh = self._fresh, self._fresh + 1
        elif self._lru:
            evicted, _ = self._lru.popitem(last=False)
            slot = self._slot.pop(evicted)
        else:
            raise PoolFullError(f"{self.tier.value} pool is full: all {self.num_slots} slots are pinned")
        self._slot[block_hash] = slot
        self._pending.add(block_hash)
        self._pins[block_hash] = 1
        return Allocation(block_hash, slot, evicted)

    def commit(self, block_hash: BlockHash) -> None:
        """The pending block's bytes are in place: it becomes ready and drops the allocation pin."""
        self._pending.discard(block_hash)
        self.unpin(block_hash)

    def abort(self, block_hash: BlockHash) -> None:
        """Drop a pending block (its write failed); its slot becomes free."""
        if block_hash not in self._pending:
            return
        self._pending.discard(block_hash)
        self._pins.pop(block_hash, None)
        self._free.append(self._slot.pop(block_hash))

    def pin(self, block_hash: BlockHash) -> None:
        """Protect a present block from eviction until the matching unpin()."""
        if block_hash not in self._slot:
            raise KeyError(f"block {block_hash!r} is not in {self.tier.value}")
        self._pins[block_hash] = self._pins.get(block_hash, 0) + 1
        self._lru.pop(block_hash, None)

    def unpin(self, block_hash: BlockHash) -> None:
        """Release one pin; a ready block with no pins left becomes the most recently used evictable one."""
        count = self._pins.get(block_hash)
        if count is None:
            return
        if count > 1:
            self._pins[block_hash] = count - 1
            return
        del self._pins[block_hash]
        if block_hash in self._slot and block_hash not in self._pending:
            self._lru[block_hash] = None

    def touch(self, block_hash: BlockHash) -> None:
        """Mark a ready, unpinned block as most recently used."""
        if block_hash in self._lru:
            self._lru.move_to_end(block_hash)

    def remove(self, block_hash: BlockHash) -> bool:
        """Drop a ready, unpinned block; returns False when it is absent or pinned."""
        if block_hash not in self._lru:
            return False
        del self._lru[block_hash]
        self._free.append(self._slot.pop(block_hash))
        return True

    def ready_hashes(self) -> list[BlockHash]:
        """Every ready block, pinned or not (pending ones are not in the tier yet)."""
        return [h for h in self._slot if h not in self._pending]

    def check_invariants(self) -> None:
        """Raise AssertionError when internal state is inconsistent (used by the property tests)."""
        slots = list(self._slot.values())
        assert len(slots) == len(set(slots)), "a slot holds two blocks"
        assert not set(slots) & set(self._free), "a used slot is also free"
        assert all(s < self._fresh for s in list(slots) + self._free), "a slot handed out twice"
        assert len(slots) + self.num_free == self.num_slots, "slots lost or invented"
        assert all(0 <= s < self.num_slots for s in slots), "slot out of range"
        assert self._pending <= set(self._slot), "pending block without a slot"
        assert set(self._pins) <= set(self._slot), "pinned block without a slot"
        assert not set(self._lru) & set(self._pins), "a pinned block is evictable"
        ready_unpinned = {h for h in self._slot if h not in self._pending and h not in self._pins}
        assert set(self._lru) == ready_unpinned, "evictable set is wrong"
