"""What travels between the leader (scheduler process) and the workers: picklable, addresses only, pure Python.

The policy (leader side) and the mechanism (worker side) both import this module and nothing of each other
(import-linter contracts in pyproject.toml keep it so).

Operations:
  Tier, BlockMove, SlotCopy  where a block lives; one block between the engine and a tier; host -> disk
  Handshake                  each worker's geometry at start-up (block bytes, slots, world size, disk up)
  StepPlan                   leader -> workers once per engine step: loads, stores, fences, releases, G4 writes
  JobOutcome / WorkerReport  workers -> leader: finished jobs by rank id, merged across ranks by `aggregate`
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Hashable


class Tier(enum.Enum):
    """Where a block lives. G1 is the engine's own cache, which kvbm does not index."""

    G1 = "G1"  # engine cache (GPU or CPU)
    G2 = "G2"  # host memory
    G3 = "G3"  # local disk
    G4 = "G4"  # the shared tier (a store several engine instances share), staged through G2

    @property
    def label(self) -> str:
        """Human name: device, host, disk, remote."""
        return {"G1": "device", "G2": "host", "G3": "disk", "G4": "remote"}[self.value]


@dataclass(frozen=True)
class BlockMove:
    """One block between the engine cache and a kvbm tier: engine block id <-> slot of `tier`. For a G4 load,
    `slot` is the host (G2) slot the block is staged through (G4 -> G2 -> G1)."""

    block_hash: Hashable
    block_id: int
    slot: int
    tier: Tier = Tier.G2


@dataclass(frozen=True)
class SlotCopy:
    """One block from a host slot to a disk slot (a G2 eviction cascading to G3)."""

    block_hash: Hashable
    host_slot: int
    disk_slot: int


@dataclass(frozen=True)
class Handshake:
    """One worker's view of the geometry, sent to the leader once at start-up (vLLM's handshake channel)."""

    rank: int
    world_size: int
    block_size: int
    block_bytes: int
    host_slots: int
    disk_slots: int
    disk_error: str | None = None  # the disk tier could not be created on this rank
    remote_fingerprint: bytes | None = None  # this rank's shared-tier (G4) key fingerprint; None: no G4 here


@dataclass
class LoadSpec:
    """Onboard the blocks of one request (G2/G3 -> engine blocks)."""

    req_id: str
    job_id: str
    moves: list[BlockMove]
    unavailable_block_ids: list[int] = field(default_factory=list)  # cannot be loaded: the engine recomputes
    # Layer-wise: the request runs in this very step; the worker copies layer i before layer i's attention
    # (host hits only, on GPU engines). Otherwise asynchronous: the request waits for "finished receiving".
    layerwise: bool = False
    # G4 loads stage through host slots: the G2 evictions that freed them go to disk first (snapshotted before
    # the load overwrites the slots), reported as `cascade_job_id`
    cascades: list[SlotCopy] = field(default_factory=list)
    cascade_job_id: str | None = None


@dataclass
class RemoteStoreSpec:
    """Write ready host (G2) blocks to the shared tier (G4): (block hash, host slot) pairs. The leader pins the
    slots until the job reports, so the worker reads them in place."""

    job_id: str
    blocks: list[tuple[Hashable, int]]


@dataclass
class StoreSpec:
    """Offload completed blocks of one request (engine -> G2), after the G2 evictions' cascades to G3."""

    req_id: str
    job_id: str
    stores: list[BlockMove]
    cascades: list[SlotCopy]
    cascade_job_id: str | None = None  # the cascades report on their own, as this job


@dataclass
class StepPlan:
    """The leader's decisions for one engine step.

    `fences` (preempted request -> the job ids still reading its engine blocks): the workers wait for exactly
    these jobs before the forward reuses the blocks. `releases` (finished request whose blocks the leader
    asked vLLM to hold -> its store job ids): each worker reports the request as finished sending once it has
    finished those jobs, and only then. `no_disk`: a rank lost its disk tier; every rank stops disk work.
    """

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    fences: dict[str, tuple[str, ...]] = field(default_factory=dict)
    releases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    no_disk: bool = False
    remote_stores: list[RemoteStoreSpec] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when there is nothing to do."""
        return not (self.loads or self.stores or self.fences or self.releases or self.remote_stores)


@dataclass
class JobOutcome:
    """One job's end as seen by the ranks (by rank id) that finished it so far."""

    ranks: frozenset = frozenset()
    failed_hashes: frozenset = frozenset()
    failed_block_ids: frozenset = frozenset()
    nbytes: int = 0
    seconds: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "JobOutcome") -> "JobOutcome":
        """Both views: ranks and failures united, the slowest rank's time; a rank reported twice counts once."""
        if other.ranks <= self.ranks:
            return self
        if self.ranks <= other.ranks:
            return other
        return JobOutcome(self.ranks | other.ranks, self.failed_hashes | other.failed_hashes,
                          self.failed_block_ids | other.failed_block_ids, self.nbytes + other.nbytes,
                          max(self.seconds, other.seconds), self.blocks or other.blocks)


@dataclass
class WorkerReport:
    """Jobs that finished on workers since their last report, and ranks whose disk tier went down."""

    jobs: dict[Hashable, JobOutcome] = field(default_factory=dict)
    disk_lost: dict[int, str] = field(default_factory=dict)  # rank -> why

    def aggregate(self, other: "WorkerReport") -> "WorkerReport":
        """Merge another rank's report into a new one."""
        jobs = dict(self.jobs)
        for job_id, outcome in other.jobs.items():
            jobs[job_id] = jobs[job_id].merge(outcome) if job_id in jobs else outcome
        return WorkerReport(jobs, {**self.disk_lost, **other.disk_lost})

    @property
    def empty(self) -> bool:
        """True when there is nothing to tell."""
        return not self.jobs and not self.disk_lost
