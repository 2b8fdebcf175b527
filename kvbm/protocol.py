"""What travels between the leader (scheduler process) and the workers: picklable, addresses only.

Operations:
  StepPlan      leader -> workers once per engine step: loads to start, stores to run after the forward
  WorkerReport  workers -> leader: finished jobs with their failures; merged across ranks by `aggregate`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from kvbm.mechanism.transfer import BlockMove, SlotCopy


@dataclass
class LoadSpec:
    """Onboard the blocks of one request (G2/G3 -> engine blocks)."""

    req_id: str
    job_id: str
    moves: list[BlockMove]
    unavailable_block_ids: list[int] = field(default_factory=list)  # evicted since the match: recompute


@dataclass
class StoreSpec:
    """Offload completed blocks of one request (engine -> G2), after the G2 evictions' cascades to G3."""

    req_id: str
    job_id: str
    stores: list[BlockMove]
    cascades: list[SlotCopy]


@dataclass
class StepPlan:
    """The leader's decisions for one engine step."""

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        """True when there is nothing to do."""
        return not self.loads and not self.stores and not self.preempted_req_ids


@dataclass
class JobOutcome:
    """One job's end as seen by the ranks that finished it so far."""

    num_ranks: int = 0
    failed_hashes: frozenset = frozenset()
    failed_block_ids: frozenset = frozenset()
    nbytes: int = 0
    seconds: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "JobOutcome") -> "JobOutcome":
        """Both ranks' view: failures united, the slowest rank's time, rank 0's counts."""
        return JobOutcome(self.num_ranks + other.num_ranks, self.failed_hashes | other.failed_hashes,
                          self.failed_block_ids | other.failed_block_ids, self.nbytes + other.nbytes,
                          max(self.seconds, other.seconds), self.blocks or other.blocks)


@dataclass
class WorkerReport:
    """Jobs that finished on a worker since its last report."""

    jobs: dict[Hashable, JobOutcome] = field(default_factory=dict)

    def aggregate(self, other: "WorkerReport") -> "WorkerReport":
        """Merge another rank's report into a new one."""
        jobs = dict(self.jobs)
        for job_id, outcome in other.jobs.items():
            jobs[job_id] = jobs[job_id].merge(outcome) if job_id in jobs else outcome
        return WorkerReport(jobs)
