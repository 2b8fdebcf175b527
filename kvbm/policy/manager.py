"""The leader's index of kvbm's tiers (G2 host, G3 disk): which blocks exist where, and every slot decision.

Operations (two-step plans, blocks pinned in between, as in vLLM's kv_offload manager):
  match(hashes)                        leading blocks stored in G2 or G3 (no side effects)
  prepare_onboard / complete_onboard   pin the matched blocks for a load; release them, dropping failed ones
  prepare_offload / complete_offload   G2 slots for new blocks, with G2 evictions cascading to G3 through the
                                       disk offload filter; commit or abort when the bytes have moved
                                       (complete_stores / complete_cascades: each part on its own)
  disable_disk()                       the disk tier is gone (on any rank): forget G3, plan no more disk work
  record_hits(hashes)                  cache hits the engine served itself (feed the disk offload filter)
  events                               a kvbm.events.TierEventLog (None: record nothing): blocks committed to
                                       a tier, evicted, found corrupt or lost with their tier
  prepare_remote_onboard / complete_remote_onboard
                                       host (G2) slots to stage shared-tier (G4) hits through; commit or drop
  prepare_remote_offload / complete_remote_offload
                                       ready host blocks the disk offload filter admits and G4 is not known
                                       to hold (write-once blocks stay local), pinned while they are written
  stats                                counters since start
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

from kvbm.events import TierEventLog
from kvbm.policy.filter import AdmitAll, FrequencyFilter
from kvbm.policy.pool import BlockPool
from kvbm.policy.types import BlockHash, Location, Tier
from kvbm.protocol import SlotCopy


# A block evicted from G2 that goes to G3 (copy host slot -> disk slot before the host slot is reused): the
# same value the workers execute, so the plan travels as it is.
Cascade = SlotCopy


@dataclass(frozen=True)
class OffloadPlan:
    """What one offload moves. Execute `cascades` first, then `stores` (engine block -> host slot)."""

    stores: tuple[Location, ...]
    cascades: tuple[Cascade, ...]
    num_skipped_present: int = 0
    num_skipped_full: int = 0

    @property
    def empty(self) -> bool:
        """True when nothing needs to move."""
        return not self.stores and not self.cascades


@dataclass
class PolicyStats:
    """Counters of the leader's decisions since start (blocks)."""

    offloaded_to_host: int = 0      # G1 -> G2 stores committed
    offloaded_to_disk: int = 0      # G2 -> G3 cascades committed
    offload_failed: int = 0
    skipped_full: int = 0           # host pool had no evictable slot ("target pool full")
    dropped_by_filter: int = 0      # evicted from G2, not admitted to G3
    dropped_no_disk: int = 0        # evicted from G2 with no disk tier
    evicted_from_disk: int = 0
    onboarded_from_host: int = 0
    onboarded_from_disk: int = 0
    onboard_failed: int = 0
    lookups: int = 0
    lookup_blocks: int = 0
    matched_blocks: int = 0
    matched_host: int = 0
    matched_disk: int = 0
    matched_remote: int = 0         # G4 hits planned for a load (staged through G2)
    onboarded_from_remote: int = 0  # G4 -> G2 -> G1 loads that arrived
    remote_load_failed: int = 0     # G4 loads that failed: missing, evicted, corrupt, bad MAC, store down
    remote_staging_full: int = 0    # G4 hits not loaded: no host slot to stage them through
    offloaded_to_remote: int = 0    # G2 -> G4 writes committed
    remote_offload_failed: int = 0


class TierManager:
    """Index of G2 and G3 for one engine. Lives in the leader (vLLM's scheduler process)."""

    def __init__(self, host_slots: int, disk_slots: int = 0, disk_filter: FrequencyFilter | AdmitAll | None = None):
        self.host = BlockPool(Tier.G2, host_slots)
        self.disk = BlockPool(Tier.G3, disk_slots) if disk_slots > 0 else None
        self.filter = disk_filter if disk_filter is not None else FrequencyFilter()
        self.stats = PolicyStats()
        self.events: TierEventLog | None = None  # attached when the engine publishes KV events
        # blocks G4 is believed to hold (written or found there): never written again while remembered. A hint
        # only: the store may evict any of them, which a later load finds out (a miss, recomputed)
        self.remote_known: OrderedDict[BlockHash, None] = OrderedDict()
        self.remote_known_max = 1 << 20
        # blocks whose G4 load failed (missing, corrupt, bad MAC): not offered again for a while, or vLLM, which
        # recomputes from the failed block, would look the request up again and be offered the same bad value
        self.remote_bad: OrderedDict[BlockHash, float] = OrderedDict()
        self.remote_bad_ttl_s = 60.0
        self._clock = time.monotonic

    # ---- lookups -------------------------------------------------------------------------------------------

    def locate(self, block_hash: BlockHash) -> Location | None:
        """Where a ready block lives, preferring host memory; None when in neither tier."""
        slot = self.host.lookup(block_hash)
        if slot is not None:
            return Location(block_hash, Tier.G2, slot)
        if self.disk is not None:
            slot = self.disk.lookup(block_hash)
            if slot is not None:
                return Location(block_hash, Tier.G3, slot)
        return None

    def match(self, hashes: Sequence[BlockHash]) -> list[Location]:
        """The longest leading run of `hashes` stored (ready) in G2 or G3, with each block's location."""
        found = []
        for h in hashes:
            loc = self.locate(h)
            if loc is None:
                break
            found.append(loc)
        return found

    # ---- onboarding ----------------------------------------------------------------------------------------

    def prepare_onboard(self, hashes: Sequence[BlockHash]) -> list[Location]:
        """Pin the leading stored blocks of `hashes` for a load; counts them as hits. Returns their locations."""
        locs = self.match(hashes)
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(hashes)
        self.stats.matched_blocks += len(locs)
        for loc in locs:
            pool = self.host if loc.tier is Tier.G2 else self.disk
            pool.pin(loc.block_hash)
            pool.touch(loc.block_hash)
            self.filter.record_hit(loc.block_hash)
            if loc.tier is Tier.G2:
                self.stats.matched_host += 1
            else:
                self.stats.matched_disk += 1
        return locs

    def complete_onboard(self, locations: Iterable[Location], failed: Iterable[BlockHash] = ()) -> None:
        """Unpin loaded blocks; blocks whose load failed (e.g. corrupt on disk) are dropped from their tier."""
        failed = set(failed)
        for loc in locations:
            pool = self.host if loc.tier is Tier.G2 else self.disk
            if pool is None:  # the disk tier was disabled while this load was in flight
                self.stats.onboard_failed += loc.block_hash in failed
                continue
            pool.unpin(loc.block_hash)
            if loc.block_hash in failed:
                if pool.remove(loc.block_hash) and self.events is not None:
                    self.events.removed(loc.tier, (loc.block_hash,))
                self.stats.onboard_failed += 1
            elif loc.tier is Tier.G2:
                self.stats.onboarded_from_host += 1
            else:
                self.stats.onboarded_from_disk += 1

    # ---- offloading ----------------------------------------------------------------------------------------

    def prepare_offload(self, hashes: Sequence[BlockHash]) -> OffloadPlan:
        """Host slots for the blocks of `hashes` not yet in G2 (pending and pinned until complete_offload)."""
        stores: list[Location] = []
        cascades: list[Cascade] = []
        present = full = 0
        for h in hashes:
            if self.host.holds(h):
                self.host.touch(h)
                present += 1
                continue
            if not self.host.can_allocate():
                full += 1
                continue
            alloc = self.host.allocate(h)
            stores.append(Location(h, Tier.G2, alloc.slot))
            if alloc.evicted is not None:
                if self.events is not None:
                    self.events.removed(Tier.G2, (alloc.evicted,))
                cascade = self._cascade(alloc.evicted, alloc.slot)
                if cascade is not None:
                    cascades.append(cascade)
        self.stats.skipped_full += full
        return OffloadPlan(tuple(stores), tuple(cascades), present, full)

    def _cascade(self, evicted: BlockHash, host_slot: int) -> Cascade | None:
        disk = self.disk
        if disk is None:
            self.stats.dropped_no_disk += 1
            return None
        if disk.holds(evicted):
            disk.touch(evicted)
            return None
        if not self.filter.admits(evicted):
            self.stats.dropped_by_filter += 1
            return None
        if not disk.can_allocate():
            return None
        alloc = disk.allocate(evicted)
        if alloc.evicted is not None:
            self.stats.evicted_from_disk += 1
            if self.events is not None:
                self.events.removed(Tier.G3, (alloc.evicted,))
        return Cascade(evicted, host_slot, alloc.slot)

    def complete_offload(self, plan: OffloadPlan, failed: Iterable[BlockHash] = ()) -> None:
        """Commit the plan's blocks whose bytes arrived; abort (free) those in `failed`."""
        failed = set(failed)
        self.complete_cascades(plan, failed)
        self.complete_stores(plan, failed)

    def complete_cascades(self, plan: OffloadPlan, failed: Iterable[BlockHash] = ()) -> None:
        """Commit the plan's G2 -> G3 copies that arrived; abort those in `failed`."""
        failed = set(failed)
        for c in plan.cascades:
            if self.disk is None:  # disabled meanwhile: nothing to commit into
                continue
            if c.block_hash in failed:
                self.disk.abort(c.block_hash)
                self.stats.offload_failed += 1
            else:
                self.disk.commit(c.block_hash)
                self.stats.offloaded_to_disk += 1
                if self.events is not None:
                    self.events.stored(Tier.G3, (c.block_hash,))

    def complete_stores(self, plan: OffloadPlan, failed: Iterable[BlockHash] = ()) -> None:
        """Commit the plan's engine -> G2 stores that arrived; abort those in `failed`."""
        failed = set(failed)
        for loc in plan.stores:
            if loc.block_hash in failed:
                self.host.abort(loc.block_hash)
                self.stats.offload_failed += 1
            else:
                self.host.commit(loc.block_hash)
                self.stats.offloaded_to_host += 1
                if self.events is not None:
                    self.events.stored(Tier.G2, (loc.block_hash,))

    def disable_disk(self) -> None:
        """Forget G3 and plan no more disk work: a rank lost its disk tier, and a block on disk is usable only
        when every rank holds its shard. Blocks pinned for an in-flight disk load fail in that load."""
        if self.disk is not None and self.events is not None:
            self.events.removed(Tier.G3, self.disk.ready_hashes())
        self.disk = None

    def record_hits(self, hashes: Iterable[BlockHash]) -> None:
        """Hits the engine served from its own cache: they raise the blocks' disk-filter frequency."""
        for h in hashes:
            self.filter.record_hit(h)

    # ---- the shared tier (G4), reached through G2 ------------------------------------------------------------

    def _know_remote(self, hashes: Iterable[BlockHash]) -> None:
        for h in hashes:
            self.remote_known[h] = None
            self.remote_known.move_to_end(h)
        while len(self.remote_known) > self.remote_known_max:
            self.remote_known.popitem(last=False)

    def prepare_remote_onboard(self, hashes: Sequence[BlockHash]) -> OffloadPlan:
        """Pending, pinned host slots to stage the leading G4 hits of `hashes` through (G4 -> G2 -> G1); stops
        at the first block already in G2 (pending) or with no slot to take. The host evictions cascade to G3
        through the disk offload filter, as for a store. The blocks count as hits (disk offload filter)."""
        stores: list[Location] = []
        cascades: list[Cascade] = []
        for h in hashes:
            if self.host.holds(h) or not self.host.can_allocate():
                self.stats.remote_staging_full += len(hashes) - len(stores)
                for rest in hashes[len(stores):]:  # recomputed now: not offered again at once (no re-lookup loop)
                    self.remote_bad[rest] = self._clock()
                break
            alloc = self.host.allocate(h)
            stores.append(Location(h, Tier.G4, alloc.slot))
            self.filter.record_hit(h)
            if alloc.evicted is not None:
                cascade = self._cascade(alloc.evicted, alloc.slot)
                if cascade is not None:
                    cascades.append(cascade)
        self.stats.matched_remote += len(stores)
        self._know_remote(loc.block_hash for loc in stores)
        return OffloadPlan(tuple(stores), tuple(cascades))

    def remote_usable(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `hashes` may be taken from G4: up to the first whose G4 load failed lately."""
        now = self._clock()
        while self.remote_bad and next(iter(self.remote_bad.values())) < now - self.remote_bad_ttl_s:
            self.remote_bad.popitem(last=False)
        for i, h in enumerate(hashes):
            if h in self.remote_bad:
                return i
        return len(hashes)

    def complete_remote_onboard(self, plan: OffloadPlan, failed: Iterable[BlockHash] = ()) -> None:
        """The staged G4 blocks that arrived are ready in G2; the failed ones (missing, evicted, corrupt, bad
        MAC, store down) free their slots and are forgotten as G4 blocks. (Cascades complete on their own.)"""
        failed = set(failed)
        for loc in plan.stores:
            if loc.block_hash in failed:
                self.host.abort(loc.block_hash)
                self.remote_known.pop(loc.block_hash, None)
                self.remote_bad[loc.block_hash] = self._clock()
                self.remote_bad.move_to_end(loc.block_hash)
                self.stats.remote_load_failed += 1
            else:
                self.host.commit(loc.block_hash)
                self.stats.onboarded_from_remote += 1
        while len(self.remote_bad) > self.remote_known_max:
            self.remote_bad.popitem(last=False)

    def prepare_remote_offload(self, hashes: Iterable[BlockHash]) -> list[Location]:
        """Ready host blocks of `hashes` to write to G4: those the disk offload filter admits (a block written
        once and never hit again stays local) and G4 is not known to hold. Pinned until complete_remote_offload."""
        out: list[Location] = []
        seen: set = set()
        for h in hashes:
            if h in seen or h in self.remote_known or not self.filter.admits(h):
                continue
            seen.add(h)
            slot = self.host.lookup(h)
            if slot is None:
                continue
            self.host.pin(h)
            out.append(Location(h, Tier.G2, slot))
        self._know_remote(loc.block_hash for loc in out)  # in flight: not planned twice
        return out

    def complete_remote_offload(self, locations: Iterable[Location], failed: Iterable[BlockHash] = ()) -> None:
        """Unpin the written blocks; a failed write is forgotten, so a later hit may write it again."""
        failed = set(failed)
        for loc in locations:
            self.host.unpin(loc.block_hash)
            if loc.block_hash in failed:
                self.remote_known.pop(loc.block_hash, None)
                self.stats.remote_offload_failed += 1
            else:
                self.stats.offloaded_to_remote += 1

    def usage(self) -> dict[Tier, tuple[int, int]]:
        """(blocks held, slots) per kvbm tier."""
        out = {Tier.G2: (len(self.host), self.host.num_slots)}
        if self.disk is not None:
            out[Tier.G3] = (len(self.disk), self.disk.num_slots)
        return out
