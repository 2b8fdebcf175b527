"""Moving the bytes the leader decided: batched copies between G1 (engine cache), G2 (host) and G3 (disk).

Copies are batched: the engine's scattered pages move in one call per segment and per run of consecutive
host slots (index_select / index_copy_ over word-sized views run at memcpy speed). Disk moves go through an
aligned staging buffers, a bounded chunk at a time, double-buffered so staging overlaps the I/O. Jobs run asynchronously on two threads (loads, stores),
so an onboard never waits behind an offload, and completion is reported per job, never assumed.

Operations:
  copy_g1_to_g2 / copy_g2_to_g1   engine pages <-> host slots
  copy_g2_to_g3                   host slots -> disk slots (the G2 eviction cascade)
  copy_g3_to_g1                   disk slots -> engine pages, verified; returns the moves that failed
  TransferEngine                  submit_offload / submit_onboard / get_finished / wait / close
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch

from kvbm.errors import KvbmError
from kvbm.mechanism.disk import DiskTier
from kvbm.mechanism.host import HostTier
from kvbm.mechanism.layout import KVLayout
from kvbm.policy.types import Tier

log = logging.getLogger("kvbm.transfer")


@dataclass(frozen=True)
class BlockMove:
    """One block between the engine cache and a kvbm tier: engine block id <-> slot of `tier`."""

    block_hash: Hashable
    block_id: int
    slot: int
    tier: Tier = Tier.G2


@dataclass(frozen=True)
class SlotCopy:
    """One block from a host slot to a disk slot (same shape as the policy's Cascade)."""

    block_hash: Hashable
    host_slot: int
    disk_slot: int


@dataclass(frozen=True)
class OffloadJob:
    """Cascades first (they read host slots the stores then overwrite), then engine -> host stores."""

    job_id: Hashable
    stores: Sequence[BlockMove] = ()
    cascades: Sequence[SlotCopy] = ()


@dataclass(frozen=True)
class OnboardJob:
    """Loads from host or disk into engine blocks."""

    job_id: Hashable
    loads: Sequence[BlockMove] = ()


@dataclass
class JobResult:
    """What a finished job did: blocks per direction, bytes, time, and the blocks that failed."""

    job_id: Hashable
    kind: str  # "offload" | "onboard"
    blocks: dict[str, int] = field(default_factory=dict)  # "g1_g2", "g2_g3", "g2_g1", "g3_g1"
    nbytes: int = 0
    seconds: float = 0.0
    failed_hashes: frozenset = frozenset()
    failed_block_ids: frozenset = frozenset()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when every block moved."""
        return not self.failed_hashes and not self.failed_block_ids


def _runs(pairs: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, list[int]]]:
    """(start_row, first_slot, other ids) for runs where slots are consecutive; pairs are (slot, other id)."""
    i, n = 0, len(pairs)
    while i < n:
        j = i + 1
        while j < n and pairs[j][0] == pairs[j - 1][0] + 1:
            j += 1
        yield i, pairs[i][0], [p[1] for p in pairs[i:j]]
        i = j


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def copy_g1_to_g2(layout: KVLayout, host: HostTier, block_ids: Sequence[int], slots: Sequence[int]) -> None:
    """Gather engine pages `block_ids` into host `slots`: one index_select per segment per run of slots."""
    pairs = sorted(zip(slots, block_ids))
    for _, s0, ids in _runs(pairs):
        idx = _index(ids, layout.device)
        for seg_index, seg in enumerate(layout.segments):
            torch.index_select(seg, 0, idx, out=host.tensor[seg_index, s0:s0 + len(ids)])


def copy_g2_to_g1(layout: KVLayout, host: HostTier, block_ids: Sequence[int], slots: Sequence[int]) -> None:
    """Scatter host `slots` into engine pages `block_ids`: one index_copy_ per segment per run of slots."""
    pairs = sorted(zip(slots, block_ids))
    for _, s0, ids in _runs(pairs):
        idx = _index(ids, layout.device)
        for seg_index, seg in enumerate(layout.segments):
            seg.index_copy_(0, idx, host.tensor[seg_index, s0:s0 + len(ids)])


def _staging_words(disk: DiskTier, buf: np.ndarray, word: torch.dtype, num_segments: int) -> torch.Tensor:
    """(n, num_segments, segment_words) word view of the data part of staging rows."""
    rows = torch.from_numpy(buf)[:, :disk.block_bytes]
    return rows.view(word).view(buf.shape[0], num_segments, -1)


def stage_g2(host: HostTier, disk: DiskTier, copies: Sequence[SlotCopy], buf: np.ndarray) -> None:
    """Gather host slots of `copies` into rows of staging `buf` and seal them (trailer with checksum)."""
    staged = _staging_words(disk, buf[:len(copies)], host.word, host.num_segments)
    pairs = [(c.host_slot, row) for row, c in enumerate(copies)]
    for r0, s0, rows in _runs(pairs):  # rows of a run are consecutive: pairs are in row order
        k = len(rows)
        staged[r0:r0 + k].copy_(host.tensor[:, s0:s0 + k].transpose(0, 1))
    disk.seal([c.block_hash for c in copies], buf[:len(copies)])


def unstage_g1(layout: KVLayout, disk: DiskTier, loads: Sequence[BlockMove], buf: np.ndarray) -> list[BlockMove]:
    """Verify staged rows of `loads` and scatter the good ones into engine pages; returns the failed loads."""
    n = len(loads)
    good = disk.verify([m.slot for m in loads], [m.block_hash for m in loads], buf[:n])
    good_set = set(good)
    failed = [m for i, m in enumerate(loads) if i not in good_set]
    if not good:
        return failed
    staged = _staging_words(disk, buf[:n], layout.word, layout.num_segments)
    if len(good) < n:
        staged = staged[torch.tensor(good, dtype=torch.long)]
    idx = _index([loads[i].block_id for i in good], layout.device)
    for seg_index, seg in enumerate(layout.segments):
        seg.index_copy_(0, idx, staged[:, seg_index])
    return failed


def copy_g2_to_g3(host: HostTier, disk: DiskTier, copies: Sequence[SlotCopy], buf: np.ndarray) -> None:
    """Write host slots to disk slots through staging `buf` (at least len(copies) rows), synchronously."""
    copies = sorted(copies, key=lambda c: c.disk_slot)
    stage_g2(host, disk, copies, buf)
    disk.write_sealed([c.disk_slot for c in copies], buf[:len(copies)])


def copy_g3_to_g1(layout: KVLayout, disk: DiskTier, loads: Sequence[BlockMove], buf: np.ndarray) -> list[BlockMove]:
    """Read disk slots into engine pages through staging `buf`, synchronously; returns the failed loads."""
    loads = sorted(loads, key=lambda m: m.slot)
    disk.read_raw([m.slot for m in loads], buf[:len(loads)])
    return unstage_g1(layout, disk, loads, buf)


class TransferEngine:
    """Executes offload and onboard jobs asynchronously. Lives in each worker process (one per rank)."""

    def __init__(self, layout: KVLayout, host: HostTier | None, disk: DiskTier | None = None,
                 staging_chunk_bytes: int = 16 << 20):
        if layout.device.type != "cpu":
            raise KvbmError(f"this transfer engine moves CPU engine caches; got {layout.device}")
        self.layout = layout
        self.host = host
        self.disk = disk
        self._chunk = max(1, staging_chunk_bytes // disk.slot_bytes) if disk is not None else 0
        self._staging: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # two pre-touched buffers per thread
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvbm-io")  # disk I/O beside staging
        self._done: queue.SimpleQueue[JobResult] = queue.SimpleQueue()
        self._queues = {"onboard": queue.SimpleQueue(), "offload": queue.SimpleQueue()}
        self._pending = 0
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, args=(kind,), name=f"kvbm-{kind}", daemon=True)
                         for kind in self._queues]
        for t in self._threads:
            t.start()

    # ---- public API ----------------------------------------------------------------------------------------

    def submit_offload(self, job: OffloadJob) -> None:
        """Queue an offload; its JobResult appears in get_finished()."""
        self._submit("offload", job)

    def submit_onboard(self, job: OnboardJob) -> None:
        """Queue an onboard; its JobResult appears in get_finished()."""
        self._submit("onboard", job)

    def get_finished(self) -> list[JobResult]:
        """Results of the jobs finished since the last call."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Finish queued jobs, stop the threads, close the disk tier."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join()
        self._io.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()

    # ---- execution -----------------------------------------------------------------------------------------

    def _submit(self, kind: str, job) -> None:
        if self._closed:
            raise KvbmError("transfer engine is closed")
        with self._lock:
            self._pending += 1
        self._queues[kind].put(job)

    def _loop(self, kind: str) -> None:
        run = self.run_offload if kind == "offload" else self.run_onboard
        q = self._queues[kind]
        while True:
            job = q.get()
            if job is None:
                return
            try:
                result = run(job)
            except Exception as exc:  # noqa: BLE001 - a job never kills the thread; its blocks fail instead
                log.exception("kvbm %s job %r failed", kind, job.job_id)
                result = self._failed(kind, job, exc)
            self._done.put(result)
            with self._lock:
                self._pending -= 1
                self._lock.notify_all()

    def _buffers(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        bufs = self._staging.get(kind)
        if bufs is None:
            bufs = self._staging[kind] = (self.disk.staging(self._chunk), self.disk.staging(self._chunk))
            for buf in bufs:
                buf.fill(0)  # fault the pages in now, not inside a transfer
        return bufs

    @staticmethod
    def _failed(kind: str, job, exc: Exception) -> JobResult:
        moves = list(getattr(job, "stores", ())) + list(getattr(job, "loads", ()))
        return JobResult(job.job_id, kind, error=str(exc),
                         failed_hashes=frozenset([m.block_hash for m in moves] +
                                                 [c.block_hash for c in getattr(job, "cascades", ())]),
                         failed_block_ids=frozenset(m.block_id for m in moves))

    def _chunks(self, items: list, key) -> list[list]:
        items = sorted(items, key=key)
        return [items[i:i + self._chunk] for i in range(0, len(items), self._chunk)]

    def _write_to_disk(self, cascades: list[SlotCopy]) -> tuple[set, str | None]:
        """Pipelined G2->G3: stage and seal chunk k+1 while chunk k is being written."""
        failed: set = set()
        error = None
        bufs = self._buffers("offload")
        inflight: list[tuple[Future, list[SlotCopy]]] = []

        def collect(fut: Future, chunk: list[SlotCopy]) -> None:
            nonlocal error
            try:
                fut.result()
            except KvbmError as exc:
                error = str(exc)
                log.warning("kvbm: %d blocks not written to disk: %s", len(chunk), exc)
                failed.update(c.block_hash for c in chunk)

        for k, chunk in enumerate(self._chunks(cascades, key=lambda c: c.disk_slot)):
            if len(inflight) == 2:
                collect(*inflight.pop(0))
            buf = bufs[k % 2]
            stage_g2(self.host, self.disk, chunk, buf)
            fut = self._io.submit(self.disk.write_sealed, [c.disk_slot for c in chunk], buf[:len(chunk)])
            inflight.append((fut, chunk))
        for item in inflight:
            collect(*item)
        return failed, error

    def _read_from_disk(self, loads: list[BlockMove]) -> tuple[list[BlockMove], str | None]:
        """Pipelined G3->G1: read chunk k+1 while chunk k is verified and scattered into the engine."""
        failed: list[BlockMove] = []
        error = None
        bufs = self._buffers("onboard")
        chunks = self._chunks(loads, key=lambda m: m.slot)

        def start(k: int) -> Future:
            return self._io.submit(self.disk.read_raw, [m.slot for m in chunks[k]], bufs[k % 2][:len(chunks[k])])

        fut = start(0)
        for k, chunk in enumerate(chunks):
            nxt = start(k + 1) if k + 1 < len(chunks) else None
            try:
                fut.result()
                failed.extend(unstage_g1(self.layout, self.disk, chunk, bufs[k % 2]))
            except KvbmError as exc:
                error = str(exc)
                log.warning("kvbm: %d blocks not read from disk: %s", len(chunk), exc)
                failed.extend(chunk)
            fut = nxt
        return failed, error

    def run_offload(self, job: OffloadJob) -> JobResult:
        """Execute an offload synchronously (the store thread calls this)."""
        start = time.perf_counter()
        failed: set = set()
        error = None
        cascades = list(job.cascades)
        if cascades:
            if self.disk is None:
                failed.update(c.block_hash for c in cascades)
            else:
                failed, error = self._write_to_disk(cascades)
        stores = list(job.stores)
        if stores:
            copy_g1_to_g2(self.layout, self.host, [m.block_id for m in stores], [m.slot for m in stores])
        n_disk = len(cascades) - len(failed)
        return JobResult(job.job_id, "offload", {"g1_g2": len(stores), "g2_g3": n_disk},
                         (len(stores) + n_disk) * self.layout.block_bytes, time.perf_counter() - start,
                         failed_hashes=frozenset(failed), error=error)

    def run_onboard(self, job: OnboardJob) -> JobResult:
        """Execute an onboard synchronously (the load thread calls this)."""
        start = time.perf_counter()
        from_host = [m for m in job.loads if m.tier is Tier.G2]
        from_disk = [m for m in job.loads if m.tier is Tier.G3]
        failed: list[BlockMove] = []
        error = None
        if from_host:
            copy_g2_to_g1(self.layout, self.host, [m.block_id for m in from_host], [m.slot for m in from_host])
        if from_disk:
            if self.disk is None:
                failed = list(from_disk)
            else:
                failed, error = self._read_from_disk(from_disk)
        n_disk = len(from_disk) - len(failed)
        return JobResult(job.job_id, "onboard", {"g2_g1": len(from_host), "g3_g1": n_disk},
                         (len(from_host) + n_disk) * self.layout.block_bytes, time.perf_counter() - start,
                         failed_hashes=frozenset(m.block_hash for m in failed),
                         failed_block_ids=frozenset(m.block_id for m in failed), error=error)
