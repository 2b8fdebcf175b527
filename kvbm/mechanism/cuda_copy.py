"""The CUDA path of the transfer engine: engine pages on a GPU <-> pinned host slots, and disk -> GPU.

Offload (G1->G2), per chunk of at most `chunk_bytes`: one gather kernel (index_select over one view of the
whole cache buffer, or one per segment when the layers do not share one) collects the chunk's scattered
engine pages into a GPU staging buffer laid out as the host tier is, then one D2H copy per run of
consecutive host slots. With a block-major host tier (HostTier.for_layout) a run is one contiguous piece:
one plain copy. With a segment-major one a run is one 2D block, all segments in one cuMemcpy2DAsync (one
torch copy per segment where the driver call is unavailable). Onboard (G2->G1) is the reverse: one H2D
copy per run into staging, then one scatter kernel (index_copy_). Two staging buffers per direction, a
kernel stream and a copy stream: the kernel of chunk k+1 runs under the copy of chunk k. Disk onboard
(G3->G1): verified reads into pinned host staging (the next chunk read while the current one is copied),
one H2D, one scatter.

Every job first waits, on the GPU, for an event recorded on the submitter's current stream (`mark`), so it
reads pages only after the forward that wrote them and writes pages only after earlier kernels that used
them; it returns only after its last event completed (the caller reports completion then, never before).

Operations:
  plan_chunks(block_ids, slots, max_blocks)   pure: runs of consecutive host slots packed into chunks
  host_copies(chunk, ...)                     pure: the 2D copies (offsets, pitches) of one chunk
  FlatRows.of(layout)                         one (rows, segment_words) view over all segments, when uniform
  mark(device)                                an event on the current stream (taken at submit time)
  CudaCopier(layout, host)                    offload / onboard (start_offload / start_onboard: enqueue now,
                                              wait later) / load_from_disk / copy_per_segment / close
"""

from __future__ import annotations

import ctypes
import logging
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Sequence

import torch

from kvbm.errors import KvbmError, TransferError
from kvbm.mechanism import fileio

log = logging.getLogger("kvbm.cuda")


# ---- planning (pure Python: tested on CPU) ------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """`count` consecutive host slots from `slot`, held in staging rows from `row`."""

    slot: int
    row: int
    count: int


@dataclass(frozen=True)
class Chunk:
    """One staging buffer's worth of blocks: engine block ids in staging-row order, and their host runs."""

    block_ids: tuple[int, ...]
    runs: tuple[Run, ...]


def plan_chunks(block_ids: Sequence[int], slots: Sequence[int], max_blocks: int) -> list[Chunk]:
    """Sort by host slot, split into runs of consecutive slots, pack into chunks of at most `max_blocks`."""
    if max_blocks < 1:
        raise ValueError("a chunk holds at least one block")
    chunks: list[Chunk] = []
    ids: list[int] = []
    runs: list[list[int]] = []  # [slot, row, count]
    for slot, block_id in sorted(zip(slots, block_ids)):
        if len(ids) == max_blocks:
            chunks.append(Chunk(tuple(ids), tuple(Run(*r) for r in runs)))
            ids, runs = [], []
        if runs and runs[-1][0] + runs[-1][2] == slot:
            runs[-1][2] += 1
        else:
            runs.append([slot, len(ids), 1])
        ids.append(block_id)
    if ids:
        chunks.append(Chunk(tuple(ids), tuple(Run(*r) for r in runs)))
    return chunks


@dataclass(frozen=True)
class Copy2D:
    """One 2D copy between the host tier and a chunk's staging (byte offsets from each buffer's start)."""

    host_offset: int
    host_pitch: int
    staging_offset: int
    staging_pitch: int
    width: int
    height: int


def host_copies(chunk: Chunk, num_segments: int, num_slots: int, segment_bytes: int) -> list[Copy2D]:
    """The copies moving `chunk` between staging (num_segments, n, seg) and the host tier (num_segments,
    num_slots, seg): one per run, one row per segment."""
    n = len(chunk.block_ids)
    return [Copy2D(r.slot * segment_bytes, num_slots * segment_bytes, r.row * segment_bytes, n * segment_bytes,
                   r.count * segment_bytes, num_segments) for r in chunk.runs]


@dataclass
class FlatRows:
    """All segments as rows of one (num_rows, segment_words) view of the cache buffer they share, so one
    kernel gathers or scatters every segment of every block (vLLM: one buffer, one strided view per layer)."""

    rows: torch.Tensor
    seg_base: torch.Tensor   # (num_segments,) row of block 0 of each segment
    block_stride: int        # rows from one block to the next

    @classmethod
    def of(cls, layout) -> "FlatRows | None":
        """The flat view, or None when the segments do not share one buffer with a uniform row grid."""
        segs = layout.segments
        words = layout.segment_words
        row_bytes = layout.segment_bytes
        storage = segs[0].untyped_storage()
        base_ptr, stride = storage.data_ptr(), segs[0].stride(0)
        if stride % words or segs[0].shape[1] != words or (words > 1 and segs[0].stride(1) != 1):
            return None
        bases = []
        for seg in segs:
            offset = seg.data_ptr() - base_ptr
            if seg.untyped_storage().data_ptr() != base_ptr or seg.stride(0) != stride or offset % row_bytes:
                return None
            bases.append(offset // row_bytes)
        rows = segs[0].as_strided((storage.nbytes() // row_bytes, words), (words, 1), 0)
        return cls(rows, torch.tensor(bases, dtype=torch.long, device=rows.device), stride // words)

    def index(self, ids: torch.Tensor, segment_major: bool) -> torch.Tensor:
        """Row of (segment, block) for every block id in `ids`, segment-major or block-major."""
        if segment_major:
            return (self.seg_base[:, None] + ids[None, :] * self.block_stride).reshape(-1)
        return (ids[:, None] * self.block_stride + self.seg_base[None, :]).reshape(-1)


# ---- CUDA ---------------------------------------------------------------------------------------------------

def mark(device: torch.device) -> "torch.cuda.Event":
    """An event on `device`'s current stream: a job waits for it before touching engine pages."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class _Memcpy2D(ctypes.Structure):
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


_HOST, _DEVICE = 1, 2           # CUmemorytype
_ATTR_MAX_PITCH = 11            # CU_DEVICE_ATTRIBUTE_MAX_PITCH


class _Driver:
    """cuMemcpy2DAsync and plain async copies through the CUDA driver (libcuda), on torch's streams and
    primary context."""

    def __init__(self, ordinal: int):
        lib = ctypes.CDLL("libcuda.so.1")
        self._copy = lib.cuMemcpy2DAsync_v2
        self._copy.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        self._h2d = lib.cuMemcpyHtoDAsync_v2  # (dst device, src host, bytes, stream)
        self._h2d.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._d2h = lib.cuMemcpyDtoHAsync_v2  # (dst host, src device, bytes, stream)
        self._d2h.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self._lib = lib
        self._local = threading.local()
        dev, value = ctypes.c_int(), ctypes.c_int()
        self._check(lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        self._dev = dev.value
        self._check(lib.cuDeviceGetAttribute(ctypes.byref(value), _ATTR_MAX_PITCH, dev), "cuDeviceGetAttribute")
        self.max_pitch = value.value

    def _check(self, code: int, what: str) -> None:
        if code:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(code, ctypes.byref(text))
            raise TransferError(f"{what} failed: CUDA error {code} ({(text.value or b'?').decode()})")

    def _bind(self) -> None:
        """Make the device's primary context (torch's) current on this thread, once."""
        if getattr(self._local, "bound", False):
            return
        ctx = ctypes.c_void_p()
        self._check(self._lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._dev), "cuDevicePrimaryCtxRetain")
            self._check(self._lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._local.bound = True

    def copy2d(self, c: Copy2D, host_ptr: int, dev_ptr: int, to_host: bool, stream: int) -> None:
        """Enqueue one 2D copy between pinned host memory and device memory on `stream`."""
        self._bind()
        p = _Memcpy2D(WidthInBytes=c.width, Height=c.height)
        host, dev = host_ptr + c.host_offset, dev_ptr + c.staging_offset
        if to_host:
            p.srcMemoryType, p.srcDevice, p.srcPitch = _DEVICE, dev, c.staging_pitch
            p.dstMemoryType, p.dstHost, p.dstPitch = _HOST, host, c.host_pitch
        else:
            p.srcMemoryType, p.srcHost, p.srcPitch = _HOST, host, c.host_pitch
            p.dstMemoryType, p.dstDevice, p.dstPitch = _DEVICE, dev, c.staging_pitch
        self._check(self._copy(ctypes.byref(p), ctypes.c_void_p(stream)), "cuMemcpy2DAsync")

    def copy(self, host_ptr: int, dev_ptr: int, nbytes: int, to_host: bool, stream: int) -> None:
        """Enqueue one plain copy between pinned host memory and device memory on `stream` (no tensor views:
        a few microseconds of host time where a sliced torch copy takes tens on the device machines)."""
        self._bind()
        if to_host:
            self._check(self._d2h(host_ptr, dev_ptr, nbytes, stream), "cuMemcpyDtoHAsync")
        else:
            self._check(self._h2d(dev_ptr, host_ptr, nbytes, stream), "cuMemcpyHtoDAsync")


class _Lane:
    """One direction's two GPU staging buffers, kernel and copy streams, and the events that order reuse."""

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        self.nbytes = nbytes
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.kernel = torch.cuda.Stream(device)
        self.copy = torch.cuda.Stream(device)
        self.free: list[torch.cuda.Event | None] = [None, None]  # buffer k may be overwritten after this

    def finish(self, stream: torch.cuda.Stream) -> None:
        """Block this thread (blocking-sync: no CPU, GIL released) until everything enqueued on `stream` ran."""
        done = torch.cuda.Event(blocking=True)
        done.record(stream)
        done.synchronize()


class CudaCopier:
    """Moves blocks between a CUDA engine cache and the pinned host tier (and disk). Lives in each worker
    process; the transfer engine calls offload from its store thread and onboard from its load thread."""

    def __init__(self, layout, host, chunk_bytes: int = 64 << 20, use_2d: bool | None = None):
        self.layout = layout
        self.host = host
        self.device = layout.device
        self.chunk_blocks = max(1, chunk_bytes // layout.block_bytes)
        self.flat = FlatRows.of(layout)
        self.block_major = host is not None and host.block_major
        self._driver = None
        if host is not None and host.pinned and not self.block_major and use_2d is not False:
            pitch = host.num_slots * layout.segment_bytes
            try:
                ordinal = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._driver = _Driver(ordinal)
                if pitch > self._driver.max_pitch:
                    log.info("kvbm: host tier pitch %d exceeds the 2D copy limit %d; copying per segment",
                             pitch, self._driver.max_pitch)
                    self._driver = None
            except (OSError, AttributeError, TransferError) as exc:
                log.info("kvbm: cuMemcpy2DAsync unavailable (%s); copying per segment", exc)
                self._driver = None
        if host is not None and not host.pinned:
            log.warning("kvbm: the host tier is not pinned; GPU copies will be slow")
        self._lanes: dict[str, _Lane] = {}
        self._disk_staging: list[tuple[torch.Tensor, object]] | None = None
        # A layer-major pinned host tier: G1<->G2 moves layer by layer (one plain copy per layer and run of
        # host slots, see kvbm.mechanism.layerwise), measured 0.96-0.98 of pinned memcpy on an H200.
        self._layerwise = None
        if host is not None and host.pinned and not self.block_major and use_2d is None:
            from kvbm.mechanism.layerwise import LayerwiseCopier

            self._layerwise = LayerwiseCopier(layout, host)

    @property
    def uses_2d(self) -> bool:
        """True when each host-slot run of a segment-major host tier moves in one 2D copy."""
        return self._driver is not None

    def use_chunked(self) -> None:
        """Layer-major host tier: move whole chunks with 2D copies instead of layer by layer (the old path)."""
        self._layerwise = None

    def copy_per_segment(self) -> None:
        """Segment-major host tier: one torch copy per segment per run instead of 2D copies (the fallback)."""
        self._driver = None
        self._layerwise = None

    def mark(self) -> "torch.cuda.Event":
        """An event on the current stream of the engine's device (call at submit time)."""
        return mark(self.device)

    def _lane(self, kind: str, nbytes: int) -> _Lane:
        lane = self._lanes.get(kind)
        if lane is None or lane.nbytes < nbytes:
            self._lanes[kind] = lane = _Lane(self.device, nbytes)  # jobs of a lane run one at a time, synced
        return lane

    def _staged(self, lane: _Lane, k: int, n: int) -> torch.Tensor:
        """Staging buffer k % 2 laid out as the host tier: (n, num_segments, w) or (num_segments, n, w)."""
        lay = self.layout
        shape = (n, lay.num_segments) if self.block_major else (lay.num_segments, n)
        return lane.bufs[k % 2][:lay.num_segments * n * lay.segment_bytes].view(lay.word).view(
            *shape, lay.segment_words)

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)

    def _host_copy(self, chunk: Chunk, staged: torch.Tensor, to_host: bool, stream: torch.cuda.Stream) -> None:
        lay, host = self.layout, self.host
        if self.block_major:  # a run is one contiguous piece on both sides
            for r in chunk.runs:
                h, g = host.tensor[r.slot:r.slot + r.count], staged[r.row:r.row + r.count]
                (h.copy_(g, non_blocking=True) if to_host else g.copy_(h, non_blocking=True))
            return
        if self._driver is not None:
            for c in host_copies(chunk, lay.num_segments, host.num_slots, lay.segment_bytes):
                self._driver.copy2d(c, host.tensor.data_ptr(), staged.data_ptr(), to_host, stream.cuda_stream)
            return
        for r in chunk.runs:
            for s in range(lay.num_segments):
                h, g = host.tensor[s, r.slot:r.slot + r.count], staged[s, r.row:r.row + r.count]
                (h.copy_(g, non_blocking=True) if to_host else g.copy_(h, non_blocking=True))

    @property
    def uses_layerwise(self) -> bool:
        """True when G1<->G2 moves layer by layer (layer-major pinned host tier)."""
        return self._layerwise is not None

    def start_offload(self, block_ids: Sequence[int], slots: Sequence[int], ready=None):
        """Layer-major host tier: enqueue every copy of engine pages `block_ids` -> host `slots` now and return
        the handle (query / wait_blocking); None when this copier has no such split (the chunked paths)."""
        if self._layerwise is None:
            return None
        return self._layerwise.store_all(block_ids, slots, ready)

    def start_onboard(self, block_ids: Sequence[int], slots: Sequence[int], ready=None):
        """Layer-major host tier: enqueue every copy of host `slots` -> engine pages `block_ids` now and return
        the handle (query / wait_blocking); None when this copier has no such split (the chunked paths)."""
        if self._layerwise is None:
            return None
        with torch.cuda.device(self.device):
            return self._layerwise.start_load(block_ids, slots, ready)

    def offload(self, block_ids: Sequence[int], slots: Sequence[int], ready=None) -> None:
        """Engine pages `block_ids` -> host `slots`; returns once the bytes are in host memory."""
        handle = self.start_offload(block_ids, slots, ready)
        if handle is not None:
            handle.wait_blocking()
            return
        lay = self.layout
        lane = self._lane("offload", self.chunk_blocks * lay.block_bytes)
        if ready is not None:
            lane.kernel.wait_event(ready)
        with torch.cuda.device(self.device):
            for k, chunk in enumerate(plan_chunks(block_ids, slots, self.chunk_blocks)):
                staged = self._staged(lane, k, len(chunk.block_ids))
                with torch.cuda.stream(lane.kernel):
                    if lane.free[k % 2] is not None:
                        lane.kernel.wait_event(lane.free[k % 2])
                    ids = self._ids(chunk.block_ids)
                    if self.flat is not None:
                        torch.index_select(self.flat.rows, 0, self.flat.index(ids, not self.block_major),
                                           out=staged.view(-1, lay.segment_words))
                    else:
                        for s, seg in enumerate(lay.segments):
                            torch.index_select(seg, 0, ids, out=staged[:, s] if self.block_major else staged[s])
                    gathered = lane.kernel.record_event()
                lane.copy.wait_event(gathered)
                with torch.cuda.stream(lane.copy):
                    self._host_copy(chunk, staged, True, lane.copy)
                    lane.free[k % 2] = lane.copy.record_event()
            lane.finish(lane.copy)

    def _scatter(self, ids: torch.Tensor, rows: torch.Tensor, segment_major: bool) -> None:
        """Write staged rows into the engine pages of `ids` (rows: (num_segments, n, w) or (n, num_segments, w))."""
        lay = self.layout
        if self.flat is not None:
            self.flat.rows.index_copy_(0, self.flat.index(ids, segment_major), rows.reshape(-1, lay.segment_words))
        else:
            for s, seg in enumerate(lay.segments):
                seg.index_copy_(0, ids, rows[s] if segment_major else rows[:, s])

    def onboard(self, block_ids: Sequence[int], slots: Sequence[int], ready=None) -> None:
        """Host `slots` -> engine pages `block_ids`; returns once the pages hold the bytes."""
        handle = self.start_onboard(block_ids, slots, ready)
        if handle is not None:
            handle.wait_blocking()
            return
        lay = self.layout
        lane = self._lane("onboard", self.chunk_blocks * lay.block_bytes)
        if ready is not None:
            lane.kernel.wait_event(ready)
        with torch.cuda.device(self.device):
            for k, chunk in enumerate(plan_chunks(block_ids, slots, self.chunk_blocks)):
                staged = self._staged(lane, k, len(chunk.block_ids))
                with torch.cuda.stream(lane.copy):
                    if lane.free[k % 2] is not None:
                        lane.copy.wait_event(lane.free[k % 2])
                    self._host_copy(chunk, staged, False, lane.copy)
                    loaded = lane.copy.record_event()
                with torch.cuda.stream(lane.kernel):
                    lane.kernel.wait_event(loaded)
                    self._scatter(self._ids(chunk.block_ids), staged, not self.block_major)
                    lane.free[k % 2] = lane.kernel.record_event()
            lane.finish(lane.kernel)

    def _pinned_pair(self, disk, n: int) -> list[tuple[torch.Tensor, object]]:
        """Two pinned, O_DIRECT-aligned host buffers of `n` disk slots: (torch bytes, numpy (n, slot_bytes))."""
        if self._disk_staging is None or self._disk_staging[0][1].shape[0] < n:
            pair = []
            for _ in range(2):
                raw = torch.empty(n * disk.slot_bytes + fileio.ALIGN, dtype=torch.uint8, pin_memory=True)
                start = (-raw.data_ptr()) % fileio.ALIGN
                t = raw[start:start + n * disk.slot_bytes]
                pair.append((t, t.numpy().reshape(n, disk.slot_bytes)))
            register = getattr(disk.io, "register_buffer", None)  # NIXL: register long-lived memory once
            for _, buf in pair if register is not None else ():
                register(buf)
            self._disk_staging = pair
        return self._disk_staging

    def load_from_disk(self, disk, chunks: list[list], io: Executor, ready=None) -> tuple[list, str | None]:
        """G3->G1, verified: each chunk of BlockMoves is read into pinned staging (the next read overlaps
        this chunk's copy), copied to the GPU in one H2D and scattered; only verified blocks are written.
        Returns (moves that failed, last error)."""
        lay = self.layout
        if not chunks:
            return [], None
        most = max(len(c) for c in chunks)
        pinned = self._pinned_pair(disk, most)
        lane = self._lane("onboard", max(self.chunk_blocks * lay.block_bytes, most * disk.slot_bytes))
        if ready is not None:
            lane.kernel.wait_event(ready)
        copied: list[torch.cuda.Event | None] = [None, None]  # pinned buffer k % 2 is free after this

        def start(k: int) -> Future:
            if copied[k % 2] is not None:
                copied[k % 2].synchronize()
            c = chunks[k]
            return io.submit(disk.read_verified, [m.slot for m in c], [m.block_hash for m in c],
                             pinned[k % 2][1][:len(c)])

        failed, error = [], None
        futures: list[Future | None] = [start(0)] + [None] * (len(chunks) - 1)
        with torch.cuda.device(self.device):
            for k, chunk in enumerate(chunks):
                if k + 1 < len(chunks):
                    futures[k + 1] = start(k + 1)
                try:
                    good = futures[k].result()
                except KvbmError as exc:
                    error = str(exc)
                    log.warning("kvbm: %d blocks not read from disk: %s", len(chunk), exc)
                    good = []
                good_set = set(good)
                failed.extend(m for i, m in enumerate(chunk) if i not in good_set)
                if not good:
                    continue
                n, nbytes = len(chunk), len(chunk) * disk.slot_bytes
                gpu = lane.bufs[k % 2][:nbytes]
                with torch.cuda.stream(lane.copy):
                    if lane.free[k % 2] is not None:
                        lane.copy.wait_event(lane.free[k % 2])
                    gpu.copy_(pinned[k % 2][0][:nbytes], non_blocking=True)
                    copied[k % 2] = ev = torch.cuda.Event(blocking=True)
                    ev.record(lane.copy)
                with torch.cuda.stream(lane.kernel):
                    lane.kernel.wait_event(ev)
                    rows = gpu.view(lay.word).view(n, -1)[:, :lay.num_segments * lay.segment_words]
                    if len(good) < n:
                        rows = rows[torch.tensor(good, dtype=torch.long).to(self.device, non_blocking=True)]
                    rows = rows.reshape(len(good), lay.num_segments, lay.segment_words)
                    self._scatter(self._ids([chunk[i].block_id for i in good]), rows, False)
                    lane.free[k % 2] = lane.kernel.record_event()
            lane.finish(lane.kernel)
        return failed, error

    def close(self) -> None:
        """Wait for the streams and release the staging buffers."""
        if self._layerwise is not None:
            self._layerwise.close()
        for lane in self._lanes.values():
            lane.kernel.synchronize()
            lane.copy.synchronize()
        self._lanes.clear()
        self._disk_staging = None
