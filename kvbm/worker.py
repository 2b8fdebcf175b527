"""The worker: executes the leader's plans on one rank's engine cache. Engine-agnostic.

Operations:
  register(layout, host_slots, disk_slots, fingerprint)  allocate G2 (and G3, or warn and go on without it)
  start_loads(plan) / start_stores(plan)   submit the step's onboards (before the forward) and offloads (after)
  drain()                                  wait for in-flight jobs (preempted requests' blocks are about to be reused)
  poll(finished_req_ids)                   what finished: requests done sending/receiving, failed blocks, a report
  close()
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from kvbm.config import KvbmConfig
from kvbm.errors import StorageError
from kvbm.mechanism import DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, TransferEngine
from kvbm.mechanism.fileio import PosixDiskIO
from kvbm.protocol import JobOutcome, StepPlan, WorkerReport

log = logging.getLogger("kvbm.worker")


def make_disk_io():
    """NIXL's POSIX backend when installed (KVBM_DISK_IO=auto|nixl|posix), else positional I/O on threads."""
    choice = os.environ.get("KVBM_DISK_IO", "auto").lower()
    if choice in ("auto", "nixl"):
        try:
            from kvbm.mechanism.nixl_io import NixlDiskIO, nixl_available

            if nixl_available():
                return NixlDiskIO()
        except Exception as exc:  # noqa: BLE001 - NIXL is optional; say why it is not used
            if choice == "nixl":
                log.warning("kvbm: NIXL disk I/O requested but unavailable (%s); using POSIX I/O", exc)
    return PosixDiskIO()


@dataclass
class PollResult:
    """What poll() found."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_block_ids: set[int] = field(default_factory=set)
    report: WorkerReport | None = None


class KvbmWorker:
    """Worker-side KVBM for one rank. Lives in each engine worker process."""

    def __init__(self, config: KvbmConfig, rank: int = 0, load_wait_s: float = 0.01):
        self.config = config
        # poll() waits this long for loads submitted in the same step: a small load finishes within it, and
        # its request is then ready one engine step sooner (its time to first token drops by a whole step).
        self.load_wait_s = load_wait_s
        self._loads_this_step = False
        self.rank = rank
        self.engine: TransferEngine | None = None
        self.disk_error: str | None = None
        self._job_req: dict[str, tuple[str, str]] = {}  # job_id -> (req_id, "load"|"store")
        self._open_jobs: dict[str, set[str]] = {}  # req_id -> unfinished job ids
        self._had_jobs: set[str] = set()
        self._finished: set[str] = set()  # finished by the engine, waiting for their jobs
        self._load_errors: set[int] = set()

    def register(self, layout: KVLayout, host_slots: int, disk_slots: int, fingerprint: bytes) -> None:
        """Allocate this rank's tiers for `layout`. A disk tier that cannot be created is left out, with a warning."""
        host = HostTier.for_layout(layout, host_slots)  # block-major for GPU caches, segment-major for CPU
        disk = None
        if disk_slots > 0:
            try:
                disk = DiskTier.create(self.config.disk_cache_dir, disk_slots, layout.block_bytes, fingerprint,
                                       rank=self.rank, direct=not self.config.disk_disable_o_direct,
                                       zerofill=self.config.disk_zerofill_fallback, io=make_disk_io())
            except StorageError as exc:
                self.disk_error = str(exc)
                log.warning("kvbm: disk tier disabled, serving goes on with host memory only: %s", exc)
        self.engine = TransferEngine(layout, host, disk)
        log.info("kvbm worker %d: G2 %d blocks (%.2f GB)%s", self.rank, host_slots, host.nbytes / 1e9,
                 f", G3 {disk_slots} blocks at {disk.path} ({disk.nbytes / 1e9:.2f} GB)" if disk else "")

    @property
    def has_disk(self) -> bool:
        """True when the disk tier is up."""
        return self.engine is not None and self.engine.disk is not None

    def _track(self, req_id: str, job_id: str, kind: str) -> None:
        self._job_req[job_id] = (req_id, kind)
        self._open_jobs.setdefault(req_id, set()).add(job_id)
        self._had_jobs.add(req_id)

    def start_loads(self, plan: StepPlan) -> None:
        """Submit the step's onboards; they complete asynchronously."""
        for spec in plan.loads:
            self._track(spec.req_id, spec.job_id, "load")
            self._load_errors.update(spec.unavailable_block_ids)
            self.engine.submit_onboard(OnboardJob(spec.job_id, spec.moves))
            self._loads_this_step = True

    def start_stores(self, plan: StepPlan) -> None:
        """Submit the step's offloads (call after the forward wrote the blocks' KV)."""
        for spec in plan.stores:
            self._track(spec.req_id, spec.job_id, "store")
            self.engine.submit_offload(OffloadJob(spec.job_id, spec.stores, spec.cascades))

    def drain(self) -> None:
        """Wait for every in-flight job: blocks of preempted requests are about to be reused."""
        if self.engine is not None:
            self.engine.wait()

    def poll(self, finished_req_ids: set[str] | frozenset = frozenset()) -> PollResult:
        """Collect finished jobs; requests the engine finished are released once their jobs are done."""
        out = PollResult()
        report = WorkerReport()
        if self._loads_this_step and self.engine is not None:
            self.engine.wait(self.load_wait_s, kind="onboard")
            self._loads_this_step = False
        for result in (self.engine.get_finished() if self.engine is not None else []):
            req_id, kind = self._job_req.pop(result.job_id, (None, None))
            if req_id is None:
                continue
            self._open_jobs.get(req_id, set()).discard(result.job_id)
            report.jobs[result.job_id] = JobOutcome(1, result.failed_hashes, result.failed_block_ids, result.nbytes,
                                                    result.seconds, dict(result.blocks))
            if kind == "load":
                out.finished_recving.add(req_id)
                self._load_errors.update(result.failed_block_ids)
        self._finished.update(r for r in finished_req_ids if r in self._had_jobs)
        for req_id in list(self._finished):
            if not self._open_jobs.get(req_id):
                out.finished_sending.add(req_id)
                self._finished.discard(req_id)
                self._had_jobs.discard(req_id)
                self._open_jobs.pop(req_id, None)
        out.failed_block_ids, self._load_errors = self._load_errors, set()
        out.report = report if report.jobs else None
        return out

    def close(self) -> None:
        """Finish in-flight jobs and release the tiers (the disk cache file is removed)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
