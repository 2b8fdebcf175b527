"""Moving the bytes the leader decided: batched copies between G1 (engine cache), G2 (host) and G3 (disk).

Copies are batched: the engine's scattered pages move in one call per segment and per run of consecutive
host slots (index_select / index_copy_ over word-sized views run at memcpy speed). Disk moves are vectored
I/O straight from host slots and into engine pages (no staging copy when O_DIRECT alignment holds), a
bounded chunk per request, several in flight. Jobs run asynchronously on two threads (loads, stores), so an
onboard never waits behind an offload, and completion is reported per job, never assumed. When the engine
cache is on a GPU, kvbm.mechanism.cuda_copy moves the G1 bytes (staging, CUDA streams and events).

The shared tier (G4, a BlockStore) is reached through G2: a G4 load is one batched GET into the host slots
the leader reserved, then the usual G2 -> G1 copy, on the load thread; only verified values are copied (a
missing, evicted, corrupt or foreign value fails its block, which the engine recomputes). G2 -> G4 writes run
on a thread of their own straight from the (pinned) host slots, with bounded bytes in flight.

Operations:
  copy_g1_to_g2 / copy_g2_to_g1   engine pages <-> host slots
  BlockPieces                     byte views of host slots and engine pages for in-place disk I/O
  TransferEngine                  submit_offload / submit_onboard / submit_remote_store / get_finished / wait /
                                  close
"""

from __future__ import annotations

import ctypes
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
from kvbm.mechanism import fileio
from kvbm.mechanism.threads import background_target, place_background_thread
from kvbm.mechanism.disk import DiskTier
from kvbm.mechanism.host import HostTier
from kvbm.mechanism.layout import KVLayout
from kvbm.protocol import BlockMove, SlotCopy, Tier

log = logging.getLogger("kvbm.transfer")


@dataclass(frozen=True)
class OffloadJob:
    """Cascades first (they read host slots the stores then overwrite), then engine -> host stores.

    With `cascade_job_id` the cascades are detached: their host slots are snapshotted into staging memory
    (a memcpy), the stores run and the job reports as `job_id` at once, and the disk writes run on the disk
    thread and report as `cascade_job_id`. A G2 -> G3 write then never holds an engine block. Without it,
    the job reports once, after the disk writes.
    """

    job_id: Hashable
    stores: Sequence[BlockMove] = ()
    cascades: Sequence[SlotCopy] = ()
    cascade_job_id: Hashable | None = None


@dataclass(frozen=True)
class OnboardJob:
    """Loads from host, disk or the shared tier (G4, staged through the move's host slot) into engine blocks.
    `cascades`: host blocks the G4 staging slots evicted, snapshotted before the load and written to disk as
    `cascade_job_id` (as an offload's detached cascades)."""

    job_id: Hashable
    loads: Sequence[BlockMove] = ()
    cascades: Sequence[SlotCopy] = ()
    cascade_job_id: Hashable | None = None


@dataclass(frozen=True)
class RemoteStoreJob:
    """Write host slots to the shared tier: (block hash, host slot) pairs (the slots are not reused meanwhile)."""

    job_id: Hashable
    blocks: Sequence[tuple[Hashable, int]] = ()


@dataclass
class JobResult:
    """What a finished job did: blocks per direction, bytes, time, and the blocks that failed."""

    job_id: Hashable
    kind: str  # "offload" | "onboard" | "cascade" | "remote"
    blocks: dict[str, int] = field(default_factory=dict)  # "g1_g2", "g2_g3", "g2_g1", "g3_g1", "g4_g1", "g2_g4"
    nbytes: int = 0
    seconds: float = 0.0
    failed_hashes: frozenset = frozenset()
    failed_block_ids: frozenset = frozenset()
    error: str | None = None
    disk_error: str | None = None  # the disk tier itself failed (I/O error), not one block's checksum

    @property
    def ok(self) -> bool:
        """True when every block moved."""
        return not self.failed_hashes and not self.failed_block_ids


@dataclass
class _Direct:
    """A CUDA job whose copies the submitting thread enqueued itself (no hand-off before the copy engine
    starts): its handle (LayerLoad / LayerStore), the result it reports once the handle completes, and
    whether it has been reported (by the kind's thread or by a waiting caller, whichever comes first)."""

    kind: str
    job: object
    handle: object
    result: JobResult
    start: float
    done: bool = False


@dataclass(frozen=True)
class _Snapshot:
    """Detached cascades and the staging rows holding their bytes, queued for the disk thread."""

    job_id: Hashable
    cascades: Sequence[SlotCopy]
    buf: np.ndarray


def _runs(slots: Sequence[int], block_ids: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
    """(first host slot, engine block ids) per run of consecutive host slots, in slot order."""
    pairs = sorted(zip(slots, block_ids))
    for i, j in fileio.slot_runs([slot for slot, _ in pairs]):
        yield pairs[i][0], [block_id for _, block_id in pairs[i:j]]


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def copy_g1_to_g2(layout: KVLayout, host: HostTier, block_ids: Sequence[int], slots: Sequence[int]) -> None:
    """Gather engine pages `block_ids` into host `slots`: one index_select per segment per run of slots."""
    for s0, ids in _runs(slots, block_ids):
        idx = _index(ids, layout.device)
        for seg_index, seg in enumerate(layout.segments):
            torch.index_select(seg, 0, idx, out=host.segment(seg_index)[s0:s0 + len(ids)])


def copy_g2_to_g1(layout: KVLayout, host: HostTier, block_ids: Sequence[int], slots: Sequence[int]) -> None:
    """Scatter host `slots` into engine pages `block_ids`: one index_copy_ per segment per run of slots."""
    for s0, ids in _runs(slots, block_ids):
        idx = _index(ids, layout.device)
        for seg_index, seg in enumerate(layout.segments):
            seg.index_copy_(0, idx, host.segment(seg_index)[s0:s0 + len(ids)])


class BlockPieces:
    """Byte views of each block's segments in the host tier and the engine cache: what disk I/O reads and
    writes in place (pwritev/preadv), with no staging copy. Lives in each worker process."""

    def __init__(self, layout: KVLayout, host: HostTier | None):
        self.segment_bytes = seg_bytes = layout.segment_bytes
        self.num_segments = layout.num_segments
        self._host = None
        self.host_aligned = False
        self._host_block_major = host is not None and host.block_major
        if host is not None:
            self._host = memoryview(host.tensor.numpy()).cast("B")
            self._host_slots = host.num_slots
            piece = layout.block_bytes if host.block_major else seg_bytes
            self.host_aligned = host.tensor.data_ptr() % fileio.ALIGN == 0 and piece % fileio.ALIGN == 0
        self._engine: list[tuple[memoryview, int]] = []
        self.engine_aligned = layout.device.type == "cpu" and seg_bytes % fileio.ALIGN == 0
        if layout.device.type == "cpu":
            for seg in layout.segments:
                row = seg.stride(0) * seg.element_size()
                span = (seg.shape[0] - 1) * row + seg_bytes
                region = (ctypes.c_ubyte * span).from_address(seg.data_ptr())
                self._engine.append((memoryview(region).cast("B"), row))
                self.engine_aligned &= seg.data_ptr() % fileio.ALIGN == 0 and row % fileio.ALIGN == 0
        self._keep = layout  # the views point into these tensors' memory

    def regions(self) -> list[memoryview]:
        """The long-lived memory disk I/O reads and writes in place: the host tier and the engine cache."""
        return ([self._host] if self._host is not None else []) + [view for view, _ in self._engine]

    def host(self, slot: int) -> list[memoryview]:
        """The segments of host slot `slot` (one piece when the host tier is block-major)."""
        sb, n = self.segment_bytes, self._host_slots
        if self._host_block_major:
            bb = sb * self.num_segments
            return [self._host[slot * bb:(slot + 1) * bb]]
        return [self._host[(s * n + slot) * sb:(s * n + slot + 1) * sb] for s in range(self.num_segments)]

    def engine(self, block_id: int) -> list[memoryview]:
        """The segments of engine block `block_id` (CPU engine caches only)."""
        sb = self.segment_bytes
        return [view[block_id * row:block_id * row + sb] for view, row in self._engine]


class TransferEngine:
    """Executes offload and onboard jobs asynchronously. Lives in each worker process (one per rank).

    Three threads: loads, stores (engine <-> host, and snapshots of cascading host slots) and disk writes of
    detached cascades, so that neither an onboard nor an engine block ever waits behind a disk write.
    """

    def __init__(self, layout: KVLayout, host: HostTier | None, disk: DiskTier | None = None,
                 chunk_bytes: int = 32 << 20, gpu_chunk_bytes: int = 64 << 20, write_chunk_bytes: int = 8 << 20,
                 cascade_staging_bytes: int = 256 << 20, remote=None, remote_inflight_bytes: int = 256 << 20,
                 remote_wait_s: float = 30.0, remote_chunk_bytes: int = 256 << 20):
        self.cuda = None  # the CUDA path (kvbm.mechanism.cuda_copy) when the engine cache is on a GPU
        if layout.device.type == "cuda":
            from kvbm.mechanism.cuda_copy import CudaCopier

            self.cuda = CudaCopier(layout, host, gpu_chunk_bytes)
        elif layout.device.type != "cpu":
            raise KvbmError(f"this transfer engine moves CPU or CUDA engine caches; got {layout.device}")
        self.layout = layout
        self.host = host
        self.disk = disk
        self.remote = remote  # a kvbm.mechanism.remote.BlockStore, or None
        self._remote_budget = remote_inflight_bytes  # G2 -> G4 bytes queued or being written
        self._remote_used = 0
        self._remote_wait_s = remote_wait_s  # a store operation never takes longer (its own timeouts are shorter)
        self._remote_chunk_bytes = remote_chunk_bytes  # one GET batch: later ones arrive while this one is copied
        self._chunk = max(1, chunk_bytes // disk.slot_bytes) if disk is not None else 0
        # Writes go in smaller chunks: a chunk's checksums overlap the writes of the chunks before it.
        self._write_chunk = max(1, write_chunk_bytes // disk.slot_bytes) if disk is not None else 0
        self.pieces = BlockPieces(layout, host)
        register = getattr(disk.io, "register_buffer", None) if disk is not None else None
        self._register = register or (lambda buf: None)  # NIXL: register long-lived memory once, not per call
        for region in self.pieces.regions() if disk is not None else ():
            self._register(region)
        self._staging: tuple[np.ndarray, np.ndarray] | None = None  # onboard staging, when engine pages are unaligned
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvbm-io",
                                      initializer=place_background_thread)  # disk I/O beside staging
        self._done: queue.SimpleQueue[JobResult] = queue.SimpleQueue()
        self._queues = {"onboard": queue.SimpleQueue(), "offload": queue.SimpleQueue(), "cascade": queue.SimpleQueue(),
                        "remote": queue.SimpleQueue()}
        self._pending = {"onboard": 0, "offload": 0, "cascade": 0, "remote": 0}
        self._direct: list[_Direct] = []  # CUDA jobs started on the submitting thread, not yet reported
        self._submit_lock = threading.Lock()  # a direct start and the queue see submissions in one order
        self._open: set = set()  # job ids submitted and not finished (detached cascades included)
        self._staging_budget = cascade_staging_bytes  # snapshots of cascading host slots awaiting their write
        self._staging_used = 0
        self.disk_disabled: str | None = None  # why disk work stopped (set by disable_disk)
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=background_target(self._loop, awaited=kind == "onboard"), args=(kind,),
                                          name=f"kvbm-{kind}", daemon=True)
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

    def submit_remote_store(self, job: RemoteStoreJob) -> None:
        """Queue a G2 -> G4 write; over the in-flight byte budget (or with no store) it fails at once, unwritten."""
        nbytes = len(job.blocks) * self.layout.block_bytes
        with self._lock:
            admitted = self.remote is not None and self._remote_used + nbytes <= self._remote_budget
            if admitted:
                self._remote_used += nbytes
        if not admitted:
            why = "no shared tier" if self.remote is None else "shared-tier writes backlogged"
            with self._lock:
                self._pending["remote"] += 1
                self._open.add(job.job_id)
            self._finish("remote", JobResult(job.job_id, "remote", {"g2_g4": 0}, error=why,
                                             failed_hashes=frozenset(h for h, _ in job.blocks)))
            return
        self._submit("remote", job)

    def get_finished(self) -> list[JobResult]:
        """Results of the jobs finished since the last call."""
        if self._done.empty():  # every engine step asks: no exception raised when nothing finished
            return []
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float | None = None, kind: str | None = None) -> bool:
        """Block until every submitted job (of `kind`: "onboard", "offload" or "cascade", default all) has
        finished; False on timeout."""
        kinds = [kind] if kind else list(self._pending)
        if timeout is None:  # jobs started here: wait on their CUDA events on this thread, no wake-up hand-off
            with self._lock:
                direct = [d for d in self._direct if d.kind in kinds]
            for d in direct:
                self._complete(d)
        with self._lock:
            return self._lock.wait_for(lambda: not any(self._pending[k] for k in kinds), timeout)

    def wait_jobs(self, job_ids, timeout: float | None = None) -> bool:
        """Block until the given jobs (those still open here) have finished; False on timeout. The fence of a
        preemption: only the jobs that read the preempted request's engine blocks, nothing else."""
        ids = set(job_ids)
        with self._lock:
            return self._lock.wait_for(lambda: not (ids & self._open), timeout)

    def is_open(self, job_id) -> bool:
        """True while a submitted job has not finished."""
        with self._lock:
            return job_id in self._open

    def disable_disk(self, why: str) -> None:
        """Stop every disk transfer from now on (the disk tier failed here or on another rank): disk moves
        fail at once, without I/O, and the leader plans no more of them."""
        self.disk_disabled = why

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
        if self.cuda is not None:
            self.cuda.close()
        if self.disk is not None:
            self.disk.close()
        if self.remote is not None:
            self.remote.close()

    # ---- execution -----------------------------------------------------------------------------------------

    def _submit(self, kind: str, job) -> None:
        if self._closed:
            raise KvbmError("transfer engine is closed")
        with self._submit_lock:
            with self._lock:
                # a CUDA G1<->G2 job starts here when no queued job of its kind must run first
                direct = self._directable(kind, job) and self._pending[kind] == sum(
                    1 for d in self._direct if d.kind == kind)
                self._pending[kind] += 1
                self._open.add(job.job_id)
                if getattr(job, "cascade_job_id", None) is not None and job.cascades:
                    self._open.add(job.cascade_job_id)
            # CUDA: the job waits for the work queued so far on the submitter's stream (the forward's writes)
            ready = self.cuda.mark() if self.cuda is not None else None
            if not (direct and self._start_direct(kind, job, ready)):
                self._queues[kind].put((job, ready))

    def _directable(self, kind: str, job) -> bool:
        """A CUDA job of engine <-> host copies only, on a copier that can start them without waiting."""
        if self.cuda is None or not self.cuda.uses_layerwise or getattr(job, "cascades", ()):
            return False
        if kind == "offload":
            return bool(job.stores)
        return kind == "onboard" and bool(job.loads) and all(m.tier is Tier.G2 for m in job.loads)

    def _start_direct(self, kind: str, job, ready) -> bool:
        """Enqueue the job's copies on this (the submitting) thread: the copy engine starts without waiting
        for the kind's thread to wake (measured ~0.3 ms of a 20 ms GiB on an H200). The kind's thread only
        reports completion; wait() reports it itself when it gets there first. False: not started (no split
        start on this copier), queue it as usual."""
        start = time.perf_counter()
        moves = job.stores if kind == "offload" else job.loads
        ids, slots = [m.block_id for m in moves], [m.slot for m in moves]
        try:
            handle = (self.cuda.start_offload if kind == "offload" else self.cuda.start_onboard)(ids, slots, ready)
        except Exception as exc:  # noqa: BLE001 - a job never raises into the caller; its blocks fail instead
            log.exception("kvbm %s job %r failed", kind, job.job_id)
            self._finish(kind, self._failed(kind, job, exc))
            return True
        if handle is None:
            return False
        n = len(moves)
        blocks = {"g1_g2": n, "g2_g3": 0} if kind == "offload" else {"g2_g1": n, "g3_g1": 0}
        entry = _Direct(kind, job, handle, JobResult(job.job_id, kind, blocks, n * self.layout.block_bytes), start)
        with self._lock:
            self._direct.append(entry)
        self._queues[kind].put((entry, None))
        return True

    def _complete(self, entry: _Direct) -> None:
        """Wait for a direct job's last copy (asleep, then spinning for its tail) and report it, once."""
        try:
            entry.handle.wait_blocking()
            result = entry.result
        except Exception as exc:  # noqa: BLE001 - a failed copy fails the job's blocks
            log.exception("kvbm %s job %r failed", entry.kind, entry.result.job_id)
            result = self._failed(entry.kind, entry.job, exc)
        with self._lock:
            if entry.done:
                return
            entry.done = True
            self._direct.remove(entry)
        result.seconds = time.perf_counter() - entry.start
        self._finish(entry.kind, result)

    def _loop(self, kind: str) -> None:
        run = {"offload": self.run_offload, "onboard": self.run_onboard, "cascade": self._run_cascade,
               "remote": self.run_remote_store}[kind]
        q = self._queues[kind]
        while True:
            item = q.get()
            if item is None:
                return
            job, ready = item
            if isinstance(job, _Direct):  # started on the submitting thread: report its completion
                self._complete(job)
                continue
            try:
                result = run(job, ready)
            except Exception as exc:  # noqa: BLE001 - a job never kills the thread; its blocks fail instead
                log.exception("kvbm %s job %r failed", kind, job.job_id)
                result = self._failed(kind, job, exc)
            self._finish(kind, result)

    def _finish(self, kind: str, result: JobResult) -> None:
        self._done.put(result)
        with self._lock:
            self._pending[kind] -= 1
            self._open.discard(result.job_id)
            self._lock.notify_all()

    @staticmethod
    def _failed(kind: str, job, exc: Exception) -> JobResult:
        moves = list(getattr(job, "stores", ())) + list(getattr(job, "loads", ()))
        return JobResult(job.job_id, kind, error=str(exc),
                         failed_hashes=frozenset([m.block_hash for m in moves] +
                                                 [c.block_hash for c in getattr(job, "cascades", ())]),
                         failed_block_ids=frozenset(m.block_id for m in moves))

    def _chunks(self, items: list, key, size: int | None = None) -> list[list]:
        items = sorted(items, key=key)
        size = size or self._chunk
        return [items[i:i + size] for i in range(0, len(items), size)]

    def _write_to_disk(self, cascades: list[SlotCopy], pieces=None) -> tuple[set, str | None]:
        """G2->G3 straight from the host slots (or from `pieces(cascade)`, a snapshot), chunks in flight
        concurrently; returns failed hashes and the disk error, if any."""
        failed: set = set()
        error = None
        chunks = self._chunks(cascades, key=lambda c: c.disk_slot, size=self._write_chunk)
        if pieces is None:
            futures = [self._io.submit(self.disk.write_blocks, [c.disk_slot for c in chunk],
                                       [c.block_hash for c in chunk], [self.pieces.host(c.host_slot) for c in chunk],
                                       self.pieces.host_aligned or None)
                       for chunk in chunks]
        else:
            futures = [self._io.submit(self.disk.write_blocks, [c.disk_slot for c in chunk],
                                       [c.block_hash for c in chunk], [pieces(c) for c in chunk])
                       for chunk in chunks]
        for fut, chunk in zip(futures, chunks):
            try:
                fut.result()
            except KvbmError as exc:
                error = str(exc)
                log.warning("kvbm: %d blocks not written to disk: %s", len(chunk), exc)
                failed.update(c.block_hash for c in chunk)
        return failed, error

    def _read_from_disk(self, loads: list[BlockMove]) -> tuple[list[BlockMove], str | None]:
        """G3->G1, verified. In place into engine pages when O_DIRECT alignment allows; else through two
        staging buffers, reading and verifying chunk k+1 while chunk k is scattered into the engine."""
        failed: list[BlockMove] = []
        error = None
        chunks = self._chunks(loads, key=lambda m: m.slot)
        in_place = self.pieces.engine_aligned or not self.disk.direct
        if in_place:
            futures = [self._io.submit(self.disk.read_blocks, [m.slot for m in c], [m.block_hash for m in c],
                                       [self.pieces.engine(m.block_id) for m in c], True) for c in chunks]
        else:
            bufs = self._staging_pair()

            def start(k: int) -> Future:
                c = chunks[k]
                return self._io.submit(self.disk.read_verified, [m.slot for m in c], [m.block_hash for m in c],
                                       bufs[k % 2][:len(c)])

            futures = [start(0)] + [None] * (len(chunks) - 1)
        for k, chunk in enumerate(chunks):
            if not in_place and k + 1 < len(chunks):
                futures[k + 1] = start(k + 1)  # its buffer held chunk k-1, already scattered
            try:
                good = futures[k].result()
            except KvbmError as exc:
                error = str(exc)
                log.warning("kvbm: %d blocks not read from disk: %s", len(chunk), exc)
                good = []
            if not in_place and good:
                self._scatter_staged(chunk, good, bufs[k % 2])
            good_set = set(good)
            bad = [m for i, m in enumerate(chunk) if i not in good_set]
            if bad:
                if in_place:  # never leave unverified bytes in engine pages
                    idx = _index([m.block_id for m in bad], self.layout.device)
                    for seg in self.layout.segments:
                        seg.index_fill_(0, idx, 0)
                failed.extend(bad)
        return failed, error

    def _staging_pair(self) -> tuple[np.ndarray, np.ndarray]:
        if self._staging is None:
            self._staging = (self.disk.staging(self._chunk), self.disk.staging(self._chunk))
            for buf in self._staging:
                buf.fill(0)  # fault the pages in now, not inside a transfer
                self._register(buf)
        return self._staging

    def _scatter_staged(self, chunk: list[BlockMove], good: list[int], buf: np.ndarray) -> None:
        """Copy verified staging rows into their engine pages: one index_copy_ per segment."""
        n = len(chunk)
        rows = torch.from_numpy(buf[:n])[:, :self.disk.block_bytes].view(self.layout.word)
        staged = rows.view(n, self.layout.num_segments, self.layout.segment_words)
        if len(good) < n:
            staged = staged[torch.tensor(good, dtype=torch.long)]
        idx = _index([chunk[i].block_id for i in good], self.layout.device)
        for seg_index, seg in enumerate(self.layout.segments):
            seg.index_copy_(0, idx, staged[:, seg_index])

    def _snapshot(self, cascades: list[SlotCopy]) -> np.ndarray | None:
        """Copy the cascading host slots into staging rows (None: staging budget spent, the writes are dropped)."""
        nbytes = len(cascades) * self.disk.slot_bytes
        with self._lock:
            if self._staging_used + nbytes > self._staging_budget:
                return None
            self._staging_used += nbytes
        buf = self.disk.staging(len(cascades))
        for i, c in enumerate(cascades):
            off = 0
            for piece in self.pieces.host(c.host_slot):
                data = np.frombuffer(piece, dtype=np.uint8)
                buf[i, off:off + data.size] = data
                off += data.size
        return buf

    def _run_cascade(self, item, ready=None) -> JobResult:
        """Write snapshotted host slots to their disk slots (the disk thread calls this)."""
        job_id, cascades, buf = item.job_id, item.cascades, item.buf
        start = time.perf_counter()
        try:
            if self.disk_disabled is not None:
                return JobResult(job_id, "cascade", {"g2_g3": 0}, failed_hashes=frozenset(c.block_hash for c in cascades),
                                 error=self.disk_disabled)
            rows = {id(c): [buf[i, :self.disk.block_bytes]] for i, c in enumerate(cascades)}
            failed, error = self._write_to_disk(cascades, pieces=lambda c: rows[id(c)])
        finally:
            with self._lock:
                self._staging_used -= len(cascades) * self.disk.slot_bytes
        n = len(cascades) - len(failed)
        return JobResult(job_id, "cascade", {"g2_g3": n}, n * self.layout.block_bytes, time.perf_counter() - start,
                         failed_hashes=frozenset(failed), error=error, disk_error=error)

    def _detach(self, cascade_job_id, cascades: list[SlotCopy]) -> None:
        """Snapshot the cascading host slots now and queue their disk writes as `cascade_job_id` (or fail it)."""
        try:
            buf = None if self.disk is None or self.disk_disabled else self._snapshot(cascades)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot drops these disk writes, nothing else
            log.warning("kvbm: %d blocks not kept for disk: %s", len(cascades), exc)
            buf = None
        if buf is None:  # no disk, or too many writes in flight: these evicted blocks are not kept
            with self._lock:
                self._pending["cascade"] += 1
            why = self.disk_disabled or ("no disk tier" if self.disk is None else "disk writes backlogged")
            self._finish("cascade", JobResult(cascade_job_id, "cascade", {"g2_g3": 0},
                                              failed_hashes=frozenset(c.block_hash for c in cascades), error=why))
        else:
            with self._lock:
                self._pending["cascade"] += 1
            self._queues["cascade"].put((_Snapshot(cascade_job_id, cascades, buf), None))

    def _read_remote(self, moves: list[BlockMove]) -> tuple[list[BlockMove], list[BlockMove]]:
        """G4 -> the moves' host slots: batched GETs of at most `chunk_bytes`, all in flight at once, each chunk
        copied into its host slots (and, on a CPU engine, on into the engine pages) while later chunks are still
        arriving. Returns (failed moves, moves staged in G2 whose G2 -> G1 copy is still to do)."""
        if self.remote is None:
            return list(moves), []
        per = max(1, self._remote_chunk_bytes // max(1, self.layout.block_bytes))
        chunks = [moves[i:i + per] for i in range(0, len(moves), per)]
        futures = [self.remote.get_many([m.block_hash for m in chunk]) for chunk in chunks]
        failed: list[BlockMove] = []
        pending: list[BlockMove] = []
        for chunk, future in zip(chunks, futures):
            try:
                values = future.result(timeout=self._remote_wait_s)
            except Exception as exc:  # noqa: BLE001 - a store that does not answer fails these blocks
                log.warning("kvbm: %d shared-tier blocks not loaded: %s", len(chunk), exc)
                failed.extend(chunk)
                continue
            good = []
            for m, data in zip(chunk, values):
                if data is None:
                    failed.append(m)
                    continue
                src = memoryview(data).cast("B")
                off = 0
                for piece in self.pieces.host(m.slot):
                    piece[:] = src[off:off + len(piece)]
                    off += len(piece)
                good.append(m)
            if self.cuda is None and good:  # CPU engine: on into G1 now, overlapping the next chunk's receive
                copy_g2_to_g1(self.layout, self.host, [m.block_id for m in good], [m.slot for m in good])
            else:
                pending.extend(good)
        return failed, pending

    def run_remote_store(self, job: RemoteStoreJob, ready=None) -> JobResult:
        """Write host slots to the shared tier (the G4 thread calls this); blocks the store refused fail."""
        start = time.perf_counter()
        blocks = list(job.blocks)
        try:
            items = [(h, self.pieces.host(slot)) for h, slot in blocks]
            try:
                ok = self.remote.put_many(items).result(timeout=self._remote_wait_s)
            except Exception as exc:  # noqa: BLE001 - not written: a later hit may write it again
                log.warning("kvbm: %d blocks not written to the shared tier: %s", len(blocks), exc)
                ok = [False] * len(blocks)
        finally:
            with self._lock:
                self._remote_used -= len(blocks) * self.layout.block_bytes
        failed = frozenset(h for (h, _), good in zip(blocks, ok) if not good)
        n = len(blocks) - len(failed)
        return JobResult(job.job_id, "remote", {"g2_g4": n}, n * self.layout.block_bytes, time.perf_counter() - start,
                         failed_hashes=failed)

    def run_offload(self, job: OffloadJob, ready=None) -> JobResult:
        """Execute an offload synchronously (the store thread calls this); CUDA: after event `ready`."""
        start = time.perf_counter()
        failed: set = set()
        error = None
        cascades = list(job.cascades)
        detached = job.cascade_job_id is not None and bool(cascades)
        if detached:
            self._detach(job.cascade_job_id, cascades)
            cascades = []
        elif cascades:
            if self.disk is None or self.disk_disabled:
                failed.update(c.block_hash for c in cascades)
            else:
                failed, error = self._write_to_disk(cascades)
        stores = list(job.stores)
        if stores:
            ids, slots = [m.block_id for m in stores], [m.slot for m in stores]
            if self.cuda is not None:
                self.cuda.offload(ids, slots, ready)
            else:
                copy_g1_to_g2(self.layout, self.host, ids, slots)
        n_disk = len(cascades) - len(failed)
        return JobResult(job.job_id, "offload", {"g1_g2": len(stores), "g2_g3": n_disk},
                         (len(stores) + n_disk) * self.layout.block_bytes, time.perf_counter() - start,
                         failed_hashes=frozenset(failed), error=error, disk_error=error)

    def run_onboard(self, job: OnboardJob, ready=None) -> JobResult:
        """Execute an onboard synchronously (the load thread calls this); CUDA: after event `ready`."""
        start = time.perf_counter()
        if job.cascade_job_id is not None and job.cascades:  # before the G4 blocks overwrite their host slots
            self._detach(job.cascade_job_id, list(job.cascades))
        from_remote = [m for m in job.loads if m.tier is Tier.G4]
        failed: list[BlockMove] = []
        staged: list[BlockMove] = []
        if from_remote:
            failed, pending = self._read_remote(from_remote)
            # staged in host memory: from here on (CUDA) the same G2 -> G1 copy as a host hit
            staged = [BlockMove(m.block_hash, m.block_id, m.slot, Tier.G2) for m in pending]
        n_remote = len(from_remote) - len(failed)
        from_host = [m for m in job.loads if m.tier is Tier.G2] + staged
        from_disk = [m for m in job.loads if m.tier is Tier.G3]
        error = None
        if from_host:
            ids, slots = [m.block_id for m in from_host], [m.slot for m in from_host]
            if self.cuda is not None:
                self.cuda.onboard(ids, slots, ready)
            else:
                copy_g2_to_g1(self.layout, self.host, ids, slots)
        if from_disk:
            if self.disk is None or self.disk_disabled:
                failed += list(from_disk)
            elif self.cuda is not None:
                bad_disk, error = self.cuda.load_from_disk(self.disk, self._chunks(from_disk, key=lambda m: m.slot),
                                                           self._io, ready)
                failed += list(bad_disk)
            else:
                bad_disk, error = self._read_from_disk(from_disk)
                failed += bad_disk
        n_disk = len(from_disk) - (len(failed) - (len(from_remote) - n_remote))
        blocks = {"g2_g1": len(from_host) - len(staged), "g3_g1": n_disk}
        if from_remote:
            blocks["g4_g1"] = n_remote
        return JobResult(job.job_id, "onboard", blocks,
                         (len(from_host) - len(staged) + n_remote + n_disk) * self.layout.block_bytes, time.perf_counter() - start,
                         failed_hashes=frozenset(m.block_hash for m in failed),
                         failed_block_ids=frozenset(m.block_id for m in failed), error=error, disk_error=error)
