"""The leader: scheduler-side KVBM for one engine. Engine-agnostic; the vLLM connector maps its calls here.

Every request the leader knows is in one explicit state, and every decision reads it:

    lookup -> on_alloc, blocks to load ....... WAITING_FOR_LOAD --load reported by every rank--> RUNNING
    lookup -> on_alloc, nothing to load ...... RUNNING
    RUNNING --preempted--> PREEMPTED (its stores are fenced) --lookup -> on_alloc--> WAITING_FOR_LOAD | RUNNING
    request_finished, stores still reading its blocks --> FINISHED (vLLM holds the blocks: delay_free) --
        those stores reported by every rank --> forgotten
    request_finished otherwise --> forgotten at once (an aborted load is dropped when it reports)

Who frees the engine's blocks is decided here, once: `request_finished` answers delay_free=True only while a
store still reads them, and the next step plan tells the workers which store jobs to finish before they
report the request as finished sending. A request aborted while its load is in flight is never delayed: vLLM
itself waits for the load's "finished receiving" and frees the blocks then. A preempted request's blocks go
back to vLLM at once; the step plan fences exactly the jobs that still read them. A G2 -> G3 cascade is a job
of its own (`detach_cascades`): its host slots are snapshotted before the store overwrites them, so a disk
write never holds an engine block nor delays a free.

Operations:
  num_matched_tokens(req_id, hashes, computed, num_tokens)  tokens G2/G3 can supply (no side effects on tiers)
  on_alloc(req_id, hashes, block_ids, external)             pin and plan the load into the allocated blocks
  on_scheduled(req_id, block_ids, computed_after, replace)  plan stores of the blocks this step completes
  build_step(preempted)                                     the StepPlan for the workers (resets)
  on_report(report)                                         commit what every rank finished; disk losses
  request_finished(req_id) -> delay_free                    True only while a store reads the blocks
  check_handshake(handshakes)                               the workers' geometry agrees with the leader's
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from kvbm.errors import KvbmError
from kvbm.policy import Location, OffloadPlan, Tier, TierManager
from kvbm.protocol import BlockMove, Handshake, JobOutcome, LoadSpec, StepPlan, StoreSpec, WorkerReport

log = logging.getLogger("kvbm.leader")


class ReqState(enum.Enum):
    """Where a request stands, as the leader sees it."""

    WAITING_FOR_LOAD = "waiting_for_load"  # an onboard into its blocks is in flight; vLLM parks the request
    RUNNING = "running"
    PREEMPTED = "preempted"  # vLLM took its blocks back; it comes back through a lookup
    FINISHED = "finished"  # vLLM is done with it and holds its blocks until its stores finish


@dataclass
class _Request:
    req_id: str
    block_hashes: Sequence  # the engine's live list: grows as tokens are generated
    state: ReqState = ReqState.RUNNING
    block_ids: list[int] = field(default_factory=list)
    num_planned: int = 0  # leading blocks already handed to stores (or found present)
    load_job: str | None = None  # the onboard into the current blocks, until every rank reported it
    store_jobs: set[str] = field(default_factory=set)  # stores still reading the current blocks


@dataclass
class _Job:
    kind: str  # "load" | "store" | "cascade" | "offload" (a store with its cascades)
    req_id: str | None
    what: object  # list[Location] for a load, the OffloadPlan for a store or a cascade


@dataclass
class AllocResult:
    """What on_alloc planned: tokens coming from host and disk, block ids that must be recomputed."""

    host_tokens: int = 0
    disk_tokens: int = 0
    unavailable_block_ids: list[int] = field(default_factory=list)


@dataclass
class LeaderStats:
    """Counters the metrics exporter reads (the policy's own counters live in manager.stats)."""

    matched_tokens: int = 0
    offload_bytes: int = 0
    onboard_bytes: int = 0
    disk_bytes_written: int = 0
    disk_bytes_read: int = 0
    aborted_loads: int = 0  # requests finished (aborted) while their onboard was in flight
    delayed_frees: int = 0  # requests whose blocks vLLM held until their stores finished
    preemptions: int = 0
    fenced_jobs: int = 0  # jobs the workers waited for before reusing a preempted request's blocks
    unexpected_calls: int = 0  # engine calls out of the expected order, answered with a miss
    transfer_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))  # (kind, seconds)
    window: deque = field(default_factory=lambda: deque(maxlen=256))  # (looked-up, host hits, disk hits)


class KvbmLeader:
    """Scheduler-side KVBM. Lives in the engine's scheduler process; the only owner of the tier index."""

    def __init__(self, manager: TierManager, block_size: int, block_bytes: int, world_size: int = 1):
        self.manager = manager
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.world_size = world_size
        self.ranks = frozenset(range(world_size))
        self.detach_cascades = True
        # GPU engines: a host (G2) hit of at least this many blocks is onboarded layer by layer within the step
        # that runs the request (LoadSpec.layerwise); None = every load is asynchronous (CPU engines, disk hits).
        self.layerwise_min_blocks: int | None = None
        self.stats = LeaderStats()
        self.disk_lost: str | None = None
        self._reqs: dict[str, _Request] = {}
        # req_id -> (engine tokens, matched tokens, queried blocks, load layer-wise)
        self._lookups: dict[str, tuple[int, int, int, bool]] = {}
        self._loads: list[LoadSpec] = []
        self._stores: list[StoreSpec] = []
        self._fences: dict[str, tuple[str, ...]] = {}
        self._releases: dict[str, tuple[str, ...]] = {}
        self._jobs: dict[str, _Job] = {}  # in flight until every rank reported
        self._partial: dict[str, JobOutcome] = {}  # in-flight jobs some ranks reported
        self._ids = itertools.count()

    # ---- start-up --------------------------------------------------------------------------------------------

    def check_handshake(self, handshakes: Mapping[int, Handshake]) -> None:
        """Every rank reported, with the leader's geometry; raises KvbmError naming the first disagreement."""
        got = sorted(handshakes)
        if set(got) != set(self.ranks):
            raise KvbmError(f"kvbm: the leader expects {self.world_size} workers (ranks 0..{self.world_size - 1}) "
                            f"but heard from ranks {got}")
        host_slots = self.manager.host.num_slots
        disk_slots = self.manager.disk.num_slots if self.manager.disk is not None else 0
        for rank in got:
            h = handshakes[rank]
            for what, mine, theirs, fix in (
                    ("world size", self.world_size, h.world_size, "start every rank with the same parallel config"),
                    ("block size (tokens)", self.block_size, h.block_size, "use one --block-size for the engine"),
                    ("bytes per block", self.block_bytes, h.block_bytes, "this KV cache layout is not supported"),
                    ("host (G2) slots", host_slots, h.host_slots,
                     "give every process the same DYN_KVBM_CPU_CACHE_GB / _OVERRIDE_NUM_BLOCKS"),
                    ("disk (G3) slots", disk_slots, h.disk_slots,
                     "give every process the same DYN_KVBM_DISK_CACHE_GB / _OVERRIDE_NUM_BLOCKS")):
                if mine != theirs:
                    raise KvbmError(f"kvbm: worker rank {rank} has {what} {theirs} but the leader has {mine}; {fix}")
        for rank in got:
            if handshakes[rank].disk_error:
                self._lose_disk(rank, handshakes[rank].disk_error)

    # ---- lookups (no side effects on the tiers) ------------------------------------------------------------

    def num_matched_tokens(self, req_id: str, block_hashes: Sequence, num_computed_tokens: int,
                           num_tokens: int) -> int:
        """Tokens kvbm can load beyond the engine's `num_computed_tokens`, out of the request's `num_tokens`
        (prompt, plus generated tokens for a resumed request); at least one token is left to compute.
        Remembered for the allocation that follows (the last lookup counts)."""
        start = num_computed_tokens // self.block_size
        usable = max(0, (num_tokens - 1) // self.block_size)
        n = 0
        layerwise = False
        queried = max(0, min(usable, len(block_hashes)) - start)
        if queried:
            locs = self.manager.match(block_hashes[start:usable])
            n = len(locs) * self.block_size
            layerwise = (self.layerwise_min_blocks is not None and len(locs) >= self.layerwise_min_blocks
                         and all(loc.tier is Tier.G2 for loc in locs))
        self._lookups[req_id] = (num_computed_tokens, n, queried, layerwise)
        return n

    def load_is_async(self, req_id: str) -> bool:
        """How the last lookup's tokens load: False = layer-wise, in the step that runs the request (a GPU
        engine and a host hit long enough to pay); True = asynchronously, the request waits for the load."""
        lookup = self._lookups.get(req_id)
        return lookup is None or not lookup[3]

    # ---- planning ------------------------------------------------------------------------------------------

    def on_alloc(self, req_id: str, block_hashes: Sequence, block_ids: Sequence[int],
                 num_external_tokens: int) -> AllocResult:
        """Blocks were allocated for a request; plan its load. Returns where the loaded blocks come from and
        the block ids that cannot be loaded after all (the engine recomputes them)."""
        lookup = self._lookups.pop(req_id, None)
        req = self._reqs.get(req_id)
        if lookup is None:
            if req is not None and not num_external_tokens:  # a later allocation (e.g. once the load finished)
                req.block_ids = list(block_ids)
                return AllocResult()
            if num_external_tokens:  # nothing promised these tokens: never load into blocks on a guess
                return self._unexpected_alloc(req_id, block_hashes, block_ids, num_external_tokens)
            req = self._reqs[req_id] = _Request(req_id, block_hashes, block_ids=list(block_ids))
            return AllocResult()
        num_computed, num_matched, queried, layerwise = lookup
        start = num_computed // self.block_size
        if req is None or req.state is ReqState.PREEMPTED:
            if req is None:
                req = self._reqs[req_id] = _Request(req_id, block_hashes)
                self.manager.record_hits(block_hashes[:start])  # the engine's own hits count for the disk filter
            req.state, req.num_planned, req.store_jobs = ReqState.RUNNING, 0, set()
        req.block_ids = list(block_ids)
        n = num_external_tokens // self.block_size
        if not n:
            if queried:
                self.stats.window.append((queried, 0, 0))
            return AllocResult()
        target = req.block_ids[start:start + n]
        n_promised = min(n, num_matched // self.block_size, len(target), max(0, len(block_hashes) - start))
        locs = self.manager.prepare_onboard(block_hashes[start:start + n_promised])
        n_host = sum(loc.tier is Tier.G2 for loc in locs)
        self.stats.matched_tokens += len(locs) * self.block_size
        self.stats.window.append((max(queried, n), n_host, len(locs) - n_host))
        moves = [BlockMove(loc.block_hash, target[i], loc.slot, loc.tier) for i, loc in enumerate(locs)]
        missing = target[len(locs):]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("onboarding %d blocks for %s after %d engine hits: %s%s", len(moves), req_id, start,
                      [(m.block_id, m.tier.value, m.slot) for m in moves], f", {len(missing)} evicted" if missing else "")
        # the lookup's answer is binding: vLLM runs a layer-wise request in this step (what could not be
        # pinned is reported missing and recomputed)
        self._plan_load(req, moves, missing, locs, layerwise)
        return AllocResult(n_host * self.block_size, (len(locs) - n_host) * self.block_size, list(missing))

    def _unexpected_alloc(self, req_id: str, block_hashes: Sequence, block_ids: Sequence[int],
                          num_external_tokens: int) -> AllocResult:
        """External tokens the leader never matched (no lookup before): a load job that moves nothing and
        marks the blocks failed, so the engine recomputes them and still hears the load finish."""
        self.stats.unexpected_calls += 1
        log.warning("kvbm: %s was allocated %d external tokens without a lookup; recomputing them", req_id,
                    num_external_tokens)
        req = self._reqs.get(req_id) or _Request(req_id, block_hashes)
        self._reqs[req_id] = req
        req.block_ids = list(block_ids)
        missing = list(req.block_ids)  # where the external tokens start is unknown: the engine recomputes all
        self._plan_load(req, [], missing, [])
        return AllocResult(unavailable_block_ids=list(missing))

    def _plan_load(self, req: _Request, moves: list[BlockMove], missing: list[int], locs: list[Location],
                   layerwise: bool = False) -> None:
        """A layer-wise load runs within the request's next step (the request is RUNNING at once; its job
        stays in flight, pinning the host blocks, until every rank reported it); any other load parks the
        request until every rank finished it."""
        job_id = f"load:{req.req_id}:{next(self._ids)}"
        self._jobs[job_id] = _Job("load", req.req_id, locs)
        self._loads.append(LoadSpec(req.req_id, job_id, moves, list(missing), layerwise))
        req.state = ReqState.RUNNING if layerwise else ReqState.WAITING_FOR_LOAD
        req.load_job = job_id

    def on_scheduled(self, req_id: str, block_ids: Sequence[int] | None, num_computed_after: int,
                     replace: bool = False) -> None:
        """The request runs this step with `block_ids` added (or, with `replace`, as all its blocks); when the
        step ends `num_computed_after` tokens have KV. Plan stores of the blocks that become full."""
        req = self._reqs.get(req_id)
        if req is None or req.state in (ReqState.FINISHED, ReqState.WAITING_FOR_LOAD):
            return  # never seen (a miss later), or not running: nothing of it to store
        if replace:
            req.block_ids = list(block_ids or ())
            req.num_planned, req.store_jobs = 0, set()
        elif block_ids:
            req.block_ids.extend(block_ids)
        req.state = ReqState.RUNNING
        n_full = min(num_computed_after // self.block_size, len(req.block_hashes), len(req.block_ids))
        if n_full <= req.num_planned:
            return
        hashes = list(req.block_hashes[req.num_planned:n_full])
        ids = dict(zip(hashes, req.block_ids[req.num_planned:n_full]))
        req.num_planned = n_full
        plan = self.manager.prepare_offload(hashes)
        if plan.empty:
            return
        if plan.num_skipped_full:
            log.warning("host tier full (every slot pinned): skipped offloading %d blocks", plan.num_skipped_full)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("offloading %d blocks of %s to host: %s; %d cascade to disk", len(plan.stores), req_id,
                      [(ids[loc.block_hash], loc.slot) for loc in plan.stores], len(plan.cascades))
        n = next(self._ids)
        job_id = f"store:{req_id}:{n}"
        # Detached cascades (snapshot, own disk thread): the store job reports when the engine blocks are read,
        # the cascade when the disk holds the evicted blocks. (A wrong-KV race once blamed on them was the
        # lifecycle test comparing one seed's prompts with another's answers.)
        cascade_id = f"cascade:{n}" if plan.cascades and self.detach_cascades else None
        self._jobs[job_id] = _Job("store", req_id, plan) if cascade_id is not None else _Job("offload", req_id, plan)
        if cascade_id is not None:
            self._jobs[cascade_id] = _Job("cascade", None, plan)
        req.store_jobs.add(job_id)
        self._stores.append(StoreSpec(
            req_id, job_id,
            [BlockMove(loc.block_hash, ids[loc.block_hash], loc.slot, Tier.G2) for loc in plan.stores],
            list(plan.cascades), cascade_id))

    def on_preempted(self, req_ids: Sequence[str]) -> None:
        """vLLM took these requests' blocks back: fence the jobs that still read them; start afresh later."""
        for req_id in req_ids:
            req = self._reqs.get(req_id)
            if req is None or req.state is ReqState.FINISHED:
                continue
            jobs = set(req.store_jobs) | ({req.load_job} if req.load_job else set())
            if jobs:
                self._fences[req_id] = tuple(sorted(jobs))
                self.stats.fenced_jobs += len(jobs)
            self.stats.preemptions += 1
            req.state, req.block_ids, req.num_planned = ReqState.PREEMPTED, [], 0
            req.store_jobs, req.load_job = set(), None

    def build_step(self, preempted_req_ids: Sequence[str] = ()) -> StepPlan:
        """Everything planned since the last step, for the workers."""
        self.on_preempted(preempted_req_ids)
        plan = StepPlan(self._loads, self._stores, self._fences, self._releases, no_disk=self.disk_lost is not None)
        self._loads, self._stores, self._fences, self._releases = [], [], {}, {}
        return plan

    # ---- completion ----------------------------------------------------------------------------------------

    def on_report(self, report: WorkerReport | None) -> None:
        """Commit jobs every rank (by rank id) has finished; a duplicate or late report changes nothing."""
        if report is None:
            return
        for rank, why in sorted(report.disk_lost.items()):
            self._lose_disk(rank, why)
        for job_id, outcome in report.jobs.items():
            job = self._jobs.get(job_id)
            if job is None:
                continue
            merged = self._partial.pop(job_id).merge(outcome) if job_id in self._partial else outcome
            if not self.ranks <= merged.ranks:
                self._partial[job_id] = merged
                continue
            del self._jobs[job_id]
            self.stats.transfer_seconds.append(("store" if job.kind == "offload" else job.kind, merged.seconds))
            if job.kind == "offload":  # stores with their cascades in one job
                self._cascade_done(job_id, job, merged)
                self._store_done(job_id, job, merged)
                continue
            {"load": self._load_done, "store": self._store_done, "cascade": self._cascade_done}[job.kind](
                job_id, job, merged)

    def _load_done(self, job_id: str, job: _Job, merged: JobOutcome) -> None:
        locs: list[Location] = job.what
        self.manager.complete_onboard(locs, merged.failed_hashes)
        ok = [loc for loc in locs if loc.block_hash not in merged.failed_hashes]
        self.stats.onboard_bytes += len(ok) * self.block_bytes
        self.stats.disk_bytes_read += sum(loc.tier is Tier.G3 for loc in ok) * self.block_bytes
        if merged.failed_hashes:
            log.warning("kvbm: %d blocks failed to load and will be recomputed", len(merged.failed_hashes))
        req = self._reqs.get(job.req_id)
        if req is not None and req.load_job == job_id:
            req.load_job = None
            if req.state is ReqState.WAITING_FOR_LOAD:
                req.state = ReqState.RUNNING

    def _store_done(self, job_id: str, job: _Job, merged: JobOutcome) -> None:
        plan: OffloadPlan = job.what
        self.manager.complete_stores(plan, merged.failed_hashes)
        self.stats.offload_bytes += sum(loc.block_hash not in merged.failed_hashes for loc in plan.stores) * self.block_bytes
        req = self._reqs.get(job.req_id)
        if req is not None:
            req.store_jobs.discard(job_id)
            if req.state is ReqState.FINISHED and not req.store_jobs:
                del self._reqs[req.req_id]

    def _cascade_done(self, job_id: str, job: _Job, merged: JobOutcome) -> None:
        plan: OffloadPlan = job.what
        self.manager.complete_cascades(plan, merged.failed_hashes)
        self.stats.disk_bytes_written += sum(c.block_hash not in merged.failed_hashes for c in plan.cascades) * self.block_bytes

    def _lose_disk(self, rank: int, why: str) -> None:
        if self.disk_lost is not None or self.manager.disk is None:
            return
        self.disk_lost = f"rank {rank}: {why}"
        log.warning("kvbm: rank %d lost its disk tier (%s); no rank reads or writes disk (G3) blocks from now on, "
                    "serving goes on from host memory", rank, why)
        self.manager.disable_disk()

    def request_finished(self, req_id: str) -> bool:
        """The engine is done with a request (finished or aborted): True (hold its blocks) only while a store
        still reads them; the next step plan releases it once the workers finished those stores."""
        self._lookups.pop(req_id, None)
        req = self._reqs.get(req_id)
        if req is None:
            return False
        if req.state is ReqState.WAITING_FOR_LOAD:  # aborted mid-load: vLLM waits for the load, then frees
            self.stats.aborted_loads += 1
            del self._reqs[req_id]
            return False
        if req.store_jobs and req.state is not ReqState.FINISHED:
            req.state = ReqState.FINISHED
            self._releases[req_id] = tuple(sorted(req.store_jobs))
            self.stats.delayed_frees += 1
            return True
        del self._reqs[req_id]
        return False

    # ---- introspection (metrics, tests) --------------------------------------------------------------------

    def states(self) -> dict[str, int]:
        """Requests per state."""
        out = {s.value: 0 for s in ReqState}
        for req in self._reqs.values():
            out[req.state.value] += 1
        return out

    def state_of(self, req_id: str) -> ReqState | None:
        """A request's state, None when the leader holds nothing of it."""
        req = self._reqs.get(req_id)
        return req.state if req is not None else None

    @property
    def jobs_in_flight(self) -> int:
        """Jobs not yet reported by every rank."""
        return len(self._jobs)
