"""Layer-wise onboarding and offload on CUDA: KV moves per layer, overlapped with the forward that uses it.

Onboard (G2->G1, the request runs in the same engine step as its load): `start_load` enqueues, in layer order,
each layer's H2D copies from the pinned host tier into GPU staging (on kvbm's copy stream) and one scatter
kernel into the engine pages (on kvbm's kernel stream), with one CUDA event per layer; `wait_layer(i)` makes
the compute stream wait for layer i's event before layer i's attention (stream.wait_event: no host sync).
Offload (G1->G2): `start_store` plans the step's stores; `save_layer(i)` (after layer i's attention wrote its
KV) records an event on the compute stream, and kvbm's gather kernel and D2H copies of layer i wait for it on
kvbm's streams, so stores overlap the rest of the forward; `finish()` saves layers never saved (a step
replayed by a full CUDA graph calls no layer hook) and returns the event after which the host holds them.

The host tier is layer-major (segment, slot, words: HostTier.for_layout, the faster here) or block-major (slot,
segment, words). A layer of a run of consecutive host slots is then one 2D copy (block-major: one row per slot,
pitch = a whole slot) or one plain copy (layer-major). scripts/gpu_layerwise.py measures both.

Where the time against a raw memcpy of the same bytes went (scripts/gpu_copy_probe.py, timing events): the
copies themselves cost 0.5% (36 per-layer copies instead of one); the rest was host time before the first
copy reached the copy engine (planning in Python, the ids' upload, index kernels, torch views and slices:
0.4-1.1 ms of a 20 ms GiB) and a waiting thread woken late by the driver. Hence: vectorised planning, the
first copy queued first, driver copies on plain pointers, rows computed on the host, and whole-request waits
that sleep until the last SPIN_TAIL_BYTES, then spin (LayerLoad/LayerStore.wait_blocking).

Operations (the pure ones are tested on CPU):
  choose_onboard_path(num_blocks, ...)          "layerwise" or "async" (the whole-request TransferEngine job)
  plan_units(block_ids, slots, max_rows)         pure: slot-sorted ids and per-layer units of staging rows
  layer_copies(unit, seg0, spl, ...)             pure: the copies moving one layer of one unit
  gather_rows(base, ids, stride, units, ...)     pure: the flat cache rows of every (layer, unit), staging order
  LayerwiseCopier(layout, host)                  start_load -> LayerLoad, start_store -> LayerStore, close
  LayerLoad.wait_layer(i) / wait_all() / query() / synchronize() / wait_blocking()
  LayerStore.save_layer(i) / finish() / query() / synchronize() / wait_blocking()
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from kvbm.errors import TransferError
from kvbm.mechanism.cuda_copy import Copy2D, FlatRows, Run

log = logging.getLogger("kvbm.layerwise")

# Below this many blocks a layer's copy is a few pages (64 KiB each for Qwen3-4B at block size 16): per-call
# costs dominate and the whole-request load finishes within the worker's short post-step wait anyway.
MIN_LAYERWISE_BLOCKS = 4

# A thread waiting for a whole-request copy sleeps on a blocking-sync event until this many bytes are left,
# then spins: woken by the driver at the very end it would start 0.2-0.5 ms late (H200, part C of
# scripts/gpu_layerwise.py), and it spins for ~1 ms of copying at PCIe 5 speed, not for the whole copy.
SPIN_TAIL_BYTES = 64 << 20


def choose_onboard_path(num_blocks: int, *, from_disk: bool, cuda: bool, enabled: bool = True,
                        min_blocks: int = MIN_LAYERWISE_BLOCKS, max_blocks: int | None = None) -> str:
    """How to onboard one request's blocks: "layerwise" (synchronous, per layer, overlapping this step's
    forward) or "async" (one TransferEngine job; the request runs in a later step).

    Layer-wise pays on CUDA for host (G2) hits of at least `min_blocks` blocks. Disk (G3) reads run at disk
    speed, far behind a forward, so they stay asynchronous (a synchronous load would stall the whole batch);
    so do CPU engines (no streams to overlap on: see docs in scripts/gpu_layerwise.py's report). `max_blocks`
    bounds the stall a layer-wise load can inflict on the other requests of its batch (None: no bound)."""
    if not (enabled and cuda) or from_disk or num_blocks < min_blocks:
        return "async"
    if max_blocks is not None and num_blocks > max_blocks:
        return "async"
    return "layerwise"


# ---- planning (pure Python) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """Staging rows [row0, row0 + rows) of the slot-sorted blocks, and their host-slot runs (rows relative)."""

    row0: int
    rows: int
    runs: tuple[Run, ...]


def _plan(block_ids: Sequence[int], slots: Sequence[int], max_rows: int) -> tuple[np.ndarray, list[Unit]]:
    """plan_units with the ids as an int64 array (vectorised: this runs before the first copy can start)."""
    if max_rows < 1:
        raise ValueError("a unit holds at least one block")
    n = len(block_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64), []
    ids = np.fromiter(block_ids, dtype=np.int64, count=n)
    sl = np.fromiter(slots, dtype=np.int64, count=n)
    if n > 1 and not bool((sl[1:] > sl[:-1]).all()):
        order = np.lexsort((ids, sl))  # by slot, then block id (as sorted(zip(slots, ids)))
        ids, sl = ids[order], sl[order]
    brk = np.ones(n, dtype=bool)
    brk[1:] = sl[1:] != sl[:-1] + 1       # a new run of consecutive host slots ...
    brk[::max_rows] = True                # ... or a new unit
    starts = np.flatnonzero(brk).tolist()
    ends = starts[1:] + [n]
    first = sl[starts].tolist()
    units: list[Unit] = []
    runs: list[Run] = []
    for a, b, slot in zip(starts, ends, first):
        if a % max_rows == 0 and runs:
            row0 = len(units) * max_rows
            units.append(Unit(row0, min(max_rows, n - row0), tuple(runs)))
            runs = []
        runs.append(Run(slot, a % max_rows, b - a))
    row0 = len(units) * max_rows
    units.append(Unit(row0, n - row0, tuple(runs)))
    return ids, units


def plan_units(block_ids: Sequence[int], slots: Sequence[int], max_rows: int) -> tuple[tuple[int, ...], list[Unit]]:
    """Sort by host slot; cut the sorted blocks into units of at most `max_rows` blocks (a layer's staging
    buffer), each with its runs of consecutive host slots. Returns (ids in slot order, units)."""
    ids, units = _plan(block_ids, slots, max_rows)
    return tuple(ids.tolist()), units


def layer_copies(unit: Unit, seg0: int, spl: int, num_segments: int, num_slots: int, segment_bytes: int,
                 block_major: bool) -> list[Copy2D]:
    """Copies moving segments [seg0, seg0 + spl) (one layer) of `unit` between the host tier and staging.
    Staging is (rows, spl, seg) for a block-major host tier (one 2D copy per run, a row per slot) and
    (spl, rows, seg) for a layer-major one (one copy per run, a row per segment: plain when spl == 1)."""
    sb = segment_bytes
    if block_major:
        return [Copy2D((r.slot * num_segments + seg0) * sb, num_segments * sb, r.row * spl * sb, spl * sb,
                       spl * sb, r.count) for r in unit.runs]
    return [Copy2D((seg0 * num_slots + r.slot) * sb, num_slots * sb, r.row * sb, unit.rows * sb,
                   r.count * sb, spl) for r in unit.runs]


def gather_rows(base: np.ndarray, ids: np.ndarray, stride: int, units: list[Unit], block_major: bool,
                out: np.ndarray) -> np.ndarray:
    """Flat cache rows of every (layer, unit) in staging order, written into `out` (L * spl * n int64):
    `base` (L, spl) is the row of block 0 of each (layer, segment), a block is `stride` rows further. Layer
    l's rows start at l * spl * n, unit u's within it at u.row0 * spl, as (rows, spl) for a block-major host
    tier and (spl, rows) for a layer-major one (the staging buffer's order)."""
    L, spl = base.shape
    n = len(ids)
    scaled = ids * stride
    if block_major:
        np.add(base[:, None, :], scaled[None, :, None], out=out.reshape(L, n, spl))
    elif len(units) <= 1:
        np.add(base[:, :, None], scaled[None, None, :], out=out.reshape(L, spl, n))
    else:
        flat = out.reshape(L, spl * n)
        for u in units:
            part = base[:, :, None] + scaled[None, None, u.row0:u.row0 + u.rows]
            flat[:, u.row0 * spl:(u.row0 + u.rows) * spl] = part.reshape(L, -1)
    return out


# ---- CUDA ---------------------------------------------------------------------------------------------------

class _Ring:
    """GPU staging buffers used in turn, with the event after which each may be overwritten."""

    def __init__(self, device: torch.device, nbytes: int, count: int):
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self.free: list[torch.cuda.Event | None] = [None] * count
        self.next = 0
        self.views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (k, rows) -> views

    def take(self) -> int:
        k = self.next
        self.next = (k + 1) % len(self.bufs)
        return k


class _IndexBuf:
    """A pinned host int64 buffer and a device one of the same capacity, kept for the copier's life: a step's
    gather/scatter rows are written by numpy straight into the pinned one and uploaded by one driver copy (no
    per-call tensor, pin_memory allocation or torch copy before the first D2H of a store)."""

    def __init__(self, device: torch.device, capacity: int):
        self.capacity = capacity
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.np = self.host.numpy()
        self.dev = torch.empty(capacity, dtype=torch.int64, device=device)
        self.uploaded: torch.cuda.Event | None = None  # the host buffer may be rewritten after this


class LayerwiseCopier:
    """Per-layer loads and stores between a CUDA engine cache and the pinned host tier. Lives in each worker
    process; every call comes from the thread that runs the forward (vLLM's layer hooks).

    Host time matters: a load's or store's copy engine idles until its first copy is queued, and each torch
    call (a view, a slice, a copy) costs tens of microseconds on the device machines. So the copies go
    through the CUDA driver with plain pointers, staging views are made once per (buffer, rows), and the
    gather/scatter rows of every (layer, unit) are computed on the host into a kept pinned buffer (_IndexBuf),
    uploaded in one driver copy into a kept device buffer, and
    sliced once per unit."""

    def __init__(self, layout, host, staging_bytes: int = 64 << 20, num_buffers: int = 3):
        if layout.device.type != "cuda":
            raise TransferError("layer-wise transfers need a CUDA engine cache (CPU engines: keep them off)")
        if not host.pinned:
            raise TransferError("layer-wise transfers need a pinned host tier")
        self.layout, self.host, self.device = layout, host, layout.device
        self.num_layers = len(layout.layer_names)
        if layout.num_segments % self.num_layers:
            raise TransferError(f"{layout.num_segments} segments do not split into {self.num_layers} layers")
        self.spl = layout.num_segments // self.num_layers  # segments per layer (1 for vLLM 0.32's views)
        self.layer_bytes_per_block = self.spl * layout.segment_bytes
        self.max_rows = max(1, staging_bytes // self.layer_bytes_per_block)
        self.block_major = host.block_major
        self.flat = FlatRows.of(layout)
        self._base = None  # flat row of block 0 of each (layer, segment), on the host
        if self.flat is not None:
            self._base = self.flat.seg_base.cpu().numpy().reshape(self.num_layers, self.spl)
        self._staging_bytes = self.max_rows * self.layer_bytes_per_block
        self._num_buffers = num_buffers
        self._host_bytes = host.tensor.view(-1).view(torch.uint8)
        self._host_ptr = self._host_bytes.data_ptr()
        self._driver = None  # plain and 2D copies through libcuda (None: torch copies, row by row for 2D)
        from kvbm.mechanism.cuda_copy import _Driver

        try:
            self._driver = _Driver(self.device.index if self.device.index is not None else torch.cuda.current_device())
            pitch = max(c.host_pitch for c in self._probe_copies())
            self._two_d = pitch <= self._driver.max_pitch
            if not self._two_d:
                log.warning("kvbm: host pitch %d exceeds the 2D copy limit %d; layer-wise copies go row by row",
                            pitch, self._driver.max_pitch)
        except (OSError, AttributeError, TransferError) as exc:
            log.warning("kvbm: CUDA driver copies unavailable (%s); layer-wise copies go through torch", exc)
            self._driver, self._two_d = None, False
        self.h2d = torch.cuda.Stream(self.device)
        self.load_kernel = torch.cuda.Stream(self.device, priority=-1)  # high: on the forward's critical path
        self.store_kernel = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)
        self._rings: dict[str, _Ring] = {}
        # index buffers free for reuse, per stream: a buffer returns here once every kernel reading its device
        # half is queued on that stream, so a later upload on the same stream runs after them
        self._index_pool: dict[str, list[_IndexBuf]] = {"load": [], "store": []}
        self._index_lock = threading.Lock()

    def _probe_copies(self) -> list[Copy2D]:
        unit = Unit(0, 2, (Run(0, 0, 2),))
        return layer_copies(unit, 0, self.spl, self.layout.num_segments, self.host.num_slots,
                            self.layout.segment_bytes, self.block_major)

    def _ring(self, kind: str) -> _Ring:
        if kind not in self._rings:
            self._rings[kind] = _Ring(self.device, self._staging_bytes, self._num_buffers)
        return self._rings[kind]

    def _staged(self, ring: _Ring, k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer k as (rows, spl, w) or (spl, rows, w), and as (rows * spl, w) rows; made once per (k, rows)."""
        views = ring.views.get((k, rows))
        if views is None:
            lay = self.layout
            shape = (rows, self.spl) if self.block_major else (self.spl, rows)
            staged = ring.bufs[k][:rows * self.layer_bytes_per_block].view(lay.word).view(*shape, lay.segment_words)
            views = ring.views[(k, rows)] = (staged, staged.view(-1, lay.segment_words))
        return views

    def _copy(self, c: Copy2D, staged: torch.Tensor, to_host: bool, stream: torch.cuda.Stream, shift: int = 0) -> None:
        """One host<->staging copy on `stream`, `shift` bytes further into the host tier (a later layer)."""
        dense = c.height == 1 or (c.host_pitch == c.width and c.staging_pitch == c.width)
        if self._driver is not None and (dense or self._two_d):
            if dense:
                self._driver.copy(self._host_ptr + shift + c.host_offset, staged.data_ptr() + c.staging_offset,
                                  c.width * c.height, to_host, stream.cuda_stream)
            else:
                self._driver.copy2d(c, self._host_ptr + shift, staged.data_ptr(), to_host, stream.cuda_stream)
            return
        if shift:
            c = replace(c, host_offset=c.host_offset + shift)
        g_all = staged.view(-1).view(torch.uint8)
        with torch.cuda.stream(stream):  # no driver (or a pitch past its limit): torch copies, row by row
            for i in range(1 if dense else c.height):
                n = c.width * c.height if dense else c.width
                ho, so = c.host_offset + i * c.host_pitch, c.staging_offset + i * c.staging_pitch
                h, g = self._host_bytes[ho:ho + n], g_all[so:so + n]
                (h.copy_(g, non_blocking=True) if to_host else g.copy_(h, non_blocking=True))

    def _take_index(self, kind: str, size: int) -> _IndexBuf:
        with self._index_lock:
            pool = self._index_pool[kind]
            for i, buf in enumerate(pool):
                if buf.capacity >= size:
                    return pool.pop(i)
        return _IndexBuf(self.device, 1 << max(12, (size - 1).bit_length()))

    def _release_index(self, kind: str, buf: "_IndexBuf | None") -> None:
        """Every kernel reading `buf` is queued on `kind`'s stream: later uploads on it may overwrite it."""
        if buf is None:
            return
        with self._index_lock:
            pool = self._index_pool[kind]
            pool.append(buf)
            if len(pool) > 4:  # keep the largest few
                pool.sort(key=lambda b: b.capacity)
                del pool[0]

    def _upload_rows(self, ids: np.ndarray, units: list[Unit], stream: torch.cuda.Stream,
                     kind: str = "store") -> tuple[torch.Tensor, _IndexBuf]:
        """Flat rows of every (layer, unit) in staging order, one run after the other: (layer, unit) starts at
        layer * spl * n + unit.row0 * spl (see _rows). Computed on the host into a kept pinned buffer and
        uploaded in one driver copy on `stream`; returns (the rows on the device, their buffer: hand it back
        with _release_index once every kernel reading it is queued on `stream`)."""
        size = self.num_layers * self.spl * len(ids)
        buf = self._take_index(kind, size)
        if buf.uploaded is not None:
            buf.uploaded.synchronize()  # its last upload has long run: this returns at once
        gather_rows(self._base, ids, self.flat.block_stride, units, self.block_major, buf.np[:size])
        if self._driver is not None:
            self._driver.copy(buf.host.data_ptr(), buf.dev.data_ptr(), size * 8, False, stream.cuda_stream)
        else:
            with torch.cuda.stream(stream):
                buf.dev[:size].copy_(buf.host[:size], non_blocking=True)
        buf.uploaded = stream.record_event()
        return buf.dev[:size], buf

    def _rows(self, rows: torch.Tensor, n: int, layer: int, unit: Unit) -> torch.Tensor:
        start = (layer * n + unit.row0) * self.spl
        return rows[start:start + unit.rows * self.spl]

    def _per_segment(self, ids: torch.Tensor, layer: int, unit: Unit, staged: torch.Tensor, load: bool) -> None:
        """Layers in separate buffers (no flat view): one index op per segment."""
        sub = ids[unit.row0:unit.row0 + unit.rows]
        for j in range(self.spl):
            seg = self.layout.segments[layer * self.spl + j]
            part = staged[:, j] if self.block_major else staged[j]
            if load:
                seg.index_copy_(0, sub, part)
            else:
                torch.index_select(seg, 0, sub, out=part)

    def _ids(self, ids: np.ndarray, stream: torch.cuda.Stream) -> torch.Tensor:
        with torch.cuda.stream(stream):
            return torch.from_numpy(ids).pin_memory().to(self.device, non_blocking=True)

    def _nap_layer(self, num_blocks: int) -> int:
        """The layer after whose copies a waiting thread may sleep (-1: spin throughout): the layers after it
        move at least SPIN_TAIL_BYTES, time enough for a sleeping thread to wake before the last copy ends."""
        per_layer = max(1, num_blocks * self.layer_bytes_per_block)
        return self.num_layers - 1 - -(-SPIN_TAIL_BYTES // per_layer)

    def _unit_copies(self, units: list[Unit]) -> list[list[Copy2D]]:
        """Each unit's copies for layer 0; layer l's are the same shifted by l * _layer_shift bytes on the host."""
        lay = self.layout
        return [layer_copies(u, 0, self.spl, lay.num_segments, self.host.num_slots, lay.segment_bytes,
                             self.block_major) for u in units]

    @property
    def _layer_shift(self) -> int:
        sb = self.layout.segment_bytes
        return self.spl * sb if self.block_major else self.spl * self.host.num_slots * sb

    # ---- loads --------------------------------------------------------------------------------------------

    def start_load(self, block_ids: Sequence[int], slots: Sequence[int], ready=None) -> "LayerLoad":
        """Enqueue every layer's copies (host `slots` -> engine `block_ids`) in layer order; returns at once.
        The scatters wait for `ready` (default: an event on the current stream: earlier kernels may still
        read the pages). The first copy is queued before anything else (the rows' upload), so the copy
        engine starts as soon as the slots are planned."""
        if ready is None:
            ready = torch.cuda.current_stream(self.device).record_event()
        ids_sorted, units = _plan(block_ids, slots, self.max_rows)
        if not units:
            return LayerLoad(self, [ready] * self.num_layers)
        n = len(ids_sorted)
        events: list[torch.cuda.Event] = []
        nap_layer, nap = self._nap_layer(n), None
        ring = self._ring("load")
        copies, shift = self._unit_copies(units), self._layer_shift
        ids = rows = buf = None
        with torch.cuda.device(self.device), torch.cuda.stream(self.load_kernel):
            self.load_kernel.wait_event(ready)
            for layer in range(self.num_layers):
                for unit, unit_copies in zip(units, copies):
                    k = ring.take()
                    staged, staged_rows = self._staged(ring, k, unit.rows)
                    if ring.free[k] is not None:
                        self.h2d.wait_event(ring.free[k])
                    for c in unit_copies:
                        self._copy(c, staged, False, self.h2d, layer * shift)
                    loaded = self.h2d.record_event()
                    if ids is None and rows is None:  # behind the first copy: it need not wait for these
                        if self.flat is not None:
                            rows, buf = self._upload_rows(ids_sorted, units, self.load_kernel, "load")
                        else:
                            ids = self._ids(ids_sorted, self.load_kernel)
                    self.load_kernel.wait_event(loaded)
                    if rows is not None:
                        self.flat.rows.index_copy_(0, self._rows(rows, n, layer, unit), staged_rows)
                    else:
                        self._per_segment(ids, layer, unit, staged, load=True)
                    ring.free[k] = self.load_kernel.record_event()
                events.append(ring.free[k])
                if layer == nap_layer:
                    nap = torch.cuda.Event(blocking=True)
                    nap.record(self.load_kernel)
        self._release_index("load", buf)  # every scatter reading it is queued on load_kernel
        return LayerLoad(self, events, nap)

    # ---- stores -------------------------------------------------------------------------------------------

    def start_store(self, block_ids: Sequence[int], slots: Sequence[int]) -> "LayerStore":
        """Plan a step's stores (engine `block_ids` -> host `slots`); layers move as the forward saves them.
        The gather rows are uploaded now, off the path of the first layer's save."""
        store = self._new_store(block_ids, slots)
        if store.units:
            with torch.cuda.device(self.device):
                self._upload_store(store)
        return store

    def store_all(self, block_ids: Sequence[int], slots: Sequence[int], written=None) -> "LayerStore":
        """A whole-request store: every layer's gathers and copies queued now, behind `written` (default: an
        event on the current stream), device and stream entered once (start_store + finish in one: each
        torch context entry is host time before the first D2H)."""
        store = self._new_store(block_ids, slots)
        if not store.units:
            return store
        if written is None:
            written = torch.cuda.current_stream(self.device).record_event()
        store.saved = [True] * self.num_layers
        ring = self._ring("store")
        n, shift = len(store.ids_sorted), self._layer_shift
        with torch.cuda.device(self.device), torch.cuda.stream(self.store_kernel):
            self._upload_store(store)
            self.store_kernel.wait_event(written)
            for layer in range(self.num_layers):
                self._gather_and_copy(store, ring, n, shift, layer)
            self._release_index("store", store.index_buf)
            store.index_buf = None
        return store

    def _new_store(self, block_ids: Sequence[int], slots: Sequence[int]) -> "LayerStore":
        ids_sorted, units = _plan(block_ids, slots, self.max_rows)
        store = LayerStore(self, ids_sorted, units, self._nap_layer(len(ids_sorted)))
        if units:
            store.copies = self._unit_copies(units)
        return store

    def _upload_store(self, store: "LayerStore") -> None:
        """The store's gather rows (or ids) onto the device, on store_kernel (the device entered)."""
        if self.flat is not None:
            store.index, store.index_buf = self._upload_rows(store.ids_sorted, store.units, self.store_kernel)
        else:
            store.ids = self._ids(store.ids_sorted, self.store_kernel)

    def _save_layers(self, store: "LayerStore", layers: Sequence[int], written=None) -> None:
        """Queue the gathers and D2H copies of `layers` behind `written` (device and stream entered once: each
        entry costs host time before the first copy of a whole-request store)."""
        if written is None:  # after this layer's attention, queued on the current stream
            written = torch.cuda.current_stream(self.device).record_event()
        ring = self._ring("store")
        n, shift = len(store.ids_sorted), self._layer_shift
        with torch.cuda.device(self.device), torch.cuda.stream(self.store_kernel):
            self.store_kernel.wait_event(written)
            for layer in layers:
                self._gather_and_copy(store, ring, n, shift, layer)
            if store.index_buf is not None and all(store.saved):  # every gather reading it is queued
                self._release_index("store", store.index_buf)
                store.index_buf = None

    def _gather_and_copy(self, store: "LayerStore", ring: _Ring, n: int, shift: int, layer: int) -> None:
        for unit, unit_copies in zip(store.units, store.copies):
            k = ring.take()
            staged, staged_rows = self._staged(ring, k, unit.rows)
            if ring.free[k] is not None:
                self.store_kernel.wait_event(ring.free[k])
            if store.index is not None:
                torch.index_select(self.flat.rows, 0, self._rows(store.index, n, layer, unit), out=staged_rows)
            else:
                self._per_segment(store.ids, layer, unit, staged, load=False)
            self.d2h.wait_event(self.store_kernel.record_event())
            for c in unit_copies:
                self._copy(c, staged, True, self.d2h, layer * shift)
            ring.free[k] = self.d2h.record_event()
        store.last = ring.free[k]
        if layer == store.nap_layer:
            store.nap = torch.cuda.Event(blocking=True)
            store.nap.record(self.d2h)

    def close(self) -> None:
        """Wait for kvbm's streams and release the staging buffers."""
        for s in (self.h2d, self.load_kernel, self.store_kernel, self.d2h):
            s.synchronize()
        self._rings.clear()


class LayerLoad:
    """One step's layer-wise onboard: an event per layer. Lives in the worker process, for one step."""

    def __init__(self, copier: LayerwiseCopier, events: list, nap=None):
        self.copier = copier
        self.events = events
        self.nap = nap  # a blocking-sync event some layers before the end (None: the load is short)

    def wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """The compute stream (default: the current one) waits, on the GPU, for layer `layer`'s pages."""
        (stream or torch.cuda.current_stream(self.copier.device)).wait_event(self.events[layer])

    def wait_all(self, stream: torch.cuda.Stream | None = None) -> None:
        """Wait for every layer at once (a step run by a full CUDA graph, which calls no layer hook)."""
        self.wait_layer(len(self.events) - 1, stream)  # layers complete in order on one stream

    def query(self) -> bool:
        """True once every layer is in place (no blocking)."""
        return self.events[-1].query()

    def synchronize(self) -> None:
        """Block this thread until every layer is in place."""
        self.events[-1].synchronize()

    def wait_blocking(self) -> None:
        """Block this thread until every layer is in place: asleep for most of the load, spinning only for its
        last SPIN_TAIL_BYTES (a thread woken by the driver at the very end starts a few hundred microseconds
        late: measured 1-2% of a 1 GiB copy on an H200)."""
        _sleep_then_spin(self.nap, self.events[-1])


class LayerStore:
    """One step's layer-wise offload. Lives in the worker process, for one step (and until it completes)."""

    def __init__(self, copier: LayerwiseCopier, ids_sorted: np.ndarray, units: list[Unit], nap_layer: int = -1):
        self.copier = copier
        self.ids_sorted, self.units = ids_sorted, units
        self.ids: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.index_buf: _IndexBuf | None = None  # the kept buffer holding `index`, until every gather is queued
        self.saved = [False] * copier.num_layers
        self.last: torch.cuda.Event | None = None
        self.copies: list[list[Copy2D]] = []  # each unit's copies for layer 0
        self.nap_layer = nap_layer
        self.nap: torch.cuda.Event | None = None  # blocking-sync event after layer nap_layer's copies

    def save_layer(self, layer: int, written=None) -> None:
        """Layer `layer`'s attention has run on the current stream (or `written`, an event, has been recorded
        after it): copy its pages out behind it."""
        if self.saved[layer] or not self.units:
            return
        self.saved[layer] = True
        self.copier._save_layers(self, (layer,), written)

    def finish(self, written=None) -> "LayerStore":
        """After the forward: save the layers no hook saved; the store completes when `query()` is True."""
        todo = [layer for layer, saved in enumerate(self.saved) if not saved]
        if todo and self.units:
            for layer in todo:
                self.saved[layer] = True
            self.copier._save_layers(self, todo, written)
        return self

    def wait_blocking(self) -> None:
        """Block this thread until the host holds every saved layer: asleep for most of the store, spinning
        only for its last SPIN_TAIL_BYTES (see LayerLoad.wait_blocking)."""
        if self.last is not None:
            _sleep_then_spin(self.nap, self.last)

    def query(self) -> bool:
        """True once the host holds every saved layer (no blocking)."""
        return self.last is None or self.last.query()

    def synchronize(self) -> None:
        """Block this thread until the host holds every saved layer."""
        if self.last is not None:
            self.last.synchronize()


def _sleep_then_spin(nap, last) -> None:
    """Wait for `last`: first asleep on `nap` (a blocking-sync event recorded earlier, or None), then spinning."""
    if nap is not None:
        nap.synchronize()
    last.synchronize()
