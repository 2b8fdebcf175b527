"""The request lifecycle without vLLM: the leader and real workers (host tiers, disk files, transfer threads)
driven by a scripted scheduler (tests/scripted_engine.py) through random schedules of lookups, allocations,
steps, aborts (during a load, during a store), preemptions, resumptions, one and two ranks, duplicate plans,
duplicate and late reports, and a rank that loses its disk.

Invariants, checked at every step and once everything is drained: no pin leaks, no slot committed before
every rank wrote it, no request reported twice or after vLLM forgot it, every delayed request released,
every loaded block holding its own hash's KV on every rank (nothing matched that is not stored).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm.errors import KvbmError
from kvbm.leader import KvbmLeader, ReqState
from kvbm.policy import TierManager
from kvbm.protocol import Handshake, JobOutcome, StepPlan, WorkerReport
from kvbm.mechanism.transfer import JobResult
from kvbm.worker import KvbmWorker
from scripted_engine import BS, Faults, ScriptedEngine


class _Done:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

STEP = st.fixed_dictionaries({
    "add": st.integers(0, 2),
    "admit": st.integers(0, 2),
    "abort": st.sampled_from([None, None, None, "loading", "loading", "running", "finished", "any"]),
    "preempt": st.sampled_from([False, False, False, True]),
    "duplicate_plan": st.booleans(),
    "duplicate_report": st.booleans(),
    "late": st.integers(0, 3),
})


@pytest.fixture(autouse=True)
def _posix_io(monkeypatch):
    monkeypatch.setenv("KVBM_DISK_IO", "posix")  # the broken-disk fault rewires the file descriptor


def run_schedule(tmp_path, steps, world_size: int, break_disk_at: int | None = None, seed: int = 0, **kw):
    eng = ScriptedEngine(tmp_path, world_size=world_size, seed=seed, **kw)
    try:
        for i, s in enumerate(steps):
            for _ in range(s["add"]):
                eng.add_request()
            if s["abort"] is not None:
                pool = [r for r in eng.requests.values() if r.status != "FINISHED" and (
                    s["abort"] == "any"
                    or (s["abort"] == "loading" and r.status == "WAITING_FOR_REMOTE_KVS")
                    or (s["abort"] == "running" and r.status == "RUNNING")
                    or (s["abort"] == "finished" and eng.leader.state_of(r.req_id) is ReqState.RUNNING))]
                if pool:
                    eng.abort(eng.rng.choice(pool).req_id)
            if break_disk_at == i:
                eng.break_disk(world_size - 1)
            late = s["late"] if world_size > 1 else 0
            eng.step(admit=s["admit"], preempt=s["preempt"],
                     faults=Faults(s["duplicate_plan"], s["duplicate_report"], late_rank=1 if late else None,
                                   late_steps=late))
            time.sleep(0.001)  # the workers' transfer threads run beside the steps, as in an engine
        eng.drain()
        eng.check_quiescent()
        return eng
    finally:
        eng.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=5, max_size=40), seed=st.integers(0, 2**16))
def test_random_schedules_one_rank(tmp_path_factory, steps, seed):
    run_schedule(tmp_path_factory.mktemp("r1"), steps, world_size=1, seed=seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=5, max_size=40), seed=st.integers(0, 2**16),
       break_at=st.one_of(st.none(), st.integers(0, 20)))
def test_random_schedules_two_ranks(tmp_path_factory, steps, seed, break_at):
    run_schedule(tmp_path_factory.mktemp("r2"), steps, world_size=2, break_disk_at=break_at, seed=seed)


def test_the_scripted_engine_really_loads_from_host_and_disk_and_checks_the_bytes(tmp_path):
    """What the random suites rely on: offloads cascade to disk, and prefixes come back from G2 and from G3,
    byte-checked on both ranks. Two rounds over six prefixes (the second in reverse), each request run to
    completion."""
    eng = ScriptedEngine(tmp_path, world_size=2, seed=1, host_slots=8, num_prefixes=6)
    try:
        for order in (range(6), reversed(range(6))):  # the second round meets the newest prefixes in G2 first
            for p in order:
                req_id = eng.add_request()
                eng.requests[req_id].tokens = list(eng.prefixes[p]) + [1500 + p] * 3
                eng.requests[req_id].num_prompt = len(eng.requests[req_id].tokens)
                eng.requests[req_id].max_out = 1  # the prefixes alone cycle through G2 and G3
                eng.run_to_completion(req_id)
        eng.check_quiescent()
        policy = eng.leader.manager.stats
        assert policy.offloaded_to_disk > 0 and policy.onboarded_from_host > 0 and policy.onboarded_from_disk > 0
        assert eng.num_checked_loads >= 5
    finally:
        eng.close()


def test_abort_during_a_load_is_released_by_the_load_alone(tmp_path):
    """The engine-killing case: a request aborted while its onboard is in flight. The leader must not delay
    it (vLLM waits for the load's finished_recving), and no finished_sending may follow."""
    eng = ScriptedEngine(tmp_path, world_size=2, seed=3)
    try:
        first = eng.add_request()
        eng.requests[first].tokens = list(eng.prefixes[0]) + [1998] * BS
        eng.requests[first].num_prompt = len(eng.requests[first].tokens)
        eng.run_to_completion(first)
        # the same prompt again: its blocks come from G2; abort it while the load is in flight
        again = eng.add_request()
        eng.requests[again].tokens = list(eng.prefixes[0]) + [1999] * BS
        eng.requests[again].num_prompt = len(eng.requests[again].tokens)
        eng.step(admit=1, faults=Faults(late_rank=1, late_steps=3))  # rank 1 reports late
        assert eng.requests[again].status == "WAITING_FOR_REMOTE_KVS", "the prefix should be loading"
        assert eng.leader.state_of(again) is ReqState.WAITING_FOR_LOAD
        eng.abort(again)
        assert eng.requests[again].held_for_recv and not eng.requests[again].held_for_send
        assert eng.leader.stats.aborted_loads == 1
        eng.drain()
        eng.check_quiescent()
        assert again in eng.reported_recv and again not in eng.reported_send
        assert first not in eng.reported_recv
    finally:
        eng.close()


def test_the_invariant_checks_catch_a_double_report(tmp_path):
    """Negative control: the old rule (delay every request that had a job, loads included) reports an
    aborted load both as finished receiving and as finished sending; the scripted scheduler's assertions
    (vLLM's own) must catch it."""
    eng = ScriptedEngine(tmp_path, world_size=1, seed=3)
    original = eng.leader.request_finished

    def old_rule(req_id):
        req = eng.leader._reqs.get(req_id)
        if req is not None and req.state is ReqState.WAITING_FOR_LOAD:
            eng.leader._releases[req_id] = (req.load_job,)
            req.state = ReqState.FINISHED
            return True
        return original(req_id)

    eng.leader.request_finished = old_rule
    try:
        first = eng.add_request()
        eng.requests[first].tokens = list(eng.prefixes[0]) + [1998] * BS
        eng.requests[first].num_prompt = len(eng.requests[first].tokens)
        eng.run_to_completion(first)
        again = eng.add_request()
        eng.requests[again].tokens = list(eng.prefixes[0]) + [1999] * BS
        eng.requests[again].num_prompt = len(eng.requests[again].tokens)
        eng.step(admit=1)
        assert eng.requests[again].status == "WAITING_FOR_REMOTE_KVS"
        with pytest.raises(AssertionError, match="delayed by the connector while its load is pending"):
            eng.abort(again)
    finally:
        eng.close()


def test_preemption_fences_only_the_preempted_requests_jobs():
    leader = KvbmLeader(TierManager(8), block_size=BS, block_bytes=64)
    for req_id, hashes, blocks in (("a", ["a0", "a1"], [1, 2, 3]), ("b", ["b0", "b1"], [4, 5, 6])):
        leader.num_matched_tokens(req_id, hashes, 0, 2 * BS + 1)
        leader.on_alloc(req_id, hashes, blocks, 0)
        leader.on_scheduled(req_id, blocks, 2 * BS + 1, replace=True)
    stores = {spec.req_id: spec.job_id for spec in leader.build_step().stores}
    leader.on_preempted(["a"])
    plan = leader.build_step()
    assert plan.fences == {"a": (stores["a"],)}
    assert leader.state_of("a") is ReqState.PREEMPTED and leader.state_of("b") is ReqState.RUNNING
    # the fenced store still commits when it reports; the preempted request is no longer held by it
    leader.on_report(WorkerReport({stores["a"]: JobOutcome(frozenset({0}))}))
    assert len(leader.manager.match(["a0", "a1"])) == 2
    assert leader.request_finished("a") is False and leader.request_finished("b") is True


def test_the_fence_waits_for_its_jobs_and_not_for_a_slow_disk_write(tmp_path):
    """A preemption waits for the preempted request's store, not behind another request's disk write: the
    cascade is detached (its host slots are snapshotted) and written on the disk thread."""
    import threading

    import torch

    from kvbm.mechanism import DiskTier, HostTier, KVLayout, OffloadJob, TransferEngine
    from kvbm.protocol import BlockMove, SlotCopy

    caches = [torch.arange(8 * 512, dtype=torch.int64).view(8, 512) for _ in range(2)]
    layout = KVLayout.from_layers(caches, block_dim=0)
    host = HostTier.for_layout(layout, 4, pin=False)
    disk = DiskTier.create(tmp_path, 4, layout.block_bytes, layout.fingerprint(model="t"), direct=False)
    gate = threading.Event()
    write = disk.write_blocks
    disk.write_blocks = lambda *a, **k: (gate.wait(10), write(*a, **k))[1]  # a disk that stalls until told
    engine = TransferEngine(layout, host, disk)
    try:
        engine.submit_offload(OffloadJob("s0", [BlockMove("h1", 1, 0)]))
        engine.wait_jobs(["s0"], timeout=5)
        engine.submit_offload(OffloadJob("s1", [BlockMove("h2", 2, 0)], [SlotCopy("h1", 0, 0)], "c1"))
        engine.submit_offload(OffloadJob("s2", [BlockMove("h3", 3, 1)]))
        assert engine.wait_jobs(["s2"], timeout=5), "the fence waited behind a disk write"
        assert engine.is_open("c1") and not engine.is_open("s1")
        assert torch.equal(host.read_slot(0).view(-1), torch.cat([c[2] for c in caches]))  # s1 overwrote slot 0
        gate.set()
        assert engine.wait_jobs(["c1"], timeout=5)
        results = {r.job_id: r for r in engine.get_finished()}
        assert results["c1"].ok and results["c1"].blocks == {"g2_g3": 1}
        out = torch.zeros(2, 512, dtype=torch.int64)
        views = [memoryview(out[i].numpy()).cast("B") for i in range(2)]
        assert disk.read_blocks([0], ["h1"], [views]) == [0]
        assert torch.equal(out, torch.stack([c[1] for c in caches])), "the disk holds the block as it was"
    finally:
        gate.set()
        engine.close()


def test_a_store_job_is_complete_only_when_every_rank_reported_it():
    leader = KvbmLeader(TierManager(4), block_size=BS, block_bytes=64, world_size=2)
    leader.num_matched_tokens("r", ["h0", "h1"], 0, 2 * BS + 1)
    leader.on_alloc("r", ["h0", "h1"], [1, 2, 3], 0)
    leader.on_scheduled("r", [1, 2, 3], 2 * BS + 1, replace=True)
    (spec,) = leader.build_step().stores
    rank0 = WorkerReport({spec.job_id: JobOutcome(frozenset({0}))})
    leader.on_report(rank0)
    leader.on_report(rank0)  # a duplicate of rank 0's report is not rank 1's
    assert leader.manager.match(["h0"]) == [] and leader.jobs_in_flight == 1
    leader.on_report(WorkerReport({spec.job_id: JobOutcome(frozenset({1}))}))
    assert len(leader.manager.match(["h0", "h1"])) == 2 and leader.jobs_in_flight == 0
    leader.on_report(WorkerReport({spec.job_id: JobOutcome(frozenset({1}))}))  # late: changes nothing
    assert len(leader.manager.match(["h0", "h1"])) == 2
    leader.manager.host.check_invariants()
    assert not leader.manager.host._pins


def test_unexpected_call_orders_are_misses_never_loads_into_unmatched_blocks(tmp_path):
    leader = KvbmLeader(TierManager(4), block_size=BS, block_bytes=64)
    # external tokens allocated with no lookup before: nothing moves, every block is recomputed
    result = leader.on_alloc("x", ["h0", "h1"], [5, 6, 7], 2 * BS)
    plan = leader.build_step()
    (load,) = plan.loads
    assert load.moves == [] and set(load.unavailable_block_ids) == {5, 6, 7} == set(result.unavailable_block_ids)
    assert leader.stats.unexpected_calls == 1
    # a request the leader never saw: no stores planned, finishing it holds nothing
    leader.on_scheduled("ghost", [1, 2], 2 * BS)
    assert leader.build_step().stores == [] and leader.request_finished("ghost") is False


def test_a_plan_before_the_caches_are_registered_fails_its_load_and_still_reports_it():
    from kvbm.config import KvbmConfig
    from kvbm.protocol import BlockMove, LoadSpec, StoreSpec
    from kvbm.worker import KvbmWorker

    worker = KvbmWorker(KvbmConfig.from_env({}))
    plan = StepPlan(loads=[LoadSpec("r", "load:r:0", [BlockMove("h0", 3, 0)])],
                    stores=[StoreSpec("s", "store:s:1", [BlockMove("h9", 4, 1)], [])])
    worker.start_loads(plan)
    worker.start_stores(plan)
    out = worker.poll()
    assert out.finished_recving == {"r"} and out.failed_block_ids == {3}
    assert out.report.jobs["store:s:1"].failed_hashes == {"h9"}
    # a layer-wise (synchronous) load: vLLM never waits for it, so it is never reported as finished receiving
    worker.start_loads(StepPlan(loads=[LoadSpec("q", "load:q:2", [BlockMove("h1", 5, 0)], layerwise=True)]))
    out = worker.poll()
    assert not out.finished_recving and out.failed_block_ids == {5} and "load:q:2" in out.report.jobs


def test_handshake_mismatch_names_the_cause():
    leader = KvbmLeader(TierManager(100, 10), block_size=16, block_bytes=4096, world_size=2)
    good = Handshake(0, 2, 16, 4096, 100, 10)
    leader.check_handshake({0: good, 1: Handshake(1, 2, 16, 4096, 100, 10)})
    with pytest.raises(KvbmError, match=r"rank 1 has host \(G2\) slots 90 but the leader has 100; give every process the same DYN_KVBM_CPU_CACHE_GB"):
        leader.check_handshake({0: good, 1: Handshake(1, 2, 16, 4096, 90, 10)})
    with pytest.raises(KvbmError, match=r"expects 2 workers .* heard from ranks \[0\]"):
        leader.check_handshake({0: good})
    leader.check_handshake({0: good, 1: Handshake(1, 2, 16, 4096, 100, 10, disk_error="no space")})
    assert leader.disk_lost == "rank 1: no space" and leader.manager.disk is None


# ---- layer-wise loads (GPU engines): the request runs in the step that loads it ------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=5, max_size=40), seed=st.integers(0, 2**16), ranks=st.sampled_from([1, 2]))
def test_random_schedules_with_layerwise_loads(tmp_path_factory, steps, seed, ranks):
    """The same invariants when host hits load within the step that runs the request (vLLM's synchronous
    load: get_num_new_matched_tokens answers (n, False)), disk hits still asynchronously."""
    run_schedule(tmp_path_factory.mktemp("lw"), steps, world_size=ranks, seed=seed, layerwise_min_blocks=1)


def _layerwise_round(tmp_path, **kw):
    eng = ScriptedEngine(tmp_path, world_size=2, seed=1, host_slots=16, disk_slots=0, num_prefixes=3,
                         layerwise_min_blocks=1, **kw)
    for _ in range(2):
        for p in range(3):
            req_id = eng.add_request()
            eng.requests[req_id].tokens = list(eng.prefixes[p]) + [1500 + p] * 3
            eng.requests[req_id].num_prompt = len(eng.requests[req_id].tokens)
            eng.run_to_completion(req_id)
    return eng


def test_a_layerwise_load_runs_the_request_in_the_same_step_and_releases_its_pins(tmp_path):
    eng = _layerwise_round(tmp_path)
    try:
        assert eng.num_sync_loads >= 3 and eng.leader.manager.stats.onboarded_from_host >= 3
        eng.check_quiescent()  # the load jobs reported by both ranks: no pins left
    finally:
        eng.close()


def test_the_layerwise_check_catches_a_load_that_is_not_in_place_before_the_forward(tmp_path, monkeypatch):
    """Negative control: a worker whose layer-wise load is not in place when the forward runs (it reports the
    job but never copied the bytes) leaves the request reading blocks without its KV; the engine sees it."""
    def not_in_place(self, spec):  # the copy has not happened when the forward runs
        self._lw_open[spec.job_id] = (_Done(), JobResult(spec.job_id, "onboard"), 0.0)

    monkeypatch.setattr(KvbmWorker, "_start_layerwise_load", not_in_place)
    with pytest.raises(AssertionError, match="layer-wise block"):
        _layerwise_round(tmp_path)


# ---- what multi-round reuse needs: a finished request's last full block, a resumed request's output ----------

def _decode(eng: ScriptedEngine, req_id: str, steps: int) -> None:
    for _ in range(steps):
        eng.step(admit=1)
        time.sleep(0.001)


def test_every_block_whose_kv_was_computed_is_stored_up_to_the_last_full_one(tmp_path):
    """A multi-round client sends the answer back as the next prompt: every block the request filled, the last
    full one included (its last token's KV is computed when that token is fed back), must be in G2."""
    eng = ScriptedEngine(tmp_path, world_size=1, seed=5, num_blocks=40, host_slots=32, disk_slots=0)
    try:
        req_id = eng.add_request()
        req = eng.requests[req_id]
        req.tokens = list(eng.prefixes[0]) + [1500] * 5
        req.num_prompt, req.max_out = len(req.tokens), 3 * BS  # decodes across several block boundaries
        seen = []
        while req_id in eng.requests and eng.requests[req_id].status != "FINISHED":
            eng.step(admit=1)
            seen = (list(req.hashes), req.num_computed)
            time.sleep(0.001)
        eng.drain()
        hashes, computed = seen
        full = computed // BS
        assert full > len(eng.prefixes[0]) // BS + 1, "the request never filled a block while decoding"
        assert len(eng.leader.manager.match(hashes[:full])) == full, \
            f"{full} blocks had KV but only {len(eng.leader.manager.match(hashes[:full]))} are in G2"
    finally:
        eng.close()


def test_a_resumed_request_onboards_the_blocks_it_generated_before_preemption(tmp_path):
    """Preempted after decoding past a block boundary, a request comes back through a lookup over its prompt
    and its output: KVBM matches the generated blocks too, not only the prompt's."""
    eng = ScriptedEngine(tmp_path, world_size=1, seed=6, num_blocks=40, host_slots=32, disk_slots=0)
    try:
        req_id = eng.add_request()
        req = eng.requests[req_id]
        req.tokens = list(eng.prefixes[1]) + [1600] * 3
        req.num_prompt, req.max_out = len(req.tokens), 4 * BS
        prompt_blocks = len(req.tokens) // BS
        while req.num_computed < (prompt_blocks + 2) * BS:
            assert req_id in eng.requests and req.status != "FINISHED", (req.status, req.num_computed, len(req.tokens))
            eng.step(admit=1)
            time.sleep(0.001)
        preempted: set[str] = set()
        eng.preempt(req_id, preempted)
        eng.leader.on_preempted(preempted)
        for _ in range(50):  # the request waits (nothing admitted) while the stores of its blocks land
            eng.step(admit=0)
            time.sleep(0.002)
        n = eng.leader.num_matched_tokens(req_id, req.hashes, 0, len(req.tokens))
        assert n // BS > prompt_blocks, f"only {n // BS} blocks matched on resumption; the prompt has {prompt_blocks}"
        eng.leader._lookups.pop(req_id, None)
        eng.drain()
        eng.check_quiescent()
    finally:
        eng.close()
