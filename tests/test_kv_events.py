"""KV events without an engine: the leader's tier events replayed equal the tiers' contents after every step
(scripted engine: real leader, real workers and tier files), and the vLLM events built from them carry what
vLLM's own G1 BlockStored carries for the same blocks (vLLM's real Request, block hasher and BlockPool).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm.events import EventKind, TierEventLog
from kvbm.policy import Tier
from kvbm.protocol import BlockMove, StepPlan, StoreSpec
from scripted_engine import BS, Faults, ScriptedEngine


@pytest.fixture(autouse=True)
def _posix_io(monkeypatch):
    monkeypatch.setenv("KVBM_DISK_IO", "posix")  # the broken-disk fault rewires the file descriptor


# ---- the log ---------------------------------------------------------------------------------------------------

def test_the_log_keeps_order_merges_neighbours_and_drops_the_oldest_when_full():
    log = TierEventLog(max_blocks=5)
    log.stored(Tier.G2, ["a", "b"])
    log.stored("G2", ["c"])          # merged with the previous event (same kind and tier)
    log.removed(Tier.G2, ["a"])
    log.stored(Tier.G3, [])           # nothing: no event
    events = log.take()
    assert [(e.kind, e.tier, e.block_hashes) for e in events] == [
        (EventKind.STORED, "G2", ("a", "b", "c")), (EventKind.REMOVED, "G2", ("a",))]
    assert log.take() == [] and len(log) == 0
    log.stored(Tier.G2, [1, 2, 3, 4])
    log.removed(Tier.G2, [1, 2, 3])   # 7 blocks > 5: the two oldest go
    assert log.dropped == 2 and len(log) == 5
    assert [(e.kind, e.block_hashes) for e in log.take()] == [(EventKind.STORED, (3, 4)),
                                                               (EventKind.REMOVED, (1, 2, 3))]


# ---- the leader's events against its tiers -----------------------------------------------------------------------

class Replay:
    """Tier contents rebuilt from the events alone (what a router knows)."""

    def __init__(self):
        self.tiers: dict[str, set] = {"G2": set(), "G3": set()}
        self.removed = {"G2": 0, "G3": 0}
        self.stored = {"G2": 0, "G3": 0}
        self.without_removals: dict[str, set] = {"G2": set(), "G3": set()}

    def apply(self, events) -> None:
        for e in events:
            held = self.tiers[e.tier]
            for h in e.block_hashes:
                if e.kind is EventKind.STORED:
                    assert h not in held, f"{h} stored in {e.tier} twice without a removal"
                    held.add(h)
                    self.without_removals[e.tier].add(h)
                    self.stored[e.tier] += 1
                else:
                    assert h in held, f"{h} removed from {e.tier} but never stored there"
                    held.discard(h)
                    self.removed[e.tier] += 1

    def check(self, eng: ScriptedEngine) -> None:
        manager = eng.leader.manager
        assert self.tiers["G2"] == set(manager.host.ready_hashes())
        assert self.tiers["G3"] == (set(manager.disk.ready_hashes()) if manager.disk is not None else set())


def _engine(tmp_path, **kw) -> tuple[ScriptedEngine, Replay]:
    eng = ScriptedEngine(tmp_path, **kw)
    eng.leader.manager.events = TierEventLog()
    replay = Replay()
    step = eng.step

    def step_and_check(*args, **kwargs):
        plan = step(*args, **kwargs)
        replay.apply(eng.leader.manager.events.take())
        replay.check(eng)
        return plan

    eng.step = step_and_check
    return eng, replay


def test_events_replayed_after_every_step_equal_the_host_and_disk_tiers(tmp_path):
    """Two rounds over six prefixes through a tiny G2 (8 blocks): stores, G2 evictions cascading to G3, G3
    evictions, loads back from both tiers; two ranks (a store is committed only when both reported)."""
    eng, replay = _engine(tmp_path, world_size=2, seed=1, host_slots=8, disk_slots=10, num_prefixes=6)
    try:
        for order in (range(6), reversed(range(6)), range(6)):
            for p in order:
                req_id = eng.add_request()
                eng.requests[req_id].tokens = list(eng.prefixes[p]) + [1500 + p] * 3
                eng.requests[req_id].num_prompt = len(eng.requests[req_id].tokens)
                eng.requests[req_id].max_out = 1
                eng.run_to_completion(req_id)
        eng.check_quiescent()
        stats = eng.leader.manager.stats
        assert replay.stored["G2"] == stats.offloaded_to_host and replay.stored["G3"] == stats.offloaded_to_disk
        assert replay.removed["G2"] > 0 and replay.removed["G3"] > 0 and stats.onboarded_from_disk > 0
        assert replay.removed["G3"] == stats.evicted_from_disk
        # negative control: the removals carry information (ignoring them would claim blocks no tier holds)
        assert replay.without_removals["G2"] != set(eng.leader.manager.host.ready_hashes())
        assert replay.without_removals["G3"] != set(eng.leader.manager.disk.ready_hashes())
    finally:
        eng.close()


STEP = st.fixed_dictionaries({
    "add": st.integers(0, 2), "admit": st.integers(0, 2), "preempt": st.booleans(),
    "abort": st.sampled_from([None, None, "any"]), "late": st.integers(0, 2)})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=5, max_size=30), seed=st.integers(0, 2**16),
       break_at=st.one_of(st.none(), st.integers(0, 15)))
def test_random_schedules_with_aborts_preemptions_and_a_lost_disk(tmp_path_factory, steps, seed, break_at):
    eng, replay = _engine(tmp_path_factory.mktemp("ev"), world_size=2, seed=seed, host_slots=6, disk_slots=8)
    try:
        for i, s in enumerate(steps):
            for _ in range(s["add"]):
                eng.add_request()
            live = [r for r in eng.requests.values() if r.status != "FINISHED"]
            if s["abort"] and live:
                eng.abort(eng.rng.choice(live).req_id)
            if break_at == i:
                eng.break_disk(1)
            eng.step(admit=s["admit"], preempt=s["preempt"],
                     faults=Faults(late_rank=1 if s["late"] else None, late_steps=s["late"]))
            time.sleep(0.001)
        eng.drain()
        eng.check_quiescent()
        replay.apply(eng.leader.manager.events.take())
        replay.check(eng)
        if eng.leader.disk_lost is not None:
            assert not replay.tiers["G3"], "a lost disk tier's blocks were all announced removed"
    finally:
        eng.close()


def test_no_log_attached_records_nothing(tmp_path):
    eng = ScriptedEngine(tmp_path, world_size=1, seed=2, host_slots=4)
    try:
        for _ in range(4):
            eng.run_to_completion(eng.add_request())
        assert eng.leader.manager.events is None and eng.leader.manager.stats.offloaded_to_host > 0
    finally:
        eng.close()


# ---- vLLM's event classes: the same payload as vLLM's own G1 events --------------------------------------------

VBS = 16  # tokens per block


@pytest.fixture(scope="module")
def vllm_request():
    """A real vLLM Request of 5 full blocks and a partial one, hashed by vLLM's own block hasher."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    tokens = [(i * 7919) % 5000 + 3 for i in range(5 * VBS + 3)]
    req = Request("r1", tokens, SamplingParams(max_tokens=4), None, block_hasher=get_request_block_hasher(VBS, fn))
    assert len(req.block_hashes) == 5
    return req


def _g1_events(req, n_blocks: int):
    """What vLLM's own BlockPool publishes when the request's first n blocks become full (medium GPU)."""
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=VBS, enable_kv_cache_events=True)
    blocks = pool.get_new_blocks(n_blocks)
    pool.cache_full_blocks(req, blocks, 0, n_blocks, VBS, 0)
    return pool.take_events()


def _plan(req, positions) -> StepPlan:
    moves = [BlockMove(req.block_hashes[i], block_id=i + 1, slot=k) for k, i in enumerate(positions)]
    return StepPlan(stores=[StoreSpec(req.request_id, f"store:{req.request_id}:0", moves, [], None)])


def test_stored_on_the_host_carries_what_vllms_own_g1_event_carries(vllm_request):
    from kvbm.integrations.vllm.kv_events import KvEvents

    req = vllm_request
    (g1,) = _g1_events(req, 5)
    log = TierEventLog()
    ev = KvEvents(log, VBS)
    ev.track(req)
    ev.snapshot(_plan(req, range(5)))
    log.stored(Tier.G2, req.block_hashes[:5])
    (cpu,) = ev.take()
    assert type(cpu).__name__ == "BlockStored" and cpu.medium == "CPU" and cpu.locality == "LOCAL"
    for field in ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "lora_name",
                  "extra_keys", "group_idx"):
        assert getattr(cpu, field) == getattr(g1, field), field
    assert g1.medium == "GPU" and all(isinstance(h, int) for h in cpu.block_hashes)  # vLLM's int form by default


def test_a_chain_starting_mid_request_names_its_parent_and_a_gap_splits_it(vllm_request):
    from kvbm.integrations.vllm.kv_events import KvEvents

    req = vllm_request
    (g1,) = _g1_events(req, 5)
    log = TierEventLog()
    ev = KvEvents(log, VBS)
    ev.track(req)
    ev.snapshot(_plan(req, [1, 2, 4]))
    log.stored(Tier.G2, [req.block_hashes[i] for i in (1, 2, 4)])
    first, second = ev.take()
    assert first.block_hashes == g1.block_hashes[1:3] and first.parent_block_hash == g1.block_hashes[0]
    assert first.token_ids == g1.token_ids[VBS:3 * VBS]
    assert second.block_hashes == g1.block_hashes[4:5] and second.parent_block_hash == g1.block_hashes[3]
    assert second.token_ids == g1.token_ids[4 * VBS:5 * VBS]


def test_a_block_evicted_to_disk_is_removed_from_cpu_and_stored_on_storage_with_its_payload(vllm_request):
    """The cascade: G2 eviction (BlockRemoved CPU) in one step, the disk copy committed a step later (BlockStored
    STORAGE, full payload although the block was in no tier in between and the request is gone)."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    from kvbm.integrations.vllm.kv_events import KvEvents

    req = vllm_request
    (g1,) = _g1_events(req, 5)
    log = TierEventLog()
    ev = KvEvents(log, VBS)
    ev.track(req)
    ev.snapshot(_plan(req, [0, 1]))
    log.stored(Tier.G2, req.block_hashes[:2])
    ev.forget(req.request_id)
    ev.take()
    log.removed(Tier.G2, req.block_hashes[:1])
    removed, = ev.take()
    log.stored(Tier.G3, req.block_hashes[:1])
    stored, = ev.take()
    assert type(removed).__name__ == "BlockRemoved" and removed.medium == "CPU"
    assert removed.block_hashes == g1.block_hashes[:1]
    assert stored.medium == "STORAGE" and stored.locality == "LOCAL" and stored.block_hashes == g1.block_hashes[:1]
    assert stored.token_ids == g1.token_ids[:VBS] and stored.parent_block_hash is None
    # what vLLM's ZMQ publisher sends, decoded the way a subscriber decodes it
    wire = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=[removed, stored]))
    back = msgspec.msgpack.Decoder(type=KVEventBatch).decode(wire)
    assert back.events == [removed, stored]


def test_a_lost_payload_is_published_in_vllms_placeholder_shape(vllm_request):
    from kvbm.integrations.vllm.kv_events import KvEvents

    req = vllm_request
    log = TierEventLog()
    ev = KvEvents(log, VBS, max_unheld=1)
    ev.track(req)
    ev.snapshot(_plan(req, [0, 1]))  # two payloads in flight, room for one: the oldest is dropped
    log.stored(Tier.G2, req.block_hashes[:2])
    placeholder, full = ev.take()
    assert placeholder.token_ids == [] and placeholder.block_size == 0 and ev.num_placeholders == 1
    assert full.token_ids == list(req.all_token_ids[VBS:2 * VBS])


def test_events_are_on_only_when_vllm_publishes_them():
    from vllm.config import KVEventsConfig, VllmConfig

    from kvbm.integrations.vllm.kv_events import KvEvents

    assert not KvEvents.enabled(VllmConfig())
    assert not KvEvents.enabled(VllmConfig(kv_events_config=KVEventsConfig(enable_kv_cache_events=False,
                                                                           publisher="zmq")))
    assert KvEvents.enabled(VllmConfig(kv_events_config=KVEventsConfig(enable_kv_cache_events=True)))


def test_a_block_loaded_into_the_engine_gets_its_payload_and_g4_events_are_remote_storage(vllm_request):
    """A block kvbm never stored itself (staged from a shared tier) gets its payload from the load plan."""
    from kvbm.integrations.vllm.kv_events import KvEvents
    from kvbm.protocol import LoadSpec

    req = vllm_request
    (g1,) = _g1_events(req, 5)
    log = TierEventLog()
    ev = KvEvents(log, VBS)
    ev.track(req)
    moves = [BlockMove(req.block_hashes[i], block_id=i + 1, slot=i) for i in range(3)]
    ev.snapshot(StepPlan(loads=[LoadSpec(req.request_id, "load:r1:0", moves)]))
    log.stored("G4", req.block_hashes[:3])
    log.removed("G4", req.block_hashes[2:3])
    stored, removed = ev.take()
    assert (stored.medium, stored.locality, removed.medium, removed.locality) == ("STORAGE", "REMOTE",) * 2
    assert stored.block_hashes == g1.block_hashes[:3] and stored.token_ids == g1.token_ids[:3 * VBS]
    assert removed.block_hashes == g1.block_hashes[2:3]


@pytest.mark.parametrize("on", [True, False])
def test_the_real_connector_publishes_its_stores_only_when_vllm_publishes_events(vllm_request, monkeypatch, on):
    """vLLM's scheduler calls on the real connector (scheduler role, real VllmConfig): a prefill whose 5 full
    blocks kvbm stores, the workers' report, take_events. With events off (the negative control) kvbm stores
    the same blocks and publishes nothing."""
    from types import SimpleNamespace

    from vllm.config import KVEventsConfig, KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput

    from kvbm.integrations.vllm.connector import KvbmConnector, KvbmWorkerMetadata
    from kvbm.protocol import JobOutcome, WorkerReport
    from vllm_layouts import vllm_kv_caches

    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "8")
    monkeypatch.delenv("DYN_KVBM_CPU_CACHE_GB", raising=False)
    monkeypatch.delenv("DYN_KVBM_DISK_CACHE_GB", raising=False)
    kv_cache_config, _ = vllm_kv_caches("LBHNC", num_layers=2, num_blocks=12, block_size=VBS, num_kv_heads=1,
                                        head_size=64)
    cfg = VllmConfig(kv_transfer_config=KVTransferConfig(kv_connector="DynamoConnector", kv_role="kv_both",
                                                         kv_connector_module_path="kvbm.vllm_integration.connector"),
                     kv_events_config=KVEventsConfig(enable_kv_cache_events=on))
    conn = KvbmConnector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config)
    req = vllm_request
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    block_ids = list(range(1, 7))
    conn.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (block_ids,)), 0)
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [NewRequestData.from_request(req, (block_ids,))]
    out.num_scheduled_tokens = {req.request_id: req.num_tokens}
    plan = conn.build_connector_meta(out).plan
    (spec,) = plan.stores
    assert [m.block_hash for m in spec.stores] == req.block_hashes[:5]
    assert list(conn.take_events()) == []  # planned, not yet written
    report = WorkerReport({spec.job_id: JobOutcome(ranks=frozenset({0}))})
    conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=KvbmWorkerMetadata(report)))
    assert conn.leader.manager.stats.offloaded_to_host == 5
    events = list(conn.take_events())
    if not on:
        assert events == [] and conn.leader.manager.events is None
        return
    (g1,) = _g1_events(req, 5)
    (stored,) = events
    assert stored.medium == "CPU" and stored.block_hashes == g1.block_hashes and stored.token_ids == g1.token_ids
