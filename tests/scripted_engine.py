"""A scripted engine: vLLM 0.32's scheduler contract with a KV connector, replayed without vLLM.

The leader (kvbm.leader) and one worker per rank (kvbm.worker, with real host tiers, disk files and transfer
threads) are driven the way vLLM's scheduler and model runner drive the connector (docs/vllm-0.32-connector-
notes.md): lookups, allocations, the step plan, preemption (blocks freed at once), aborts (vLLM's
finish_requests rules, WAITING_FOR_REMOTE_KVS included), the per-step worker order (fence, forward, loads,
stores, poll) and the per-rank aggregation of finished ids. Every KV page the forward writes holds a value
derived from (block hash, rank, layer), so a load can be checked byte for byte against what it must be.

The scheduler side asserts what vLLM asserts (a reported request must still exist) and more: a request is
reported once, a held block is never reused, a loaded block holds its hash's KV. Faults: duplicate plans,
duplicate and late reports, a rank whose disk tier breaks. With `remote_url` every rank opens the shared tier
(G4) as the connector does, and a lookup may answer None ("ask again later"): the request stays waiting.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvbm.config import KvbmConfig
from kvbm.leader import KvbmLeader
from kvbm.mechanism import KVLayout
from kvbm.policy import AdmitAll, Tier, TierManager
from kvbm.protocol import StepPlan, WorkerReport
from kvbm.worker import KvbmWorker

BS = 4  # tokens per block
LAYERS, HEADS, HEAD_DIM = 2, 1, 64  # a page: 4 tokens x 2*64 bf16 = 1 KiB; a block: 2 KiB


def kv_value(block_hash, rank: int, layer: int) -> int:
    """The int64 word every word of a block's page holds (distinct per hash, rank and layer)."""
    digest = hashlib.blake2b(repr((block_hash, rank, layer)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def chain_hashes(tokens: list[int], parent=None) -> list:
    """vLLM-style chained hash per full block."""
    out = []
    for i in range(len(tokens) // BS):
        parent = hashlib.sha256(repr((parent, tuple(tokens[i * BS:(i + 1) * BS]))).encode()).hexdigest()[:16]
        out.append(parent)
    return out


class RankCache:
    """One rank's engine KV cache (per-layer views over one buffer, as vLLM's CPU backend hands them)."""

    def __init__(self, num_blocks: int, rank: int):
        self.rank = rank
        buf = torch.zeros(LAYERS * num_blocks * HEADS * BS * 2 * HEAD_DIM, dtype=torch.bfloat16)
        per_layer = buf.view(LAYERS, num_blocks, HEADS, BS, 2 * HEAD_DIM)
        self.layers = {f"model.layers.{i}.self_attn.attn": per_layer[i] for i in range(LAYERS)}
        self.words = [t.view(torch.int64) for t in self.layers.values()]

    def write(self, block_id: int, block_hash) -> None:
        for layer, w in enumerate(self.words):
            w[block_id].fill_(kv_value(block_hash, self.rank, layer) if block_hash is not None else -1)

    def holds(self, block_id: int, block_hash) -> bool:
        return all(bool((w[block_id] == kv_value(block_hash, self.rank, layer)).all())
                   for layer, w in enumerate(self.words))


@dataclass
class Req:
    req_id: str
    tokens: list[int]
    num_prompt: int
    max_out: int
    status: str = "WAITING"  # WAITING | WAITING_FOR_REMOTE_KVS | RUNNING | FINISHED
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_preemptions: int = 0
    recv_done: bool = False
    ext_blocks: int = 0  # blocks the connector loads into [0, ext_blocks)
    held_for_recv: bool = False
    held_for_send: bool = False
    scheduled_before: bool = False
    resumed: bool = False

    live_hashes: list = field(default_factory=list)

    @property
    def hashes(self) -> list:
        """vLLM's request.block_hashes: one list, extended in place as tokens complete blocks (the connector
        keeps the reference it was given and sees it grow)."""
        full = chain_hashes(self.tokens)
        self.live_hashes.extend(full[len(self.live_hashes):])
        return self.live_hashes


@dataclass
class Faults:
    duplicate_plan: bool = False
    duplicate_report: bool = False
    late_rank: int | None = None  # this rank's outputs arrive `late_steps` late
    late_steps: int = 0


class ScriptedEngine:
    """vLLM's scheduler side plus `world_size` workers, one step at a time."""

    def __init__(self, tmp_path, world_size: int = 1, num_blocks: int = 24, host_slots: int = 8,
                 disk_slots: int = 16, seed: int = 0, num_prefixes: int = 4, layerwise_min_blocks: int | None = None,
                 remote_url: str | None = None, remote_secret: str | None = None, disk_filter=None,
                 model: str = "scripted"):
        self.rng = random.Random(seed)
        self.world_size = world_size
        self.num_blocks = num_blocks
        env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(host_slots), "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path),
               "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true"}
        if disk_slots:
            env["DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"] = str(disk_slots)
        if remote_url:
            env["DYN_KVBM_REMOTE_URL"] = remote_url
        if remote_secret:
            env["DYN_KVBM_REMOTE_SECRET"] = remote_secret
        config = KvbmConfig.from_env(env)
        self.caches = [RankCache(num_blocks, r) for r in range(world_size)]
        self.workers = []
        block_bytes = 0
        for r in range(world_size):
            w = KvbmWorker(config, rank=r, world_size=world_size, load_wait_s=0.0)
            layout = KVLayout.from_layers(self.caches[r].layers, block_dim=0)
            w.register(layout, host_slots, disk_slots, layout.fingerprint(model=model, extra=f"r{r}"))
            self.workers.append(w)
            block_bytes = layout.block_bytes
        self.leader = KvbmLeader(TierManager(host_slots, disk_slots, disk_filter or AdmitAll()), BS, block_bytes,
                                 world_size)
        self.leader.check_handshake({r: w.handshake(BS) for r, w in enumerate(self.workers)})
        if remote_url and self.leader.remote_fingerprints:  # what the connector does after the handshake
            from kvbm.mechanism.remote.index import RemoteIndex

            self.leader.remote = RemoteIndex.open(remote_url, self.leader.remote_fingerprints, remote_secret)
        self.num_ask_again = 0
        # the GPU engines' protocol: host hits of at least this many blocks load within the step that runs the
        # request (on CPU the worker moves them before the forward; the protocol is the same)
        self.leader.layerwise_min_blocks = layerwise_min_blocks
        self.sync_checks: list[tuple[str, int]] = []  # (request, loaded blocks) to check after this step's loads
        self.num_sync_loads = 0
        self.free = list(range(1, num_blocks))  # block 0 is vLLM's null block
        self.requests: dict[str, Req] = {}
        self.waiting: deque[str] = deque()
        self.finished_ids: set[str] = set()  # for the next scheduler output
        self.reported_recv: set[str] = set()
        self.reported_send: set[str] = set()
        self.late: deque = deque()  # (deliver at step, rank, PollResult)
        self.counts_recv: dict[str, set[int]] = {}
        self.counts_send: dict[str, set[int]] = {}
        self.step_no = 0
        self.num_loaded_blocks = 0
        self.num_checked_loads = 0
        self.num_aborted = 0
        self.num_preempted = 0
        self.disk_broken_rank: int | None = None
        self._ids = 0
        self.prefixes = [[self.rng.randrange(1000) for _ in range(BS * self.rng.randint(2, 4))]
                         for _ in range(num_prefixes)]

    # ---- the client's side ----------------------------------------------------------------------------------

    def add_request(self) -> str:
        self._ids += 1
        req_id = f"req-{self._ids}"
        tokens = list(self.rng.choice(self.prefixes)) + [self.rng.randrange(1000, 2000)
                                                        for _ in range(self.rng.randint(1, 2 * BS))]
        self.requests[req_id] = Req(req_id, tokens, len(tokens), max_out=self.rng.randint(1, 2 * BS))
        self.waiting.append(req_id)
        return req_id

    def abort(self, req_id: str) -> None:
        """vLLM's finish_requests: free now unless a receive is pending or the connector delays."""
        req = self.requests.get(req_id)
        if req is None or req.status == "FINISHED":
            return
        self.num_aborted += 1
        if req_id in self.waiting:
            self.waiting.remove(req_id)
        self._finish(req, waiting_for_recv=req.status == "WAITING_FOR_REMOTE_KVS" and not req.recv_done)

    def _finish(self, req: Req, waiting_for_recv: bool = False) -> None:
        req.status = "FINISHED"
        delay = self.leader.request_finished(req.req_id)
        self.finished_ids.add(req.req_id)
        req.held_for_recv, req.held_for_send = waiting_for_recv, delay
        assert not (waiting_for_recv and delay), f"{req.req_id}: delayed by the connector while its load is pending"
        if not (waiting_for_recv or delay):
            self._free(req)

    def _free(self, req: Req) -> None:
        self.free.extend(req.block_ids)
        req.block_ids = []
        del self.requests[req.req_id]

    # ---- the scheduler ------------------------------------------------------------------------------------

    def _alloc(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        out = [self.free.pop(self.rng.randrange(len(self.free))) for _ in range(n)]
        return out

    def preempt(self, req_id: str, preempted: set[str]) -> None:
        req = self.requests[req_id]
        self.free.extend(req.block_ids)
        req.block_ids, req.num_computed, req.status, req.recv_done = [], 0, "WAITING", False
        req.num_preemptions += 1
        req.resumed = True
        self.reported_recv.discard(req_id)  # a resumed request may load again (once per allocation)
        self.waiting.appendleft(req_id)
        preempted.add(req_id)
        self.num_preempted += 1

    def schedule(self, admit: int, preempt: bool):
        """One scheduler pass: returns (new, cached, num_scheduled, preempted, finished_ids)."""
        preempted: set[str] = set()
        scheduled: dict[str, int] = {}
        new, cached = [], []  # (req_id, block_ids, num_computed) / (req_id, new_block_ids, num_computed, resumed)
        running = [r for r in self.requests.values() if r.status == "RUNNING"]
        if preempt and running:
            self.preempt(self.rng.choice(running).req_id, preempted)
        for req in [r for r in self.requests.values() if r.status == "RUNNING"]:
            n = len(req.tokens) - req.num_computed
            need = -(-(req.num_computed + n) // BS) - len(req.block_ids)
            got = self._alloc(max(0, need))
            if got is None:
                self.preempt(req.req_id, preempted)
                continue
            req.block_ids += got
            scheduled[req.req_id] = n
            cached.append((req.req_id, got or None, req.num_computed, False))
        # requests whose load finished come back as waiting (vLLM promotes them), then are scheduled
        for req in [r for r in self.requests.values() if r.status == "WAITING_FOR_REMOTE_KVS" and r.recv_done]:
            self._check_loaded(req)
            req.status = "WAITING"
            self.waiting.appendleft(req.req_id)
        budget = admit
        for req_id in list(self.waiting):
            req = self.requests[req_id]
            if req.recv_done:  # loaded: allocate the rest, no new lookup (num_computed > 0)
                need = -(-len(req.tokens) // BS) - len(req.block_ids)
                got = self._alloc(max(0, need))
                if got is None:
                    continue
                req.block_ids += got
                self.leader.on_alloc(req_id, req.hashes, req.block_ids, 0)
            else:
                if budget <= 0:
                    continue
                budget -= 1
                hashes = req.hashes
                n_ext = self.leader.num_matched_tokens(req_id, hashes, 0, len(req.tokens))
                if n_ext is None:  # a G4 lookup in flight: vLLM skips the request and asks again next step
                    self.num_ask_again += 1
                    continue
                is_async = self.leader.load_is_async(req_id)
                assert not (is_async is False and n_ext == 0), "a layer-wise answer with nothing to load"
                got = self._alloc(-(-len(req.tokens) // BS))
                if got is None:
                    continue
                req.block_ids = got
                self.leader.on_alloc(req_id, hashes, req.block_ids, n_ext)
                if n_ext and not is_async:  # vLLM runs it now, its KV loaded within this step
                    req.num_computed = n_ext
                    self.sync_checks.append((req_id, n_ext // BS))
                    self.num_sync_loads += 1
                elif n_ext:
                    self.waiting.remove(req_id)
                    req.status, req.num_computed, req.ext_blocks = "WAITING_FOR_REMOTE_KVS", n_ext, n_ext // BS
                    continue
            self.waiting.remove(req_id)
            req.status, req.recv_done = "RUNNING", False
            n = len(req.tokens) - req.num_computed
            scheduled[req_id] = n
            if req.resumed:
                cached.append((req_id, list(req.block_ids), req.num_computed, True))
                req.resumed = False
            else:
                new.append((req_id, list(req.block_ids), req.num_computed))
        finished, self.finished_ids = self.finished_ids, set()
        return new, cached, scheduled, preempted, finished

    def _check_loaded(self, req: Req) -> None:
        """A finished load: every block KVBM loaded (not reported failed) holds its hash's KV on every rank."""
        n = req.num_computed // BS
        hashes = req.hashes
        for i in range(n):
            for cache in self.caches:
                assert cache.holds(req.block_ids[i], hashes[i]), \
                    f"{req.req_id}: block {i} (engine block {req.block_ids[i]}) holds wrong KV on rank {cache.rank}"
        self.num_loaded_blocks += n
        self.num_checked_loads += 1

    # ---- one engine step ----------------------------------------------------------------------------------

    def step(self, admit: int = 1, preempt: bool = False, faults: Faults = Faults()) -> StepPlan:
        self.step_no += 1
        new, cached, scheduled, preempted, finished = self.schedule(admit, preempt)
        # connector: build_connector_meta (preemptions first, then every scheduled request)
        self.leader.on_preempted(preempted)
        for req_id, block_ids, computed in new:
            self.leader.on_scheduled(req_id, block_ids, computed + scheduled[req_id], replace=True)
        for req_id, block_ids, computed, resumed in cached:
            self.leader.on_scheduled(req_id, block_ids, computed + scheduled[req_id], replace=resumed)
        plan = self.leader.build_step()
        if self.leader.disk_lost is not None:
            assert not any(m.tier is Tier.G3 for spec in plan.loads for m in spec.moves), "disk load after disk loss"
            assert not any(spec.cascades for spec in plan.stores), "disk write planned after disk loss"
        wire = pickle.dumps(plan)
        outputs = []
        for rank, worker in enumerate(self.workers):
            mine = pickle.loads(wire)
            worker.fence(mine)
            for req_id, n in scheduled.items():  # the forward writes the scheduled tokens' KV
                req = self.requests[req_id]
                hashes = req.hashes
                for i in range(req.num_computed // BS, -(-(req.num_computed + n) // BS)):
                    self.caches[rank].write(req.block_ids[i], hashes[i] if i < len(hashes) else None)
            worker.start_loads(mine)
            for req_id, n in self.sync_checks:  # a layer-wise load is in place before the forward reads it
                req = self.requests[req_id]
                bad = set(worker._load_errors)
                for i in range(n):
                    if req.block_ids[i] not in bad:
                        assert self.caches[rank].holds(req.block_ids[i], req.hashes[i]), \
                            f"{req_id}: layer-wise block {i} (engine block {req.block_ids[i]}) wrong on rank {rank}"
                self.num_loaded_blocks += n
            worker.start_stores(mine)
            if faults.duplicate_plan:
                again = pickle.loads(wire)
                worker.start_loads(again)
                worker.start_stores(again)
            result = worker.poll(finished)
            if faults.late_rank == rank and faults.late_steps:
                self.late.append((self.step_no + faults.late_steps, rank, result))
            else:
                outputs.append((rank, result))
        while self.late and self.late[0][0] <= self.step_no:
            _, rank, result = self.late.popleft()
            outputs.append((rank, result))
        self.sync_checks = []
        self._update_from_output(outputs, scheduled, faults)
        return plan

    def _update_from_output(self, outputs, scheduled: dict[str, int], faults: Faults) -> None:
        report = WorkerReport()
        recv, send, invalid = set(), set(), set()
        for rank, result in outputs:
            if result.report is not None:
                report = report.aggregate(result.report)
            invalid |= result.failed_block_ids
            for req_id in result.finished_recving:
                self.counts_recv.setdefault(req_id, set()).add(rank)
                if len(self.counts_recv[req_id]) == self.world_size:
                    recv.add(req_id)
                    del self.counts_recv[req_id]
            for req_id in result.finished_sending:
                self.counts_send.setdefault(req_id, set()).add(rank)
                if len(self.counts_send[req_id]) == self.world_size:
                    send.add(req_id)
                    del self.counts_send[req_id]
        self.leader.on_report(report)
        if faults.duplicate_report:
            self.leader.on_report(report)
        self.check_host_tier()
        for req in self.requests.values():  # invalid blocks truncate an async load's computed tokens
            if req.status in ("WAITING_FOR_REMOTE_KVS",) and invalid:
                for i, b in enumerate(req.block_ids[:req.ext_blocks]):
                    if b in invalid:
                        req.num_computed = min(req.num_computed, i * BS)
                        break
        for req_id, n in scheduled.items():
            req = self.requests.get(req_id)
            if req is None or req.status != "RUNNING":
                continue
            req.num_computed += n
            if req.num_computed >= req.num_prompt + req.max_out - 1 or len(req.tokens) >= BS * (self.num_blocks // 3):
                self._finish(req)
            else:
                req.tokens.append(hash((req.req_id, len(req.tokens))) % 1000)
        for req_id in recv:
            assert req_id not in self.reported_recv, f"{req_id} reported finished receiving twice"
            self.reported_recv.add(req_id)
            assert req_id in self.requests, f"{req_id} reported finished receiving after vLLM forgot it"
            req = self.requests[req_id]
            if req.status == "FINISHED":
                assert req.held_for_recv, f"{req_id}: finished receiving for a request that was not waiting"
                self._free(req)
            else:
                assert req.status == "WAITING_FOR_REMOTE_KVS", f"{req_id} finished receiving while {req.status}"
                req.recv_done = True
        for req_id in send:
            assert req_id not in self.reported_send, f"{req_id} reported finished sending twice"
            self.reported_send.add(req_id)
            assert req_id in self.requests, f"{req_id} reported finished sending after vLLM forgot it"
            req = self.requests[req_id]
            assert req.status == "FINISHED" and req.held_for_send, f"{req_id} finished sending but was not held"
            self._free(req)

    # ---- invariants ---------------------------------------------------------------------------------------

    def check_host_tier(self) -> None:
        """No slot committed before every rank wrote it: a ready host block holds its KV on every rank."""
        host = self.leader.manager.host
        for h in list(host._slot):
            slot = host.lookup(h)
            if slot is None:
                continue
            for rank, worker in enumerate(self.workers):
                data = worker.engine.host.read_slot(slot)
                for layer in range(LAYERS):
                    assert bool((data[layer] == kv_value(h, rank, layer)).all()), \
                        f"host slot {slot} is ready for {h} but rank {rank} holds other bytes"

    def run_to_completion(self, req_id: str, max_steps: int = 500) -> None:
        """Step (admitting) until the request is gone, then drain."""
        for _ in range(max_steps):
            if req_id not in self.requests:
                break
            self.step(admit=1)
            time.sleep(0.001)
        self.drain()

    def drain(self, max_steps: int = 400) -> None:
        """Finish every request and run steps until nothing is in flight anywhere."""
        for req_id in list(self.requests):
            self.abort(req_id)
        for _ in range(max_steps):
            if not self.requests and not self.leader.jobs_in_flight and not self.late:
                return
            self.step(admit=0)
            time.sleep(0.002)
        raise AssertionError(f"not quiescent: requests {[(r.req_id, r.status, r.held_for_recv, r.held_for_send) for r in self.requests.values()]}, "
                             f"{self.leader.jobs_in_flight} jobs in flight")

    def check_quiescent(self) -> None:
        """Nothing leaked: no pins, no pending slots, no request state, every block back in the free list."""
        for pool in (self.leader.manager.host, self.leader.manager.disk):
            if pool is None:
                continue
            pool.check_invariants()
            assert not pool._pins, f"{pool.tier.value} pins leaked: {len(pool._pins)}"
            assert not pool._pending, f"{pool.tier.value} pending slots leaked: {len(pool._pending)}"
        assert not any(self.leader.states().values()), self.leader.states()
        assert sorted(self.free) == list(range(1, self.num_blocks)), "engine blocks leaked"
        assert not self.counts_recv and not self.counts_send, "a rank's report never completed"

    def break_disk(self, rank: int) -> None:
        """Rank `rank`'s disk file turns read-only under it: its next disk write fails."""
        import os

        disk = self.workers[rank].engine.disk
        if disk is None:
            return
        fd = os.open(disk.path, os.O_RDONLY)
        os.dup2(fd, disk.fd)
        os.close(fd)
        self.disk_broken_rank = rank

    def close(self) -> None:
        for w in self.workers:
            w.close()
        if self.leader.remote is not None:
            self.leader.remote.close()
