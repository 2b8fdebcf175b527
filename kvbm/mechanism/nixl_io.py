"""Disk tier (G3) slot I/O through NIXL's POSIX backend: the same interface as `fileio.PosixDiskIO`.

Operations:
  load_nixl()                  the NIXL Python module (`nixl`, `nixl_cu13` or `nixl_cu12`), or None
  nixl_available()             whether NIXL imports here
  NixlDiskIO                   write(fd, items) / read(fd, items) / close(), name "nixl"
  NixlDiskIO.register_buffer   register a long-lived buffer once (staging, host tier, engine pages)
  NixlDiskIO.unregister_buffer / forget_fd   drop a buffer's or a file descriptor's registration

How NIXL is used (nixl 1.5.1, read from its installed `_api.py` and checked here):
  - one agent per NixlDiskIO, no progress or listener thread, NIXL_THREAD_SYNC_STRICT so several transfer
    threads may call read/write at once; the POSIX backend is created with `create_backend("POSIX", params)`.
    Its I/O queue is chosen by backend parameters: Linux AIO by default ("AIO"), "URING" (use_uring=true),
    "POSIXAIO" (use_posix_aio=true); all three moved bytes exactly here, with and without O_DIRECT, and need
    no other parameter for O_DIRECT. We ask for io_uring and fall back to Linux AIO where io_uring cannot
    start: with O_DIRECT the two are equal here (2.1-2.9 GB/s, 128 KiB slots), but Linux AIO is synchronous
    for buffered files (io_submit does the copy), so buffered cold reads ran at 0.6-0.8 GB/s with AIO
    against 1.2-1.3 GB/s with io_uring.
  - a file is registered once per fd as FILE (offset 0, length 0 = the whole file, devId = fd); memory as
    DRAM (address, length, 0). The POSIX backend's registration is bookkeeping only (no pinning), but the
    agent refuses a transfer whose every descriptor is not inside one registered region.
  - one batch = one request: `initialize_xfer(op, DRAM Nx3, FILE Nx3, <own agent name>)`, `transfer`, then
    `check_xfer_state` until "DONE". Errors arrive as exceptions (nixlBackendError...) from
    initialize_xfer/transfer/check_xfer_state, or as the "ERR" state; all become StorageError.
  - NIXL does not report a read that stops at the end of the file (it answers "DONE" with the buffer half
    filled), so reads are checked against the file size first.
"""

from __future__ import annotations

import fcntl
import importlib
import itertools
import logging
import os
import stat
import threading
import time
from typing import Sequence

import numpy as np

from kvbm.errors import StorageError
from kvbm.mechanism.fileio import ALIGN, SlotIO

log = logging.getLogger(__name__)

_MODULE_NAMES = ("nixl", "nixl_cu13", "nixl_cu12")
_UNSET = object()
_module = _UNSET
_agent_ids = itertools.count()


def load_nixl():
    """The NIXL Python module (the first of nixl, nixl_cu13, nixl_cu12 that imports with an agent), or None."""
    global _module
    if _module is _UNSET:
        _module = None
        for name in _MODULE_NAMES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # ImportError, or OSError/RuntimeError from a broken native library
                continue
            if hasattr(mod, "nixl_agent") and hasattr(mod, "nixl_agent_config"):
                _module = mod
                break
    return _module


def nixl_available() -> bool:
    """Whether NIXL's Python API imports in this environment."""
    return load_nixl() is not None


def _address(buf, writable: bool) -> tuple[int, int]:
    """(address, nbytes) of a contiguous buffer: numpy array, memoryview/bytes-like, or torch CPU tensor."""
    if isinstance(buf, np.ndarray):
        arr = buf
    elif hasattr(buf, "data_ptr") and hasattr(buf, "is_contiguous"):  # torch.Tensor, without importing torch
        if not buf.is_contiguous() or buf.device.type != "cpu":
            raise StorageError("disk cache I/O via NIXL needs contiguous CPU tensors")
        return buf.data_ptr(), buf.numel() * buf.element_size()
    else:
        try:
            arr = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise StorageError(f"disk cache I/O via NIXL got a buffer it cannot address: {exc}") from None
    if not arr.flags.c_contiguous:
        raise StorageError("disk cache I/O via NIXL needs contiguous buffers")
    if writable and not arr.flags.writeable:
        raise StorageError("disk cache read via NIXL got a read-only buffer")
    return arr.ctypes.data, arr.nbytes


class _Regions:
    """Registered DRAM regions; answers "is [addr, addr+len) inside one of them" for many pieces at once."""

    def __init__(self):
        self.by_key: dict[tuple[int, int], object] = {}  # (address, nbytes) -> NIXL registration list
        self.starts = np.empty(0, dtype=np.uint64)
        self.reach = np.empty(0, dtype=np.uint64)  # running max of region ends, in start order

    def rebuild(self) -> None:
        keys = sorted(self.by_key)
        self.starts = np.array([a for a, _ in keys], dtype=np.uint64)
        self.reach = np.maximum.accumulate(np.array([a + n for a, n in keys], dtype=np.uint64)) if keys else \
            np.empty(0, dtype=np.uint64)

    def covered(self, addrs: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per piece: True when one registered region contains it (a region starting at or before the piece
        reaches past its end; the running max of ends makes one search enough)."""
        if not len(self.starts):
            return np.zeros(len(addrs), dtype=bool)
        idx = np.searchsorted(self.starts, addrs, side="right").astype(np.int64) - 1
        ok = idx >= 0
        out = np.zeros(len(addrs), dtype=bool)
        out[ok] = self.reach[idx[ok]] >= ends[ok]
        return out


class NixlDiskIO:
    """Batched reads and writes of whole disk slots through NIXL's POSIX backend (lives in a worker).

    Same contract as `fileio.PosixDiskIO`: an item is (file offset, buffers), buffers one uint8 array or a
    list of buffers laid back to back in the file; calls block until the bytes have moved and raise
    StorageError with one message on any failure. With O_DIRECT, addresses, lengths and offsets must be
    ALIGN-aligned (checked up front, for a clear message). Thread-safe: concurrent calls each post their
    own NIXL request.

    Args:
        chunk_bytes: a single large buffer is cut into descriptors of this size, so several I/Os of it are
            in flight at once.
        max_descs: at most this many descriptors per NIXL request (the backend's I/O pool is 64K entries,
            shared by concurrent requests); larger batches are sent as several requests, one after another.
        backend_params: POSIX backend parameters ({} = NIXL's default queue, Linux AIO; {"use_aio": "true"},
            {"use_uring": "true"}, {"use_posix_aio": "true"}); None = io_uring, else Linux AIO (see above).
        timeout_s: a request not finished after this long fails with StorageError.
    """

    name = "nixl"

    def __init__(self, chunk_bytes: int = 8 << 20, max_descs: int = 8192, backend_params: dict | None = None,
                 timeout_s: float = 600.0, max_poll_s: float = 0.0005):
        nixl = load_nixl()
        if nixl is None:
            raise StorageError("NIXL is not installed (pip install nixl-cu13, or nixl-cu12); "
                               "the disk tier falls back to plain POSIX I/O without it")
        self.chunk_bytes = max(ALIGN, chunk_bytes // ALIGN * ALIGN)
        self.max_descs = max(1, max_descs)
        self.timeout_s = timeout_s
        self.max_poll_s = max_poll_s
        self.backend_params: dict[str, str] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._closed = False
        self._files: dict[int, object] = {}  # fd -> FILE registration
        self._regions = _Regions()
        self._leaked: list = []  # handles NIXL would not release (timed out): kept alive, never reused
        self._agent_name = f"kvbm-disk-{os.getpid()}-{next(_agent_ids)}"
        try:
            config = nixl.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[],
                                            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
            self._agent = nixl.nixl_agent(self._agent_name, config)
            if "POSIX" not in self._agent.get_plugin_list():
                raise RuntimeError(f"no POSIX plugin (plugins: {', '.join(self._agent.get_plugin_list())})")
            self._create_backend(backend_params)
        except Exception as exc:
            raise StorageError(f"cannot start NIXL's POSIX backend: {_describe(exc)}") from None

    def _create_backend(self, backend_params: dict | None) -> None:
        """The POSIX backend with the given parameters; by default io_uring, else NIXL's default (Linux AIO)
        where io_uring cannot start (kernels without it, containers whose seccomp profile blocks it)."""
        if backend_params is not None:
            self.backend_params = {k: str(v) for k, v in backend_params.items()}
            self._agent.create_backend("POSIX", self.backend_params)
            return
        try:
            self.backend_params = {"use_uring": "true"}
            self._agent.create_backend("POSIX", self.backend_params)
        except Exception as exc:
            log.info("NIXL POSIX backend: io_uring unavailable (%s); using Linux AIO", _describe(exc))
            self.backend_params = {}
            self._agent.create_backend("POSIX", self.backend_params)

    # ---- registration -------------------------------------------------------------------------------

    def register_buffer(self, buf) -> None:
        """Register a long-lived buffer (staging, host tier, engine cache) once; pieces inside it then need
        no registration per call. Registering the same buffer again does nothing."""
        addr, nbytes = _address(buf, writable=False)
        with self._lock:
            self._check_open()
            if (addr, nbytes) in self._regions.by_key or nbytes == 0:
                return
            try:
                reg = self._agent.register_memory([(addr, nbytes, 0, "")], "DRAM", backends=["POSIX"])
            except Exception as exc:
                raise StorageError(f"registering a buffer with NIXL failed: {_describe(exc)}") from None
            self._regions.by_key[(addr, nbytes)] = reg
            self._regions.rebuild()

    def unregister_buffer(self, buf) -> None:
        """Drop the registration made by register_buffer(buf) (before freeing the buffer)."""
        addr, nbytes = _address(buf, writable=False)
        with self._lock:
            reg = self._regions.by_key.pop((addr, nbytes), None)
            if reg is not None:
                self._regions.rebuild()
                self._deregister(reg)

    def forget_fd(self, fd: int) -> None:
        """Drop fd's registration (call before closing a file whose fd number may be reused)."""
        with self._lock:
            reg = self._files.pop(fd, None)
            if reg is not None:
                self._deregister(reg)

    def _file_registered(self, fd: int) -> None:
        """Register fd as a whole-file FILE region once (caller holds the lock)."""
        if fd not in self._files:
            try:
                self._files[fd] = self._agent.register_memory([(0, 0, fd, "")], "FILE", backends=["POSIX"])
            except Exception as exc:
                raise StorageError(f"registering fd {fd} with NIXL failed: {_describe(exc)}") from None

    def _deregister(self, reg) -> None:
        try:
            self._agent.deregister_memory(reg, backends=["POSIX"])
        except Exception as exc:
            log.warning("NIXL deregistration failed: %s", _describe(exc))

    # ---- I/O ------------------------------------------------------------------------------------------

    def write(self, fd: int, items: Sequence[SlotIO]) -> None:
        """Write every item; raises StorageError("disk cache write via NIXL failed: ...") on any failure."""
        self._run(fd, items, write=True)

    def read(self, fd: int, items: Sequence[SlotIO]) -> None:
        """Read into every item; raises StorageError("disk cache read via NIXL failed: ...") on any failure."""
        self._run(fd, items, write=False)

    def _run(self, fd: int, items: Sequence[SlotIO], write: bool) -> None:
        what = "write" if write else "read"
        local, remote = self._descriptors(fd, items, writable=not write)
        if not len(local):
            return
        self._check_file(fd, local, remote, write, what)
        with self._lock:
            self._check_open()
            self._file_registered(fd)
            self._active += 1
            todo = ~self._regions.covered(local[:, 0], local[:, 0] + local[:, 1])
        temp = None
        try:
            if todo.any():
                temp = self._register_temporary(local[todo], what)
            for start in range(0, len(local), self.max_descs):
                self._transfer("WRITE" if write else "READ", local[start:start + self.max_descs],
                               remote[start:start + self.max_descs], what)
        finally:
            with self._lock:
                if temp is not None:
                    self._deregister(temp)
                self._active -= 1
                self._idle.notify_all()

    def _descriptors(self, fd: int, items: Sequence[SlotIO], writable: bool) -> tuple[np.ndarray, np.ndarray]:
        """(DRAM Nx3, FILE Nx3) uint64 descriptor arrays: (address, length, 0) and (offset, length, fd)."""
        local: list[tuple[int, int]] = []
        offsets: list[int] = []
        for offset, bufs in items:
            single = isinstance(bufs, (np.ndarray, memoryview, bytes, bytearray)) or hasattr(bufs, "data_ptr")
            pieces = [bufs] if single else bufs
            for buf in pieces:
                addr, nbytes = _address(buf, writable)
                for start in range(0, nbytes, self.chunk_bytes):
                    n = min(self.chunk_bytes, nbytes - start)
                    local.append((addr + start, n))
                    offsets.append(offset + start)
                offset += nbytes
        if not local:
            empty = np.empty((0, 3), dtype=np.uint64)
            return empty, empty
        loc = np.zeros((len(local), 3), dtype=np.uint64)
        loc[:, :2] = local
        rem = np.empty_like(loc)
        rem[:, 0] = offsets
        rem[:, 1] = loc[:, 1]
        rem[:, 2] = fd
        return loc, rem

    def _check_file(self, fd: int, local: np.ndarray, remote: np.ndarray, write: bool, what: str) -> None:
        """Fail early, with a clear message, where NIXL would fail vaguely or (short reads) not at all."""
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            raise StorageError(f"disk cache {what} via NIXL failed: fd {fd}: {exc.strerror}") from None
        if flags & getattr(os, "O_DIRECT", 0):
            if (remote[:, :2] % ALIGN).any() or (local[:, 0] % ALIGN).any():
                raise StorageError(f"disk cache {what} via NIXL failed: the file is open with O_DIRECT but a "
                                   f"buffer address, length or file offset is not a multiple of {ALIGN}")
        if not write and stat.S_ISREG(st.st_mode):
            end = int((remote[:, 0] + remote[:, 1]).max())
            if end > st.st_size:
                raise StorageError(f"disk cache read via NIXL failed: bytes up to {end} asked of a file of "
                                   f"{st.st_size} bytes (file truncated?)")

    def _register_temporary(self, pieces: np.ndarray, what: str):
        """Register the unregistered pieces for one call, as merged contiguous runs."""
        order = np.argsort(pieces[:, 0], kind="stable")
        runs: list[list[int]] = []
        for addr, n in pieces[order, :2].tolist():
            if runs and addr <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], addr + n)
            else:
                runs.append([addr, addr + n])
        regs = np.array([(a, e - a, 0) for a, e in runs], dtype=np.uint64)
        try:
            return self._agent.register_memory(regs, "DRAM", backends=["POSIX"])
        except Exception as exc:
            raise StorageError(f"disk cache {what} via NIXL failed: registering buffers: {_describe(exc)}") from None

    def _transfer(self, op: str, local: np.ndarray, remote: np.ndarray, what: str) -> None:
        """One NIXL request for these descriptors; returns when it is done, raises StorageError otherwise."""
        agent = self._agent
        try:
            handle = agent.initialize_xfer(op, agent.get_xfer_descs(local, "DRAM"),
                                           agent.get_xfer_descs(remote, "FILE"), self._agent_name)
        except Exception as exc:
            raise StorageError(f"disk cache {what} via NIXL failed: preparing the request: {_describe(exc)}") from None
        done = False
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            delay = 0.00002
            # The POSIX backend makes progress (reaps completions, submits queued I/O) only when polled and
            # has no blocking wait: poll with short sleeps that grow to max_poll_s, not a busy loop.
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise StorageError(f"disk cache {what} via NIXL failed: not done after {self.timeout_s:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, self.max_poll_s)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise StorageError(f"disk cache {what} via NIXL failed: transfer state {state} "
                                   "(I/O error, short transfer or misaligned O_DIRECT buffer)")
            done = True
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"disk cache {what} via NIXL failed: {_describe(exc)}") from None
        finally:
            try:
                agent.release_xfer_handle(handle)
            except Exception as exc:
                if done:
                    log.warning("releasing a NIXL transfer handle failed: %s", _describe(exc))
                self._leaked.append(handle)  # still in flight: keep it (and its buffers' registration) alive

    # ---- lifetime -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("disk cache I/O via NIXL after close()")

    def close(self) -> None:
        """Wait for calls in flight, then release every registration and the agent. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._idle.wait()
            regs = list(self._files.values()) + list(self._regions.by_key.values())
            self._files.clear()
            self._regions.by_key.clear()
            self._regions.rebuild()
            for reg in regs:
                self._deregister(reg)
        if not self._leaked:
            self._agent = None  # the agent (and its backend, I/O queue) goes with its last reference

    def __enter__(self) -> "NixlDiskIO":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(exc: BaseException) -> str:
    """NIXL's exceptions carry only a status name (NIXL_ERR_BACKEND); add the type when it says more."""
    text = str(exc) or type(exc).__name__
    return text if text.startswith("NIXL_") or type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
