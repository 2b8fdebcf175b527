"""The leader: scheduler-side KVBM for one engine. Engine-agnostic; the vLLM connector maps its calls here.

Operations:
  num_matched_tokens(hashes, computed, prompt_len)  tokens G2/G3 can supply beyond the engine's own hits
  on_alloc(req_id, hashes, block_ids, computed, external, prompt_len)  pin and plan the load
  on_scheduled(req_id, block_ids, computed_after, replace) plan stores of blocks this step completes
  build_step(preempted)                                    the StepPlan for the workers (resets)
  on_report(report)                                        commit or abort what the workers finished
  request_finished(req_id) -> delay_free                   hold blocks while a job still touches them
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from kvbm.mechanism.transfer import BlockMove, SlotCopy
from kvbm.policy import OffloadPlan, Tier, TierManager
from kvbm.protocol import JobOutcome, LoadSpec, StepPlan, StoreSpec, WorkerReport

log = logging.getLogger("kvbm.leader")


@dataclass
class _Request:
    req_id: str
    block_hashes: Sequence  # the engine's live list: grows as tokens are generated
    block_ids: list[int] = field(default_factory=list)
    num_planned: int = 0  # leading blocks already handed to stores (or found present)
    num_jobs: int = 0  # jobs ever issued: the workers hold the request's blocks until they finish


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
    transfer_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))  # (kind, seconds)
    window: deque = field(default_factory=lambda: deque(maxlen=256))  # (looked-up, host hits, disk hits)


class KvbmLeader:
    """Scheduler-side KVBM. Lives in the engine's scheduler process; the only owner of the tier index."""

    def __init__(self, manager: TierManager, block_size: int, block_bytes: int, world_size: int = 1):
        self.manager = manager
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.world_size = world_size
        self.stats = LeaderStats()
        self._reqs: dict[str, _Request] = {}
        self._loads: list[LoadSpec] = []
        self._stores: list[StoreSpec] = []
        self._inflight: dict[str, tuple[str, object]] = {}  # job_id -> ("load", locs) | ("store", plan)
        self._partial: dict[str, JobOutcome] = {}  # jobs not yet reported by every rank
        self._ids = itertools.count()

    # ---- lookups (no side effects) -------------------------------------------------------------------------

    def num_matched_tokens(self, block_hashes: Sequence, num_computed_tokens: int, num_prompt_tokens: int) -> int:
        """Tokens kvbm can load beyond the engine's `num_computed_tokens`; at least one token is left to compute."""
        start = num_computed_tokens // self.block_size
        usable = max(0, (num_prompt_tokens - 1) // self.block_size)
        if start >= min(usable, len(block_hashes)):
            return 0
        return len(self.manager.match(block_hashes[start:usable])) * self.block_size

    # ---- planning ------------------------------------------------------------------------------------------

    def on_alloc(self, req_id: str, block_hashes: Sequence, block_ids: Sequence[int], num_computed_tokens: int,
                 num_external_tokens: int, num_prompt_tokens: int) -> "AllocResult":
        """Blocks were allocated for a request; plan its load. Returns where the loaded blocks come from and
        the block ids that cannot be loaded after all (evicted since the match: the engine recomputes them)."""
        start = num_computed_tokens // self.block_size
        req = self._reqs.get(req_id)
        if req is None:
            req = self._reqs[req_id] = _Request(req_id, block_hashes)
            self.manager.record_hits(block_hashes[:start])  # the engine's own hits count for the disk filter
            queried = max(0, min(len(block_hashes), (num_prompt_tokens - 1) // self.block_size) - start)
        else:
            queried = 0  # second call of an async load: already counted
        req.block_ids = list(block_ids)
        if not num_external_tokens:
            if queried:
                self.stats.window.append((queried, 0, 0))
            return AllocResult()
        n = num_external_tokens // self.block_size
        locs = self.manager.prepare_onboard(block_hashes[start:start + n])
        n_host = sum(loc.tier is Tier.G2 for loc in locs)
        self.stats.matched_tokens += len(locs) * self.block_size
        self.stats.window.append((max(queried, n), n_host, len(locs) - n_host))
        moves = [BlockMove(loc.block_hash, req.block_ids[start + i], loc.slot, loc.tier) for i, loc in enumerate(locs)]
        missing = req.block_ids[start + len(locs):start + n]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("onboarding %d blocks for %s after %d engine hits: %s%s", len(moves), req_id, start,
                      [(m.block_id, m.tier.value, m.slot) for m in moves], f", {len(missing)} evicted" if missing else "")
        job_id = f"load:{req_id}:{next(self._ids)}"
        self._inflight[job_id] = ("load", locs)
        self._loads.append(LoadSpec(req_id, job_id, moves, list(missing)))
        req.num_jobs += 1
        return AllocResult(n_host * self.block_size, (len(locs) - n_host) * self.block_size, list(missing))

    def on_scheduled(self, req_id: str, block_ids: Sequence[int] | None, num_computed_after: int,
                     replace: bool = False) -> None:
        """The request runs this step with `block_ids` added (or, with `replace`, as all its blocks); when the
        step ends `num_computed_after` tokens have KV. Plan stores of the blocks that become full."""
        req = self._reqs.get(req_id)
        if req is None:
            return
        if replace:
            req.block_ids = list(block_ids or ())
        elif block_ids:
            req.block_ids.extend(block_ids)
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
                      [(ids[l.block_hash], l.slot) for l in plan.stores], len(plan.cascades))
        job_id = f"store:{req_id}:{next(self._ids)}"
        self._inflight[job_id] = ("store", plan)
        self._stores.append(StoreSpec(
            req_id, job_id,
            [BlockMove(loc.block_hash, ids[loc.block_hash], loc.slot, Tier.G2) for loc in plan.stores],
            [SlotCopy(c.block_hash, c.host_slot, c.disk_slot) for c in plan.cascades]))
        req.num_jobs += 1

    def build_step(self, preempted_req_ids: Sequence[str] = ()) -> StepPlan:
        """Everything planned since the last step, for the workers."""
        plan = StepPlan(self._loads, self._stores, set(preempted_req_ids))
        self._loads, self._stores = [], []
        for req_id in preempted_req_ids:  # a resumed request gets new blocks: start its bookkeeping afresh
            req = self._reqs.get(req_id)
            if req is not None:
                req.block_ids, req.num_planned = [], 0
        return plan

    # ---- completion ----------------------------------------------------------------------------------------

    def on_report(self, report: WorkerReport | None) -> None:
        """Commit jobs every rank has finished; abort the blocks any rank failed."""
        if report is None:
            return
        for job_id, outcome in report.jobs.items():
            merged = self._partial.pop(job_id).merge(outcome) if job_id in self._partial else outcome
            if merged.num_ranks < self.world_size:
                self._partial[job_id] = merged
                continue
            entry = self._inflight.pop(job_id, None)
            if entry is None:
                continue
            kind, what = entry
            self.stats.transfer_seconds.append((kind, merged.seconds))
            if kind == "load":
                self.manager.complete_onboard(what, merged.failed_hashes)
                ok = [l for l in what if l.block_hash not in merged.failed_hashes]
                self.stats.onboard_bytes += len(ok) * self.block_bytes
                self.stats.disk_bytes_read += sum(l.tier is Tier.G3 for l in ok) * self.block_bytes
                if merged.failed_hashes:
                    log.warning("kvbm: %d blocks failed to load and will be recomputed", len(merged.failed_hashes))
            else:
                plan: OffloadPlan = what
                self.manager.complete_offload(plan, merged.failed_hashes)
                self.stats.offload_bytes += sum(l.block_hash not in merged.failed_hashes for l in plan.stores) * self.block_bytes
                self.stats.disk_bytes_written += sum(c.block_hash not in merged.failed_hashes for c in plan.cascades) * self.block_bytes

    def request_finished(self, req_id: str) -> bool:
        """The engine is done with a request: True (delay freeing its blocks) when jobs were issued for it."""
        req = self._reqs.pop(req_id, None)
        return req is not None and req.num_jobs > 0
