"""The worker: executes the leader's plans on one rank's engine cache. Engine-agnostic.

It reports what the leader asked about and nothing else: a load as finished receiving when its job is done,
a request as finished sending only when the plan released it (the leader delayed its free) and the store jobs
named with it are done here. Jobs are known by id: a plan delivered twice runs nothing twice, and a release
is reported once.

Operations:
  register(layout, host_slots, disk_slots, fingerprint)  allocate G2 (and G3, or warn and go on without it);
                                           open the shared tier (G4) when DYN_KVBM_REMOTE_URL is set
  handshake(block_size)                    this rank's geometry for the leader's start-up check
  fence(plan)                              wait for the jobs reading preempted requests' blocks (only those)
  start_loads(plan) / start_stores(plan)   submit the step's onboards and offloads; note its releases
  wait_layer(name) / save_layer(name)      layer-wise loads and stores of this step (GPU engines), per layer
  poll()                                   what finished: finished sending/receiving, failed blocks, a report
  close()
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvbm.config import KvbmConfig
from kvbm.errors import StorageError
from kvbm.mechanism import DiskTier, HostTier, KVLayout, OffloadJob, OnboardJob, TransferEngine
from kvbm.mechanism.fileio import PosixDiskIO
from kvbm.mechanism.transfer import JobResult, RemoteStoreJob
from kvbm.protocol import Handshake, JobOutcome, LoadSpec, StepPlan, Tier, WorkerReport

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


class _Recent:
    """A bounded set of recent ids (jobs accepted, requests released): duplicates are recognised."""

    def __init__(self, size: int):
        self.size = size
        self._ids: OrderedDict = OrderedDict()

    def add(self, key) -> bool:
        """True when `key` is new."""
        if key in self._ids:
            return False
        self._ids[key] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


class KvbmWorker:
    """Worker-side KVBM for one rank. Lives in each engine worker process."""

    def __init__(self, config: KvbmConfig, rank: int = 0, world_size: int = 1, load_wait_s: float = 0.01,
                 recent: int = 1 << 16):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        # poll() waits this long for loads submitted in the same step: a small load finishes within it, and
        # its request is then ready one engine step sooner (its time to first token drops by a whole step).
        self.load_wait_s = load_wait_s
        self.engine: TransferEngine | None = None
        self.host_slots = self.disk_slots = 0
        self.disk_error: str | None = None
        self.remote_fingerprint: bytes | None = None  # set when this rank opened the shared tier (G4)
        self._disk_reported = False
        self._loads_this_step = False
        self._accepted = _Recent(recent)
        self._released = _Recent(recent)
        self._load_req: dict[str, str] = {}  # open load job -> request
        self._releases: dict[str, tuple[str, ...]] = {}  # request -> store jobs to finish before finished_sending
        self._local: list[JobResult] = []  # jobs answered without the engine (tiers not registered)
        self._load_errors: set[int] = set()
        self._warned_unregistered = False
        # Layer-wise transfers (GPU engines): the copier, layer name -> index, this step's loads and stores,
        # and the layer-wise jobs whose copies are still in flight on kvbm's streams (job id -> handle, result).
        self.layerwise = None
        self._layer_index: dict[str, int] = {}
        self._step_loads: list = []
        self._step_stores: list[tuple[str, object, JobResult]] = []
        self._lw_open: dict[str, tuple[object, JobResult, float]] = {}

    # ---- start-up ------------------------------------------------------------------------------------------

    def register(self, layout: KVLayout, host_slots: int, disk_slots: int, fingerprint: bytes,
                 layer_names: list[str] | None = None) -> None:
        """Allocate this rank's tiers for `layout` (the host tier pre-faulted within the init timeout). A disk
        tier that cannot be created is left out, with a warning; the leader then plans no disk work at all."""
        timeout = self.config.leader_worker_init_timeout_secs
        host = HostTier.for_layout(layout, host_slots, prefault_timeout_s=timeout)
        disk = None
        if disk_slots > 0:
            try:
                disk = DiskTier.create(self.config.disk_cache_dir, disk_slots, layout.block_bytes, fingerprint,
                                       rank=self.rank, direct=not self.config.disk_disable_o_direct,
                                       zerofill=self.config.disk_zerofill_fallback, io=make_disk_io())
            except StorageError as exc:
                self.disk_error = str(exc)
                log.warning("kvbm: disk tier disabled, serving goes on with host memory only: %s", exc)
        remote = self._open_remote(layout, fingerprint) if host_slots > 0 else None
        self.engine = TransferEngine(layout, host, disk, remote=remote)
        if layout.device.type == "cuda" and self.config.layerwise:
            from kvbm.mechanism.layerwise import LayerwiseCopier

            self.layerwise = LayerwiseCopier(layout, host)
        self._layer_index = {name: i for i, name in enumerate(layer_names or ())}
        self.host_slots, self.disk_slots = host_slots, disk_slots
        log.info("kvbm worker %d: G2 %d blocks (%.2f GB)%s", self.rank, host_slots, host.nbytes / 1e9,
                 f", G3 {disk_slots} blocks at {disk.path} ({disk.nbytes / 1e9:.2f} GB)" if disk else "")

    def _open_remote(self, layout: KVLayout, fingerprint: bytes):
        """This rank's shared-tier store (keys carry `fingerprint`: model, layout, block size, rank), or None.
        A store that is down now is kept (it is used once it answers); a bad URL or refused credentials: one
        warning naming DYN_KVBM_REMOTE_URL, and no G4."""
        if not self.config.remote_url:
            return None
        from kvbm.mechanism.remote import open_store

        secret = self.config.remote_secret.get_secret_value() if self.config.remote_secret else None
        cache = int(self.config.remote_cache_gb * 1e9) if self.config.remote_cache_gb else None
        store = open_store(self.config.remote_url, fingerprint, secret, block_bytes=layout.block_bytes,
                           cache_bytes=cache, keep_if_unreachable=True)
        if store is not None:
            self.remote_fingerprint = store.fingerprint
            log.info("kvbm worker %d: shared tier (G4) %s", self.rank, store.describe())
        return store

    def handshake(self, block_size: int) -> Handshake:
        """This rank's geometry, for the leader's start-up check."""
        block_bytes = self.engine.layout.block_bytes if self.engine is not None else 0
        return Handshake(self.rank, self.world_size, block_size, block_bytes, self.host_slots, self.disk_slots,
                         self.disk_error, self.remote_fingerprint)

    @property
    def layerwise_enabled(self) -> bool:
        """True when host hits can be onboarded layer by layer here (a GPU engine cache, DYN_KVBM_LAYERWISE)."""
        return self.layerwise is not None

    @property
    def has_disk(self) -> bool:
        """True when the disk tier is up."""
        return self.engine is not None and self.engine.disk is not None and not self.engine.disk_disabled

    # ---- a step --------------------------------------------------------------------------------------------

    def fence(self, plan: StepPlan) -> None:
        """Blocks of preempted requests are about to be reused: wait for the jobs that still read or write
        them, and for nothing else (other requests' stores and every disk write go on)."""
        jobs = {job for ids in plan.fences.values() for job in ids}
        for job in jobs & set(self._lw_open):
            self._lw_open[job][0].synchronize()
        if jobs and self.engine is not None:
            self.engine.wait_jobs(jobs)

    def _note(self, plan: StepPlan) -> None:
        for req_id, job_ids in plan.releases.items():
            if req_id not in self._releases:
                self._releases[req_id] = tuple(job_ids)
        if plan.no_disk and self.engine is not None and self.engine.disk_disabled is None:
            self.engine.disable_disk("another rank lost its disk tier")

    def start_loads(self, plan: StepPlan) -> None:
        """Submit the step's onboards (they complete asynchronously) and note the step's releases."""
        self._note(plan)
        for spec in plan.loads:
            if not self._accepted.add(spec.job_id):
                continue  # a plan delivered twice: the job runs once
            self._load_errors.update(spec.unavailable_block_ids)
            if spec.layerwise and self.engine is not None:
                self._start_layerwise_load(spec)
                continue
            if not spec.layerwise:  # vLLM waits for "finished receiving" of asynchronous loads only
                self._load_req[spec.job_id] = spec.req_id
            if self.engine is None:
                self._unregistered()
                if spec.layerwise:  # the request runs this step: its blocks are load errors now, recomputed
                    self._load_errors.update(m.block_id for m in spec.moves)
                self._local.append(JobResult(spec.job_id, "onboard", error="tiers not registered",
                                             failed_hashes=frozenset(m.block_hash for m in spec.moves),
                                             failed_block_ids=frozenset(m.block_id for m in spec.moves)))
                if spec.cascade_job_id is not None:
                    self._local.append(JobResult(spec.cascade_job_id, "cascade", error="tiers not registered",
                                                 failed_hashes=frozenset(c.block_hash for c in spec.cascades)))
                continue
            self.engine.submit_onboard(OnboardJob(spec.job_id, spec.moves, spec.cascades, spec.cascade_job_id))
            self._loads_this_step = True
        if self.layerwise is not None:
            for spec in plan.stores:  # stores without cascades move per layer, behind the forward's layers
                if not spec.cascades and spec.stores and self._accepted.add(spec.job_id):
                    handle = self.layerwise.start_store([m.block_id for m in spec.stores], [m.slot for m in spec.stores])
                    result = JobResult(spec.job_id, "offload", {"g1_g2": len(spec.stores), "g2_g3": 0},
                                       len(spec.stores) * self.engine.layout.block_bytes)
                    self._step_stores.append((spec.job_id, handle, result))

    def _start_layerwise_load(self, spec: LoadSpec) -> None:
        """The request runs in this step: its host blocks move per layer (wait_layer orders each layer's
        attention behind its copy). Without a copier, or for a block not in host memory, the load runs here
        and now, before the forward (correct, only slower)."""
        moves = list(spec.moves)
        nbytes = len(moves) * self.engine.layout.block_bytes
        if self.layerwise is not None and all(m.tier is Tier.G2 for m in moves):
            handle = self.layerwise.start_load([m.block_id for m in moves], [m.slot for m in moves])
            self._step_loads.append(handle)
            self._lw_open[spec.job_id] = (handle, JobResult(spec.job_id, "onboard", {"g2_g1": len(moves), "g3_g1": 0},
                                                            nbytes), time.perf_counter())
            return
        result = self.engine.run_onboard(OnboardJob(spec.job_id, moves))
        if self.engine.cuda is not None:
            import torch

            torch.cuda.synchronize(self.engine.layout.device)
        self._load_errors.update(result.failed_block_ids)
        self._local.append(result)

    def wait_layer(self, layer_name: str) -> None:
        """Before layer `layer_name`'s attention: its pages of this step's layer-wise loads are in place (the
        compute stream waits on the GPU; the host thread does not block)."""
        if self._step_loads:
            i = self._layer_index.get(layer_name)
            for load in self._step_loads:
                load.wait_layer(i) if i is not None else load.wait_all()

    def save_layer(self, layer_name: str) -> None:
        """After layer `layer_name`'s attention wrote its KV: copy that layer of this step's stores out."""
        if self._step_stores:
            i = self._layer_index.get(layer_name)
            if i is not None:
                for _, store, _ in self._step_stores:
                    store.save_layer(i)

    def start_stores(self, plan: StepPlan) -> None:
        """Submit the step's offloads (call after the forward wrote the blocks' KV, every step): layer-wise
        stores save the layers no hook saved; the others go to the transfer engine."""
        self._note(plan)
        for job_id, store, result in self._step_stores:
            self._lw_open[job_id] = (store.finish(), result, time.perf_counter())
        self._step_stores, self._step_loads = [], []
        for spec in plan.stores:
            if not self._accepted.add(spec.job_id):
                continue
            if self.engine is None:
                self._unregistered()
                self._local.append(JobResult(spec.job_id, "offload", error="tiers not registered",
                                             failed_hashes=frozenset(m.block_hash for m in spec.stores)))
                if spec.cascade_job_id is not None:
                    self._local.append(JobResult(spec.cascade_job_id, "cascade", error="tiers not registered",
                                                 failed_hashes=frozenset(c.block_hash for c in spec.cascades)))
                continue
            self.engine.submit_offload(OffloadJob(spec.job_id, spec.stores, spec.cascades, spec.cascade_job_id))
        for spec in plan.remote_stores:  # G2 -> G4, on the engine's G4 thread
            if not self._accepted.add(spec.job_id):
                continue
            if self.engine is None:
                self._local.append(JobResult(spec.job_id, "remote", error="tiers not registered",
                                             failed_hashes=frozenset(h for h, _ in spec.blocks)))
                continue
            self.engine.submit_remote_store(RemoteStoreJob(spec.job_id, list(spec.blocks)))

    def _unregistered(self) -> None:
        if not self._warned_unregistered:
            self._warned_unregistered = True
            log.warning("kvbm worker %d: a plan arrived before the KV caches were registered; its loads fail "
                        "(recomputed) and its stores are dropped", self.rank)

    def poll(self, finished_req_ids: set[str] | frozenset = frozenset()) -> PollResult:
        """Collect finished jobs: loads finished receiving, released requests whose stores are done here.
        (`finished_req_ids` is accepted for the engine's call shape; the plan's releases decide.)"""
        out = PollResult()
        report = WorkerReport()
        if self._loads_this_step and self.engine is not None:
            self.engine.wait(self.load_wait_s, kind="onboard")
            self._loads_this_step = False
        results, self._local = self._local + (self.engine.get_finished() if self.engine is not None else []), []
        if not (results or self._lw_open or self._releases or self._load_errors) and (
                self.disk_error is None or self._disk_reported):
            return out  # nothing finished, nothing waited for: the common decode step costs ~1 us here
        for job_id, (handle, result, t0) in list(self._lw_open.items()):
            if handle.query():
                del self._lw_open[job_id]
                result.seconds = time.perf_counter() - t0
                results.append(result)
        for result in results:
            report.jobs[result.job_id] = JobOutcome(frozenset({self.rank}), result.failed_hashes,
                                                    result.failed_block_ids, result.nbytes, result.seconds,
                                                    dict(result.blocks))
            req_id = self._load_req.pop(result.job_id, None)
            if req_id is not None:
                out.finished_recving.add(req_id)
                self._load_errors.update(result.failed_block_ids)
            if result.disk_error and self.disk_error is None:
                self.disk_error = result.disk_error
                log.warning("kvbm worker %d: disk tier failed (%s); no more disk work on any rank", self.rank,
                            result.disk_error)
                self.engine.disable_disk(result.disk_error)
        if self.disk_error is not None and not self._disk_reported:
            report.disk_lost[self.rank] = self.disk_error
            self._disk_reported = True
        for req_id, job_ids in list(self._releases.items()):
            if self.engine is None or not any(self.engine.is_open(j) or j in self._lw_open for j in job_ids):
                del self._releases[req_id]
                if self._released.add(req_id):
                    out.finished_sending.add(req_id)
        out.failed_block_ids, self._load_errors = self._load_errors, set()
        out.report = report if not report.empty else None
        return out

    def close(self) -> None:
        """Finish in-flight jobs and release the tiers (the disk cache file is removed)."""
        for handle, _, _ in self._lw_open.values():
            handle.synchronize()
        self._lw_open.clear()
        if self.layerwise is not None:
            self.layerwise.close()
            self.layerwise = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
