"""Policy invariants, by example and by hypothesis: pools, pins, eviction, the disk filter, the cascade."""

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm.policy import AdmitAll, BlockPool, FrequencyFilter, PoolFullError, Tier, TierManager

import pytest


def test_pool_evicts_least_recent_and_spares_pinned():
    pool = BlockPool(Tier.G2, 2)
    for h in ("a", "b"):
        pool.allocate(h)
        pool.commit(h)
    pool.touch("a")            # b is now the least recent
    pool.pin("b")              # ... but pinned, so a goes
    alloc = pool.allocate("c")
    assert alloc.evicted == "a" and "a" not in pool and "b" in pool
    pool.commit("c")
    pool.pin("c")
    assert not pool.can_allocate()
    with pytest.raises(PoolFullError):
        pool.allocate("d")
    pool.check_invariants()


def test_pending_block_is_not_matchable_until_commit_and_abort_frees_it():
    pool = BlockPool(Tier.G2, 1)
    pool.allocate("x")
    assert pool.lookup("x") is None and "x" not in pool
    pool.abort("x")
    assert pool.num_free == 1
    pool.allocate("x")
    pool.commit("x")
    assert pool.lookup("x") == 0


def test_filter_doubles_on_hit_and_decays():
    now = [0.0]
    f = FrequencyFilter(decay_period_s=10, clock=lambda: now[0])
    assert f.frequency("h") == 1 and not f.admits("h")
    f.record_hit("h")
    assert f.frequency("h") == 2 and f.admits("h")
    f.record_hit("h")
    assert f.frequency("h") == 4
    now[0] = 25.0  # two decay steps
    assert f.frequency("h") == 2
    now[0] = 100.0
    assert f.frequency("h") == 1 and not f.admits("h")


def _fill(mgr, hashes):
    plan = mgr.prepare_offload(hashes)
    mgr.complete_offload(plan)
    return plan


def test_cascade_respects_filter_and_match_returns_longest_prefix():
    mgr = TierManager(host_slots=2, disk_slots=4)  # filter on: only blocks hit before reach disk
    _fill(mgr, ["a", "b"])
    mgr.record_hits(["a"])                       # a is hot, b is not
    plan = _fill(mgr, ["c", "d"])                # evicts a and b from host
    assert [c.block_hash for c in plan.cascades] == ["a"]
    assert mgr.stats.dropped_by_filter == 1
    assert [(l.block_hash, l.tier) for l in mgr.match(["a", "c", "d", "b"])] == [
        ("a", Tier.G3), ("c", Tier.G2), ("d", Tier.G2)]
    assert mgr.match(["b", "a"]) == []


def test_cascade_plan_reads_host_slot_before_store_reuses_it():
    mgr = TierManager(host_slots=1, disk_slots=1, disk_filter=AdmitAll())
    _fill(mgr, ["a"])
    plan = mgr.prepare_offload(["b"])
    assert plan.cascades[0].host_slot == plan.stores[0].slot == 0
    assert mgr.match(["a"]) == [] and mgr.match(["b"]) == []   # both pending
    mgr.complete_offload(plan)
    assert mgr.match(["a"])[0].tier is Tier.G3 and mgr.match(["b"])[0].tier is Tier.G2


def test_failed_onboard_drops_block_and_failed_offload_frees_slot():
    mgr = TierManager(host_slots=2, disk_slots=0)
    _fill(mgr, ["a", "b"])
    locs = mgr.prepare_onboard(["a", "b"])
    mgr.complete_onboard(locs, failed=["b"])
    assert [l.block_hash for l in mgr.match(["a", "b"])] == ["a"] and mgr.host.lookup("b") is None
    plan = mgr.prepare_offload(["c"])
    mgr.complete_offload(plan, failed=["c"])
    assert mgr.host.lookup("c") is None and mgr.stats.offload_failed == 1


def test_policy_imports_neither_torch_nor_os_io():
    code = ("import sys, kvbm.policy; bad = {'torch', 'numpy', 'nixl_cu13', 'kvbm.mechanism'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class PoolMachine(RuleBasedStateMachine):
    """Random allocate/commit/abort/pin/unpin/remove sequences against a 4-slot pool."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(Tier.G2, 4)
        self.pins: dict[str, int] = {}     # our own count of pins we took (beyond the allocation pin)
        self.pending: set[str] = set()
        self.ready: set[str] = set()

    @rule(h=st.sampled_from("abcdefgh"))
    def allocate(self, h):
        if self.pool.holds(h):
            return
        if not self.pool.can_allocate():
            with pytest.raises(PoolFullError):
                self.pool.allocate(h)
            return
        alloc = self.pool.allocate(h)
        if alloc.evicted is not None:
            assert alloc.evicted in self.ready and not self.pins.get(alloc.evicted)
            self.ready.discard(alloc.evicted)
        self.pending.add(h)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data, ok):
        h = data.draw(st.sampled_from(sorted(self.pending)))
        self.pending.discard(h)
        if ok:
            self.pool.commit(h)
            self.ready.add(h)
        else:
            self.pool.abort(h)

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def pin(self, data):
        h = data.draw(st.sampled_from(sorted(self.ready)))
        self.pool.pin(h)
        self.pins[h] = self.pins.get(h, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data):
        h = data.draw(st.sampled_from(sorted(k for k, v in self.pins.items() if v)))
        self.pool.unpin(h)
        self.pins[h] -= 1

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def remove(self, data):
        h = data.draw(st.sampled_from(sorted(self.ready)))
        removed = self.pool.remove(h)
        assert removed == (not self.pins.get(h))
        if removed:
            self.ready.discard(h)

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        assert len(self.pool) <= 4
        for h in self.ready:
            assert self.pool.lookup(h) is not None      # pinned or not, a stored block is found
        for h in self.pending:
            assert self.pool.lookup(h) is None          # never matched before its bytes are in place
        for h in "abcdefgh":
            if self.pool.lookup(h) is not None:
                assert h in self.ready                  # a lookup never returns a block that is not stored


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["offload", "onboard", "hit"]),
                              st.lists(st.integers(0, 15), min_size=1, max_size=6)), max_size=40),
       host=st.integers(1, 5), disk=st.integers(0, 5), fail=st.booleans())
def test_manager_random_workload_keeps_tiers_consistent(ops, host, disk, fail):
    mgr = TierManager(host_slots=host, disk_slots=disk, disk_filter=FrequencyFilter(decay_period_s=0))
    for op, hashes in ops:
        if op == "offload":
            plan = mgr.prepare_offload(hashes)
            mgr.complete_offload(plan, failed=hashes[:1] if fail else ())
        elif op == "onboard":
            locs = mgr.prepare_onboard(hashes)
            assert [l.block_hash for l in locs] == list(hashes[:len(locs)])
            mgr.complete_onboard(locs)
        else:
            mgr.record_hits(hashes)
        for pool in (mgr.host, mgr.disk):
            if pool is not None:
                pool.check_invariants()
                assert len(pool) <= pool.num_slots
                assert pool.num_evictable == len(pool)   # nothing left pinned between operations
