"""The leader: scheduler-side KVBM for one engine. Engine-agnostic; the vLLM connector maps its calls here.

Every request the leader knows is in one explicit state, and every decision reads it:

    lookup -> on_alloc, blocks to load ....... WAITING_FOR_LOAD --load reported by every rank--> RUNNING
    lookup -> on_alloc, nothing to load ...... RUNNING
    RUNNING --preempted--> PREEMPTED (its stores are fenced) --lookup -> on_alloc--> WAITING_FOR_LOAD | RUNNING
    request_finished, stores still reading its blocks --> FINISHED (vLLM holds the blocks: delay_free) --
        those stores reported by every rank --> forgotten
    request_finished otherwise --> forgotten at once (an aborted load is dropped when it reports)

The shared tier (G4) is reached through G2. A lookup that the local tiers cannot finish asks the store
(`remote`, an index the integration hands in: batched, asynchronous) and answers None ("ask again later")
until the answer is in, so the scheduler step never waits on the network. A G4 hit is staged through a host
slot (G4 -> G2 -> G1, on the workers' load thread); a G4 miss at load time (evicted since the lookup, corrupt,
bad MAC, store down) is a load error, recomputed and counted. Host blocks the disk offload filter admits (hit
at least once) are written to G4 once (G2 -> G4, on the workers' own thread); write-once blocks stay local.

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
  remote_fingerprints                                       the ranks' G4 fingerprints (None: no G4 on some rank)
  g4_changes(stored, removed)                               the hook for KV events: blocks entering/leaving G4
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from kvbm.errors import KvbmError
from kvbm.policy import Location, OffloadPlan, Tier, TierManager
from kvbm.protocol import (BlockMove, Handshake, JobOutcome, LoadSpec, RemoteStoreSpec, StepPlan, StoreSpec,
                           WorkerReport)

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
    kind: str  # "load" | "store" | "cascade" | "offload" (a store with its cascades) | "remote_store"
    req_id: str | None
    what: object  # list[Location] for a load or a G4 write, the OffloadPlan for a store or a cascade
    remote: object = None  # a load's G4 part: the OffloadPlan of its host staging slots


@dataclass
class AllocResult:
    """What on_alloc planned: tokens coming from host and disk, block ids that must be recomputed."""

    host_tokens: int = 0
    disk_tokens: int = 0
    remote_tokens: int = 0
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
    # (looked-up, host hits, disk hits, G4 hits)
    window: deque = field(default_factory=lambda: deque(maxlen=256))
    remote_lookups: int = 0          # G4 lookups sent (one batch per request lookup)
    remote_lookup_blocks: int = 0    # blocks asked
    remote_lookup_hits: int = 0      # of which G4 held (a leading run)
    remote_lookup_timeouts: int = 0  # lookups not answered in time: a miss
    remote_bytes_read: int = 0
    remote_bytes_written: int = 0


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
        # the shared tier (G4): an index with lookup(hashes) -> future of list[bool] and `available`, set by the
        # integration once every rank has opened its store (None: no G4)
        self.remote = None
        self.remote_fingerprints: list[bytes] | None = None
        self.remote_lookup_timeout_s = 2.0  # a lookup not answered by then is a miss
        self.remote_reuse_s = 1.0  # a finished lookup answers repeated calls for the same blocks this long
        self._remote_lookups: dict[str, tuple[tuple, object, float]] = {}  # req_id -> (hashes, future, since)
        self._remote_stores: list[RemoteStoreSpec] = []

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
        fingerprints = [handshakes[rank].remote_fingerprint for rank in got]
        self.remote_fingerprints = fingerprints if all(fingerprints) else None
        if any(fingerprints) and not all(fingerprints):
            log.warning("kvbm: only ranks %s opened the shared tier (G4); a block is usable only when every rank "
                        "holds its shard, so serving goes on without G4", [r for r in got if handshakes[r].remote_fingerprint])

    # ---- lookups (no side effects on the tiers) ------------------------------------------------------------

    def num_matched_tokens(self, req_id: str, block_hashes: Sequence, num_computed_tokens: int,
                           num_tokens: int) -> int | None:
        """Tokens kvbm can load beyond the engine's `num_computed_tokens`, out of the request's `num_tokens`
        (prompt, plus generated tokens for a resumed request); at least one token is left to compute.
        None: the shared tier's answer is not in yet, ask again later (never waits on the network).
        Remembered for the allocation that follows (the last lookup counts)."""
        start = num_computed_tokens // self.block_size
        usable = max(0, min((num_tokens - 1) // self.block_size, len(block_hashes)))
        n = n_remote = 0
        layerwise = False
        queried = max(0, usable - start)
        if queried:
            locs = self.manager.match(block_hashes[start:usable])
            rest = block_hashes[start + len(locs):usable]
            rest = rest[:self.manager.remote_usable(rest)] if self.remote is not None else ()
            if rest:
                n_remote = self._remote_match(req_id, tuple(rest))
                if n_remote is None:
                    return None
            n = (len(locs) + n_remote) * self.block_size
            layerwise = (not n_remote and self.layerwise_min_blocks is not None
                         and len(locs) >= self.layerwise_min_blocks and all(loc.tier is Tier.G2 for loc in locs))
        self._lookups[req_id] = (num_computed_tokens, n, queried, layerwise, n_remote)
        return n

    def _remote_match(self, req_id: str, hashes: tuple) -> int | None:
        """The leading run of `hashes` G4 holds, once its (asynchronous, batched) lookup answered; None while
        it is pending. A store that is down answers 0 at once (its index reconnects in the background)."""
        now = time.monotonic()
        entry = self._remote_lookups.get(req_id)
        if entry is not None and entry[0] == hashes:
            _, future, since, counted = entry
            if not future.done():
                if now - since <= self.remote_lookup_timeout_s:
                    return None
                self.stats.remote_lookup_timeouts += 1
                del self._remote_lookups[req_id]
                return 0
            if now - since <= self.remote_reuse_s + self.remote_lookup_timeout_s:
                try:
                    found = future.result()
                except Exception:  # noqa: BLE001 - an index that failed answers a miss
                    found = []
                n = 0
                for hit in found:
                    if not hit:
                        break
                    n += 1
                if not counted:  # each lookup's answer counts once, however often vLLM asks
                    self.stats.remote_lookup_hits += n
                    self._remote_lookups[req_id] = (hashes, future, since, True)
                return n
        if not self.remote.available:
            self._remote_lookups.pop(req_id, None)
            return 0
        self.stats.remote_lookups += 1
        self.stats.remote_lookup_blocks += len(hashes)
        self._remote_lookups[req_id] = (hashes, self.remote.lookup(list(hashes)), now, False)
        return None

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
        num_computed, num_matched, queried, layerwise, n_remote = lookup
        self._remote_lookups.pop(req_id, None)
        start = num_computed // self.block_size
        if req is None or req.state is ReqState.PREEMPTED:
            if req is None:
                req = self._reqs[req_id] = _Request(req_id, block_hashes)
                self.manager.record_hits(block_hashes[:start])  # the engine's own hits count for the disk filter
                self._plan_remote_stores(block_hashes[:start])  # ... and may make host blocks worth sharing
            req.state, req.num_planned, req.store_jobs = ReqState.RUNNING, 0, set()
        req.block_ids = list(block_ids)
        n = num_external_tokens // self.block_size
        if not n:
            if queried:
                self.stats.window.append((queried, 0, 0, 0))
            return AllocResult()
        target = req.block_ids[start:start + n]
        n_promised = min(n, num_matched // self.block_size, len(target), max(0, len(block_hashes) - start))
        locs = self.manager.prepare_onboard(block_hashes[start:start + n_promised])
        staged = None
        rest = block_hashes[start + len(locs):start + n_promised]
        # G4 blocks follow the local run the lookup found; if that run shrank since, they cannot be used
        if rest and n_remote and self.remote is not None and len(locs) >= num_matched // self.block_size - n_remote:
            staged = self.manager.prepare_remote_onboard(rest)
        g4 = list(staged.stores) if staged is not None else []
        n_host = sum(loc.tier is Tier.G2 for loc in locs)
        total = len(locs) + len(g4)
        self.stats.matched_tokens += total * self.block_size
        self.stats.window.append((max(queried, n), n_host, len(locs) - n_host, len(g4)))
        moves = [BlockMove(loc.block_hash, target[i], loc.slot, loc.tier) for i, loc in enumerate(locs)]
        moves += [BlockMove(loc.block_hash, target[len(locs) + i], loc.slot, Tier.G4) for i, loc in enumerate(g4)]
        missing = target[total:]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("onboarding %d blocks for %s after %d engine hits: %s%s", len(moves), req_id, start,
                      [(m.block_id, m.tier.value, m.slot) for m in moves], f", {len(missing)} evicted" if missing else "")
        # the lookup's answer is binding: vLLM runs a layer-wise request in this step (what could not be
        # pinned is reported missing and recomputed)
        self._plan_load(req, moves, missing, locs, layerwise, staged)
        self._plan_remote_stores([loc.block_hash for loc in locs if loc.tier is Tier.G2])  # hit: worth sharing
        return AllocResult(n_host * self.block_size, (len(locs) - n_host) * self.block_size, len(g4) * self.block_size,
                           list(missing))

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
                   layerwise: bool = False, staged: OffloadPlan | None = None) -> None:
        """A layer-wise load runs within the request's next step (the request is RUNNING at once; its job
        stays in flight, pinning the host blocks, until every rank reported it); any other load parks the
        request until every rank finished it. `staged`: the host slots its G4 blocks stage through, with the
        cascades of the host blocks they evicted (a job of their own)."""
        n = next(self._ids)
        job_id = f"load:{req.req_id}:{n}"
        self._jobs[job_id] = _Job("load", req.req_id, locs, staged)
        cascade_id = None
        if staged is not None and staged.cascades:
            cascade_id = f"cascade:{n}"
            self._jobs[cascade_id] = _Job("cascade", None, staged)
        self._loads.append(LoadSpec(req.req_id, job_id, moves, list(missing), layerwise,
                                    list(staged.cascades) if staged is not None else [], cascade_id))
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

    def _plan_remote_stores(self, hashes: Sequence) -> None:
        """Write to G4 the ready host blocks of `hashes` the disk offload filter admits and G4 is not known to
        hold (one job, on the workers' G4 thread; the host slots stay pinned until it reports)."""
        if self.remote is None or not hashes:
            return
        locs = self.manager.prepare_remote_offload(hashes)
        if not locs:
            return
        job_id = f"g4store:{next(self._ids)}"
        self._jobs[job_id] = _Job("remote_store", None, locs)
        self._remote_stores.append(RemoteStoreSpec(job_id, [(loc.block_hash, loc.slot) for loc in locs]))

    def g4_changes(self, stored: Sequence, removed: Sequence) -> None:
        """Blocks that entered G4 (written by this engine) and left it (a load found them missing or bad).
        Recorded as KV events (BlockStored / BlockRemoved, medium STORAGE, locality REMOTE) when the engine
        asked for events."""
        events = self.manager.events
        if events is not None:
            if stored:
                events.stored(Tier.G4, stored)
            if removed:
                events.removed(Tier.G4, removed)

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
        plan = StepPlan(self._loads, self._stores, self._fences, self._releases, no_disk=self.disk_lost is not None,
                        remote_stores=self._remote_stores)
        self._loads, self._stores, self._fences, self._releases = [], [], {}, {}
        self._remote_stores = []
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
            {"load": self._load_done, "store": self._store_done, "cascade": self._cascade_done,
             "remote_store": self._remote_store_done}[job.kind](job_id, job, merged)

    def _load_done(self, job_id: str, job: _Job, merged: JobOutcome) -> None:
        locs: list[Location] = job.what
        self.manager.complete_onboard(locs, merged.failed_hashes)
        ok = [loc for loc in locs if loc.block_hash not in merged.failed_hashes]
        self.stats.onboard_bytes += len(ok) * self.block_bytes
        self.stats.disk_bytes_read += sum(loc.tier is Tier.G3 for loc in ok) * self.block_bytes
        staged: OffloadPlan | None = job.remote
        if staged is not None:
            self.manager.complete_remote_onboard(staged, merged.failed_hashes)
            lost = [loc.block_hash for loc in staged.stores if loc.block_hash in merged.failed_hashes]
            n_ok = len(staged.stores) - len(lost)
            self.stats.onboard_bytes += n_ok * self.block_bytes
            self.stats.remote_bytes_read += n_ok * self.block_bytes
            if lost:
                self.g4_changes((), lost)
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
        # a block stored again that was hit before (or every block, with the filter off) is worth sharing
        self._plan_remote_stores([loc.block_hash for loc in plan.stores if loc.block_hash not in merged.failed_hashes])
        req = self._reqs.get(job.req_id)
        if req is not None:
            req.store_jobs.discard(job_id)
            if req.state is ReqState.FINISHED and not req.store_jobs:
                del self._reqs[req.req_id]

    def _remote_store_done(self, job_id: str, job: _Job, merged: JobOutcome) -> None:
        locs: list[Location] = job.what
        self.manager.complete_remote_offload(locs, merged.failed_hashes)
        stored = [loc.block_hash for loc in locs if loc.block_hash not in merged.failed_hashes]
        self.stats.remote_bytes_written += len(stored) * self.block_bytes
        if stored:
            self.g4_changes(stored, ())

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
        self._remote_lookups.pop(req_id, None)
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
